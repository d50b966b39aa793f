"""Local models on the gateway.

Carded ONNX/LiteRT anomaly models with fallback and self-healing, plausibility rules, ectopic-beat
detection, and state estimators (HR fusion, battery SoC).
"""

from gateway.inference.build import ModelsSection, ModelUse, build_models, default_models_dir
from gateway.inference.card import ModelCard, load_card
from gateway.inference.plausibility import PlausibilityChecker, Rule
from gateway.inference.runner import AnomalyModel

__all__ = [
    "AnomalyModel",
    "ModelCard",
    "ModelUse",
    "ModelsSection",
    "PlausibilityChecker",
    "Rule",
    "build_models",
    "default_models_dir",
    "load_card",
]
