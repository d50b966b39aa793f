"""Local models on the gateway.

Carded ONNX/LiteRT anomaly models with fallback and self-healing, plausibility rules, ectopic-beat
detection, and state estimators (HR fusion, battery SoC).

The names below are imported on first use (PEP 562): a submodule the gateway always needs (the
plausibility rules, the ectopy monitor) must not load the model runner and its backends with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.lazy import lazy_name

if TYPE_CHECKING:
    from gateway.inference.build import ModelsSection, ModelUse, build_models, default_models_dir
    from gateway.inference.card import ModelCard, load_card
    from gateway.inference.plausibility import PlausibilityChecker, Rule
    from gateway.inference.runner import AnomalyModel

_HOME = {
    "AnomalyModel": "runner",
    "ModelCard": "card",
    "ModelUse": "build",
    "ModelsSection": "build",
    "PlausibilityChecker": "plausibility",
    "Rule": "plausibility",
    "build_models": "build",
    "default_models_dir": "build",
    "load_card": "card",
}

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


def __getattr__(name: str) -> Any:
    """A public name, imported from its submodule when first asked for."""
    return lazy_name(__name__, _HOME, name)
