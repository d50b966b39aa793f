"""The shipped models' cards and files, for tests that copy or damage them."""

from __future__ import annotations

import shutil
from pathlib import Path

from gateway.inference.build import default_models_dir
from gateway.inference.card import CARD_SUFFIX, ModelCard, load_card

MODELS = default_models_dir()
NEURAL = ("pump_skab", "vitals_mimic")


def card_of(name: str, d: Path = MODELS) -> ModelCard:
    """The card of model ``name`` in folder ``d``."""
    return load_card(d / f"{name}{CARD_SUFFIX}")


def copy_model(tmp: Path, name: str) -> Path:
    """The card and every file of one model in a folder of its own."""
    card = card_of(name)
    shutil.copy(MODELS / f"{name}{CARD_SUFFIX}", tmp)
    for f in (*card.files.values(), *card.tflite_files.values(), *card.dense_files.values()):
        shutil.copy(MODELS / f.path, tmp)
    return tmp
