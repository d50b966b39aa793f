"""The dense recipe's batch-1 figure times the call the gateway scores a window with."""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import numpy as np
import pytest

from gateway.inference.backends import DenseBackend, dense_forward
from gateway.inference.build import default_models_dir
from gateway.inference.card import CARD_SUFFIX, load_card
from models.recipes.dense import served_batch1_us


@pytest.mark.parametrize("name", ["pump_skab", "vitals_mimic"])
def test_the_numpy_figure_is_the_backend_s_window_at_a_time_call(name: str) -> None:
    path = default_models_dir() / f"{name}{CARD_SUFFIX}"
    n = load_card(path).n_inputs
    rows: list[tuple[int, np.dtype[Any]]] = []
    batches = [0]

    def seen(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        if frame.f_code is DenseBackend.run.__code__:
            x = frame.f_locals["x"]
            rows.append((len(x), x.dtype))
        elif frame.f_code is dense_forward.__code__:
            batches[0] += 1

    sys.setprofile(seen)
    try:
        us = served_batch1_us(path, np.zeros(n, np.float64))
    finally:
        sys.setprofile(None)
    assert us > 0.0
    one = [r for r in rows if r == (1, np.dtype(np.float32))]
    # 200 warm-up and 3,000 timed calls, each on one float32 row, beside the load-time check.
    assert len(one) >= 3200
    # The layers' batch path runs once, for the load-time check's batch, never in the timing.
    assert batches[0] == 1
