"""Shadow evaluation in a model slot: real ONNX models scoring the same windows, promoted, rejected, rolled back."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest
from bundle_support import PUMP, card_for, onnx_model, shipped_int8, write
from durability import synced_during
from test_inference_runtime import commission, pump_model, pump_window

from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.contracts import Diagnostic
from gateway.inference.card import CARD_SUFFIX, load_card
from gateway.inference.runner import AnomalyModel
from gateway.inference.shadow import (
    Acceptance,
    Slot,
    ks_statistic,
    open_slots,
    read_installed,
    write_installed,
)


def _candidate(active: AnomalyModel, tmp: Path, card: bytes, model: bytes) -> AnomalyModel:
    where = write(tmp / "v2", card, model)
    return active.sibling(load_card(where / f"{PUMP}{CARD_SUFFIX}"), where, tag="v2")


def _slot(tmp: Path) -> tuple[Slot, np.random.Generator]:
    rng = np.random.default_rng(5)
    active = pump_model(tmp)
    commission(active, rng)
    return Slot(active, state_dir=tmp), rng


def test_a_candidate_meeting_its_rules_is_promoted_and_the_replaced_version_kept(tmp_path: Path) -> None:
    slot, rng = _slot(tmp_path)
    model, card = shipped_int8()
    how = slot.stage(_candidate(slot.active, tmp_path, card, model), 2, Acceptance(windows=15))
    assert how.startswith("carried over for 1 subject")  # commissioned at once: judged from the first window
    first = slot.active
    for k in range(14):
        (r,) = slot.score_batch([pump_window(100 + k, rng)])
        assert r.verdict == "normal"
        assert slot.version == 0
    shadow = slot.candidate
    assert shadow is not None
    assert (shadow["version"], shadow["judged"], shadow["of"]) == (2, 14, 15)
    slot.score_batch([pump_window(200, rng)])
    (outcome,) = slot.take_outcomes()
    assert (outcome.kind, outcome.version, outcome.reason) == ("promoted", 2, "rules-met")
    assert outcome.figures["windows"] == 15
    assert outcome.figures["alarm_rate"] == 0.0
    assert outcome.figures["agreement"] == 1.0
    assert slot.version == 2
    assert slot.active is not first
    assert slot.previous is first
    assert slot.previous_version == 0
    events = slot.drain_events()
    assert any(
        isinstance(e, Diagnostic)
        and e.kind == "model_update"
        and e.detail["state"] == "promoted"
        and e.detail["reason"] == "rules_met"
        for e in events
    )
    # The promoted version keeps its commissioning statistics in files of its own; those of the
    # version it may roll back to stay as they were (a restart followed by a rollback needs them).
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "models").glob("*.json"))
    assert names == [PUMP, f"{PUMP}.v2"]
    (r,) = pump_model(tmp_path).score_batch([pump_window(300, rng)])  # the shipped one, after a restart
    assert r.reason != "commissioning"


def test_an_alarm_storm_candidate_is_rejected_with_the_reason_and_never_alarms(tmp_path: Path) -> None:
    slot, rng = _slot(tmp_path)
    storm = onnx_model(constant=0.99)  # every window far above the card's threshold
    slot.stage(_candidate(slot.active, tmp_path, card_for(storm), storm), 3, Acceptance(windows=10))
    flagged = []
    for k in range(10):
        (r,) = slot.score_batch([pump_window(100 + k, rng)])  # normal data
        flagged.append(r.anomaly)
    assert not any(flagged)  # the verdicts served are the active version's
    (outcome,) = slot.take_outcomes()
    assert (outcome.kind, outcome.reason) == ("rejected", "alarm-rate")
    assert outcome.figures["alarm_rate"] == 1.0
    assert "alarm rate 1.000 over 10 windows > 0.2" in outcome.detail
    assert slot.version == 0
    assert slot.candidate is None
    assert slot.previous is None
    # The candidate's anomalies were counted, not raised: only the slot's own notice comes out,
    # in plain tokens the anonymizer lets through to the twin.
    (notice,) = [e for e in slot.drain_events() if isinstance(e, Diagnostic)]
    assert (notice.kind, notice.detail["state"], notice.detail["reason"]) == (
        "model_update",
        "rejected",
        "alarm_rate",
    )
    Anonymizer(Pseudonymizer(b"c" * 32), time_mode="relative", start_wall=1.7e9).diagnostic(notice)


def test_a_candidate_that_disagrees_or_returns_nan_in_shadow_is_rejected(tmp_path: Path) -> None:
    slot, rng = _slot(tmp_path)
    nan = onnx_model(nan_above=20.0)
    slot.stage(_candidate(slot.active, tmp_path, card_for(nan), nan), 4, Acceptance(windows=30))
    slot.score_batch([pump_window(100, rng)])
    assert slot.take_outcomes() == []
    # Inputs far from normal: its NaN is a health event during the shadow, none allowed.
    (r,) = slot.score_batch([pump_window(101, rng, shift={"Current": 0.5})])
    assert not r.fallback  # the active version judged it
    (outcome,) = slot.take_outcomes()
    assert (outcome.kind, outcome.reason) == ("rejected", "health")


def test_a_promoted_model_that_returns_nan_is_rolled_back_within_the_window(tmp_path: Path) -> None:
    slot, rng = _slot(tmp_path)
    nan = onnx_model(nan_above=20.0)  # finite on normal windows, NaN once an input is far out
    slot.stage(_candidate(slot.active, tmp_path, card_for(nan), nan), 5, Acceptance(windows=10))
    for k in range(10):
        slot.score_batch([pump_window(100 + k, rng)])
    (promoted,) = slot.take_outcomes()
    assert promoted.kind == "promoted"
    assert slot.version == 5
    (r,) = slot.score_batch([pump_window(120, rng)])
    assert r.verdict == "normal"
    assert not r.fallback
    # A fault: the new version's score is NaN; the old one is back and judges this very window.
    (r,) = slot.score_batch([pump_window(121, rng, shift={"Current": 0.5})])
    (rolled,) = slot.take_outcomes()
    assert (rolled.kind, rolled.version, rolled.reason, rolled.restored) == (
        "rolled-back",
        5,
        "non-finite-output",
        0,
    )
    assert slot.version == 0
    assert slot.previous is None
    assert not r.fallback
    assert math.isfinite(r.score)
    (r,) = slot.score_batch([pump_window(122, rng)])
    assert r.verdict == "normal"
    assert not r.fallback


def test_a_version_over_its_latency_budget_is_judged_by_its_median_not_rejected_or_rolled_back(
    tmp_path: Path,
) -> None:
    """Load alone neither rejects a candidate nor rolls a promoted one back: the median rule judges time."""
    rng = np.random.default_rng(5)
    # Every window takes 10 ms of the model's clock, ten times the card's budget: over budget after
    # three batches, as on a machine under load (the candidate shares the serving version's clock).
    active = pump_model(tmp_path, clock=itertools.count(0.0, 0.01).__next__)
    commission(active, rng)
    slot = Slot(active, state_dir=tmp_path)
    model, card = shipped_int8()
    candidate = _candidate(slot.active, tmp_path, card, model)
    slot.stage(candidate, 2, Acceptance(windows=10, max_latency_us=50_000.0))
    for k in range(10):
        slot.score_batch([pump_window(100 + k, rng)])
    assert candidate.over_budget
    (outcome,) = slot.take_outcomes()
    assert (outcome.kind, outcome.reason) == ("promoted", "rules-met")
    for k in range(5):
        (r,) = slot.score_batch([pump_window(120 + k, rng)])
        assert r.verdict == "normal"
    assert slot.take_outcomes() == []
    assert (slot.version, slot.active) == (2, candidate)
    assert slot.stats()["state"] == "over_budget"


def test_an_alarm_storm_after_promotion_rolls_back(tmp_path: Path) -> None:
    slot, rng = _slot(tmp_path)
    jumpy = onnx_model(alarm_above=20.0)  # normal on normal data, an anomaly on every window far out
    slot.stage(
        _candidate(slot.active, tmp_path, card_for(jumpy), jumpy), 6, Acceptance(windows=5, storm_windows=4)
    )
    for k in range(5):
        slot.score_batch([pump_window(100 + k, rng)])
    assert slot.take_outcomes()[0].kind == "promoted"
    for k in range(3):
        (r,) = slot.score_batch([pump_window(110 + k, rng, shift={"Current": 0.5})])
        assert r.anomaly
    assert slot.take_outcomes() == []
    slot.score_batch([pump_window(113, rng, shift={"Current": 0.5})])
    (rolled,) = slot.take_outcomes()
    assert (rolled.kind, rolled.reason) == ("rolled-back", "alarm-storm")
    assert slot.version == 0


def test_a_restart_serves_the_promoted_version_and_can_still_roll_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, card = shipped_int8()
    write(tmp_path / "models" / "bundles" / PUMP / "v7", card, model)
    # Which version serves is on disk before the promotion counts: a power cut must not leave an
    # empty active.json (the shipped model would serve), so it is synced, renamed, its folder synced.
    synced = synced_during(monkeypatch, lambda: write_installed(tmp_path, PUMP, 7, 0))
    assert [p.name for p in synced] == [".active.json.tmp", PUMP]
    assert read_installed(tmp_path, PUMP) == (7, 0)
    shipped = pump_model(tmp_path)
    (slot,) = open_slots([shipped], tmp_path)
    assert slot.version == 7
    assert slot.previous is shipped
    assert slot.previous_version == 0
    assert slot.active.backend.precision == "fp32"  # the bundle's card: its one file
    assert slot.active.card.version == "1.1.0"
    # A version that does not load: the shipped model serves, said in the log.
    (tmp_path / "models" / "bundles" / PUMP / "v7" / "pump_skab.int8.onnx").write_bytes(b"garbage")
    (slot,) = open_slots([shipped], tmp_path)
    assert slot.version == 0
    assert slot.active is shipped


def test_a_version_staged_over_one_in_shadow_supersedes_it(tmp_path: Path) -> None:
    slot, rng = _slot(tmp_path)
    model, card = shipped_int8()
    slot.stage(_candidate(slot.active, tmp_path, card, model), 2, Acceptance(windows=50))
    slot.score_batch([pump_window(100, rng)])
    slot.stage(_candidate(slot.active, tmp_path, card, model), 3, Acceptance(windows=50))
    (outcome,) = slot.take_outcomes()
    assert (outcome.kind, outcome.version, outcome.reason) == ("rejected", 2, "superseded")
    shadow = slot.candidate
    assert shadow is not None
    assert (shadow["version"], shadow["judged"]) == (3, 0)


def test_a_version_that_recommissions_and_judges_nothing_in_its_period_is_rejected(tmp_path: Path) -> None:
    slot, rng = _slot(tmp_path)
    model = onnx_model()
    card = card_for(model, commissioning_on_update="redo")
    how = slot.stage(
        _candidate(slot.active, tmp_path, card, model), 2, Acceptance(windows=None, seconds=1e-6)
    )
    assert how == "redo"
    (r,) = slot.score_batch([pump_window(100, rng)])  # still learning its own statistics
    assert r.verdict == "normal"  # the active version's verdict
    (outcome,) = slot.take_outcomes()
    assert (outcome.kind, outcome.reason) == ("rejected", "no-windows")


def test_a_period_in_windows_whose_windows_never_come_ends_at_max_wait(tmp_path: Path) -> None:
    slot, rng = _slot(tmp_path)
    model, card = shipped_int8()
    rules = Acceptance(windows=30, max_wait_s=600)
    slot.stage(_candidate(slot.active, tmp_path, card, model), 2, rules)
    slot.expire()  # just staged: nothing is over
    assert slot.take_outcomes() == []
    for k in range(3):  # three windows, then the subject is no longer scored
        slot.score_batch([pump_window(100 + k, rng)])
    slot.expire(time.monotonic() + 599)
    assert slot.take_outcomes() == []
    slot.expire(time.monotonic() + 601)
    (outcome,) = slot.take_outcomes()
    assert (outcome.kind, outcome.version, outcome.reason) == ("rejected", 2, "too-few-windows")
    assert "judged 3 of 30 windows" in outcome.detail
    assert slot.candidate is None
    assert slot.version == 0
    (r,) = slot.score_batch([pump_window(200, rng)])  # the serving version goes on, nothing decided twice
    assert r.verdict == "normal"
    assert slot.take_outcomes() == []

    slot.stage(_candidate(slot.active, tmp_path, card, model), 3, rules)
    slot.expire(time.monotonic() + 601)
    (outcome,) = slot.take_outcomes()
    assert (outcome.kind, outcome.version, outcome.reason) == ("rejected", 3, "no-windows")


def test_a_period_in_seconds_ends_by_the_clock_when_no_window_comes(tmp_path: Path) -> None:
    slot, rng = _slot(tmp_path)
    model, card = shipped_int8()
    slot.stage(_candidate(slot.active, tmp_path, card, model), 2, Acceptance(windows=None, seconds=60))
    for k in range(5):
        slot.score_batch([pump_window(100 + k, rng)])
    assert slot.take_outcomes() == []  # the windows alone do not end a period in seconds
    slot.expire(time.monotonic() + 61)
    (outcome,) = slot.take_outcomes()
    assert (outcome.kind, outcome.version, outcome.reason) == ("promoted", 2, "rules-met")
    assert outcome.figures["windows"] == 5
    assert slot.version == 2


def test_a_period_in_seconds_longer_than_the_longest_wait_is_refused() -> None:
    with pytest.raises(ValueError, match="max_wait_s"):
        Acceptance(windows=None, seconds=7200, max_wait_s=3600)


def test_ks_statistic() -> None:
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([1, 2, 3], [10, 11, 12]) == 1.0
    assert 0.3 < ks_statistic(list(range(10)), list(range(5, 15))) < 0.7
