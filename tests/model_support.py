"""The shipped models' cards and files, for tests that copy or damage them."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from drivers import REGISTRY
from drivers.sim.protocol import STREAM_KIND, Generator, Label, make_generator
from gateway.config import Config, validate
from gateway.inference.backends import litert_interpreter_class
from gateway.inference.build import default_models_dir
from gateway.inference.card import CARD_SUFFIX, ModelCard, load_card
from gateway.sample import Stream

MODELS = default_models_dir()
NEURAL = ("pump_skab", "vitals_mimic")

#: Tests of the LiteRT backend run where its runtime installs (Linux x86-64 and aarch64).
needs_litert = pytest.mark.skipif(
    litert_interpreter_class() is None, reason="ai-edge-litert has no wheel for this platform"
)


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


def pump_1hz_config(tmp: Path, models: dict[str, Any]) -> Config:
    """A gateway for the simulated pump at 1 Hz (as SKAB): 5 s windows at a 1 s hop, no limit alarms."""
    raw = {
        "gateway": {"state_dir": str(tmp)},
        "pipeline": {"window_s": 5.0, "hop_s": 1.0, "grace_s": 0.0},
        "alarms": {"defaults": False},
        "models": {"ectopy": False, **models},
    }
    return validate(raw, "<pump>", REGISTRY)


def pump_1hz(seed: int, events: Sequence[Label] = ()) -> tuple[Generator, dict[str, Stream]]:
    """The simulated pump's generator at 1 Hz and its streams by metric name (machine line2-m3)."""
    gen = make_generator("pump", seed=seed, rate_hz=1.0, events=list(events))
    kind = STREAM_KIND["pump"]
    return gen, {
        s.metric.name: Stream("plc", "line2-m3", "DEV-P", s.metric, kind, s.rate_hz) for s in gen.signals
    }
