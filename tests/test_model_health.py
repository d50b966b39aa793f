"""Model health judged on the model's own work: a busy process does not change verdicts."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from test_inference_runtime import (
    COMMISSION,
    MODELS,
    PUMP,
    commission,
    health_events,
    nan_model,
    pump_model,
    pump_window,
)

from gateway.inference.card import CARD_SUFFIX, load_card
from gateway.inference.runner import AnomalyModel

BUDGET_US = 5000.0  # per window; the pump model needs ~100 us of CPU (~0.6 ms beside busy threads)


@contextmanager
def busy_threads(n: int) -> Iterator[None]:
    """Python threads spinning for the GIL, as drivers and the event loop do on a loaded gateway."""
    stop = threading.Event()

    def spin() -> None:
        deadline = time.monotonic() + 60.0  # bounded even if the test dies
        x = 0
        while not stop.is_set() and time.monotonic() < deadline:
            x += 1

    threads = [threading.Thread(target=spin, name=f"busy-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(5.0)


def loaded_run(clock: Callable[[], float], windows: int = 30) -> tuple[AnomalyModel, list[float]]:
    card = load_card(MODELS / f"{PUMP}{CARD_SUFFIX}")
    card = card.model_copy(
        update={
            "health": card.health.model_copy(update={"latency_budget_us": BUDGET_US, "overruns_to_demote": 3})
        }
    )
    model = AnomalyModel(card, MODELS, commissioning_windows=30, clock=clock)
    rng = np.random.default_rng(11)
    commission(model, rng)
    with busy_threads(4):
        for k in range(windows):
            model.score_batch([pump_window(40 + k, rng)])
    return model, list(model._health.latencies_us)


def test_cpu_time_budget_keeps_the_model_under_load() -> None:
    model, lat = loaded_run(time.thread_time)
    # One window now and then costs more CPU when the other threads left the caches cold (here up
    # to ~8 ms in a thousand); three in a row over the budget is what demotes, as on a gateway.
    assert model.stats()["budget_overruns"] == 0, f"per-window CPU time {sorted(lat)[-3:]} us"
    assert sorted(lat)[len(lat) // 2] < BUDGET_US / 4


# Outside the default run: whether an OS switch lands inside three ~0.1 ms windows in a row is up
# to the machine's scheduler. On a loaded two-core machine it did not (19 of 300 windows over the
# budget, never three in a row), so the control failed while the model's verdict was right.
@pytest.mark.campaign
def test_the_same_load_would_demote_a_wall_clock_budget() -> None:
    # The control: wall time includes waiting for the interpreter, so it depends on load.
    # A switch of the interpreter to a spinner lands inside a scored window now and then (the
    # window is a fraction of each 5 ms slice): enough windows make three in a row certain.
    model, lat = loaded_run(time.perf_counter, windows=300)
    assert int(model.stats()["budget_overruns"]) >= 1
    assert max(lat) > BUDGET_US


def test_a_slow_window_does_not_change_the_verdict() -> None:
    """Windows over the latency budget (a busy machine, an explained anomaly) keep the model's verdicts."""
    # The clocks are the test's: the thread's own CPU time on a cold model under parallel test
    # workers reached 1.8 ms against the card's 1 ms, so "steady" must not depend on the machine.
    steady = pump_model(clock=itertools.repeat(0.0).__next__)
    # Every window takes 10 ms of the worker's CPU, ten times the card's budget.
    slow = pump_model(clock=itertools.count(0.0, 0.01).__next__)
    verdicts = []
    for model in (steady, slow):
        rng = np.random.default_rng(3)
        commission(model, rng)
        run = []
        for k in range(12):
            shift = {"RateRMS": -0.3, "Pressure": -0.4, "Current": -0.1} if 4 <= k < 9 else None
            (r,) = model.score_batch([pump_window(40 + k, rng, shift=shift)])
            run.append((r.score, r.anomaly, r.fallback, r.reason, dict(r.contributions)))
        verdicts.append(run)
    assert verdicts[0] == verdicts[1]
    assert sum(v[1] for v in verdicts[0]) >= 3  # the shifted windows are anomalies, explained
    # The overrun is reported all the same: the model's state and one diagnostic saying why.
    assert steady.stats()["state"] == "healthy"
    assert slow.stats()["state"] == "over_budget"
    assert not slow.demoted
    (ev,) = health_events(slow)
    assert (ev.detail["state"], ev.detail["reason"]) == ("over_budget", "latency_budget")
    assert float(ev.detail["latency_p99_us"]) > float(ev.detail["latency_budget_us"])
    assert (ev.detail["over_budget_batches"], ev.detail["over_budget_last_us"]) == (3, 10_000.0)


def stepped_clock(cost_s: list[float]) -> Callable[[], float]:
    """A clock that advances ``cost_s[0]`` per reading: each batch of one window takes that long."""
    now = [0.0]

    def read() -> float:
        now[0] += cost_s[0]
        return now[0]

    return read


def test_over_budget_says_the_batches_that_put_it_there_not_a_p99_under_the_budget() -> None:
    """After a long healthy run, three slow batches in a row: the report says those three."""
    cost = [0.000_1]  # 100 us a window, a tenth of the card's 1000 us budget
    model = pump_model(clock=stepped_clock(cost))
    rng = np.random.default_rng(7)
    commission(model, rng)
    for k in range(400):
        model.score_batch([pump_window(40 + k, rng)])
    assert model.stats()["state"] == "healthy"
    cost[0] = 0.001_45
    for k in range(3):
        model.score_batch([pump_window(500 + k, rng)])
    stats = model.stats()
    assert stats["state"] == "over_budget"
    # The p99 over the kept batches is still the healthy run's: it cannot be the reason given.
    assert float(stats["latency_p99_us"]) < float(stats["latency_budget_us"]) == 1000.0
    assert stats["over_budget_batches"] == 3
    assert stats["over_budget_last_us"] == pytest.approx(1450.0)
    (ev,) = health_events(model)
    assert ev.detail["state"] == "over_budget"
    assert ev.detail["over_budget_batches"] == 3
    assert ev.detail["over_budget_last_us"] == pytest.approx(1450.0)
    # Back under it, the run that put it there is still what is reported until it is within budget.
    cost[0] = 0.000_1
    model.score_batch([pump_window(600, rng)])
    assert (model.stats()["state"], model.stats()["over_budget_batches"]) == ("over_budget", 3)


def test_a_demoted_model_is_still_reported_over_budget(tmp_path: Path) -> None:
    """Demotion (NaN) and a latency overrun are separate: the first does not hide the second."""
    d = nan_model(tmp_path)
    model = AnomalyModel(
        load_card(d / f"nan_model{CARD_SUFFIX}"),
        d,
        commissioning_windows=COMMISSION,
        clock=stepped_clock([1.0]),
    )
    rng = np.random.default_rng(5)
    commission(model, rng)
    for k in range(3):
        model.score_batch([pump_window(20 + k, rng)])
    stats = model.stats()
    assert (stats["state"], stats["over_budget"]) == ("demoted", True)
