"""A stream whose unit changes: the detectors that commissioned on it learn it again, never judge
its new values against a baseline in the old unit (a false change) nor keep such a baseline.

The per-stream detector recommissions that stream, the novelty detector the subject (its inputs
are tied together in their commissioning spreads); both say so once in the log and in the status
until commissioned again, keep each baseline's unit in their state files, and load the state
files stored before units were kept with the units unknown (kept, taken from the next window).
A unit spelt another way (``°F`` for ``[degF]``) is the same unit, an empty one unknown: nothing is
recommissioned.  A change open when its unit changes stays open, indeterminate, until recommissioned.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_novelty import single_stream

from gateway.alarms.episodes import EpisodeTracker
from gateway.contracts import AlarmKind, StreamFeatures, WindowRecord
from gateway.inference.novelty import NoveltyModel, NoveltyUse
from gateway.inference.streams import StreamChange, StreamUse
from gateway.sample import Metric, Stream, industrial_metric
from models.recipes.novelty_tep import machine_rows, window_records

TAG = "Tank1/Temperature"


def relabel(
    records: list[WindowRecord], name: str, metric: Metric, convert: Callable[[float], float] = float
) -> list[WindowRecord]:
    """The records with the stream measuring ``name`` reported as ``metric``, its values ``convert``-ed."""
    return [
        dataclasses.replace(
            r,
            streams=tuple(
                dataclasses.replace(
                    sf,
                    stream=dataclasses.replace(sf.stream, metric=metric),
                    features={k: convert(v) for k, v in sf.features.items()},
                )
                if sf.stream.metric.name == name
                else sf
                for sf in r.streams
            ),
        )
        for r in records
    ]


def tag_windows(values: np.ndarray, unit: str, start: int = 0) -> list[WindowRecord]:
    """Window records of one temperature tag in ``unit``, one a second from window ``start``."""
    return relabel(single_stream(values, start), "Tank1/Level", industrial_metric(TAG, unit))


def celsius(n: int, seed: int) -> np.ndarray:
    """A tank held at 50 degC, noise 0.05."""
    return 50.0 + 0.05 * np.random.default_rng(seed).standard_normal(n)


def to_fahrenheit(c: np.ndarray) -> np.ndarray:
    return c * 1.8 + 32.0


USE = StreamUse(commissioning_s=300.0)


def test_the_per_stream_detector_recommissions_a_stream_whose_unit_changed_across_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path)
    need = det.commissioning_windows
    res = det.score_batch(tag_windows(celsius(need + 100, 1), "Cel"))
    assert not any(r.anomaly for r in res[need:])
    assert det.subject_states() == {"tank-1": "active"}
    # The PLC now reports the same temperature in degF: 122 degF is 1,440 spreads off 50 degC.
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path)
    with caplog.at_level(logging.INFO, "gateway.inference.streams"):
        res = det.score_batch(tag_windows(to_fahrenheit(celsius(need + 200, 2)), "[degF]", start=need + 100))
    assert not any(r.anomaly for r in res), "a change of unit judged as a change of the process"
    assert [r.reason for r in res[:need]] == ["commissioning"] * need
    said = [r.getMessage() for r in caplog.records if "unit changed" in r.getMessage()]
    assert len(said) == 1, said
    assert "from degC to degF" in said[0]
    state = json.loads(next((tmp_path / "models").glob("stream_change-*.json")).read_text())
    assert state["key"][0] == 3
    assert state["streams"][TAG]["unit"] == "degF"
    assert abs(state["streams"][TAG]["level"] - 122.0) < 0.1  # the baseline is in the new unit
    assert det.subject_states() == {"tank-1": "active"}
    # The same unit spelt as an OPC UA display name is no change: judged against the degF baseline.
    res = det.score_batch(tag_windows(to_fahrenheit(celsius(50, 7)), "°F", start=2 * need + 300))
    assert all(r.reason != "commissioning" for r in res)
    assert not any(r.anomaly for r in res)
    # Judged in degF from then on: a step of a degree F is found.
    res = det.score_batch(tag_windows(to_fahrenheit(celsius(100, 3)) + 1.0, "[degF]", start=2 * need + 350))
    assert any(r.anomaly for r in res)


def test_during_a_run_the_status_says_why_it_commissions_until_it_has(tmp_path: Path) -> None:
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path)
    need = det.commissioning_windows
    det.score_batch(tag_windows(celsius(need + 10, 4), "Cel"))
    fahr = to_fahrenheit(celsius(need, 5))
    res = det.score_batch(tag_windows(fahr[:10], "[degF]", start=need + 10))
    assert not any(r.anomaly for r in res)
    assert det.subject_states() == {"tank-1": f"commissioning (unit changed from degC to degF: {TAG})"}
    res = det.score_batch(tag_windows(fahr[10:], "[degF]", start=need + 20))
    assert not any(r.anomaly for r in res)
    assert res[-1].reason == "commissioning"  # the last one completes it
    assert det.subject_states() == {"tank-1": "active"}


def test_a_restart_while_a_stream_commissions_again_does_not_bring_the_old_baseline_back(
    tmp_path: Path,
) -> None:
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path)
    need = det.commissioning_windows
    det.score_batch(tag_windows(celsius(need + 10, 4), "Cel"))
    det.score_batch(tag_windows(to_fahrenheit(celsius(10, 5)), "[degF]", start=need + 10))
    # Stored at once: a restart in the middle goes on commissioning in degF (from the windows it
    # had stored, as any commissioning), the old baseline does not come back, the status says why.
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path)
    more = tag_windows(to_fahrenheit(celsius(need, 6)), "[degF]", start=need + 20)
    res = det.score_batch(more[:1])
    assert det.subject_states() == {"tank-1": f"commissioning (unit changed from degC to degF: {TAG})"}
    res = [*res, *det.score_batch(more[1:])]
    assert not any(r.anomaly for r in res)
    assert res[0].reason == "commissioning"
    assert det.subject_states() == {"tank-1": "active"}


def commissioned_as_version_2(tmp_path: Path, seed: int) -> tuple[Path, int]:
    """A tag commissioned in Cel, its state file rewritten as version 2 wrote it (no unit per stream)."""
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path)
    need = det.commissioning_windows
    det.score_batch(tag_windows(celsius(need, seed), "Cel"))
    path = next((tmp_path / "models").glob("stream_change-*.json"))
    state = json.loads(path.read_text())
    state["key"][0] = 2
    for s in state["streams"].values():
        del s["unit"]
    path.write_text(json.dumps(state))
    return path, need


def test_a_per_stream_state_stored_without_units_is_kept_and_takes_the_next_window_s_unit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, need = commissioned_as_version_2(tmp_path, 8)
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path)
    with caplog.at_level(logging.INFO, "gateway.inference.streams"):
        res = det.score_batch(tag_windows(celsius(20, 9), "Cel", start=need))
    assert all(r.reason != "commissioning" and not r.anomaly for r in res)  # kept
    assert any("no units (version 2)" in r.getMessage() for r in caplog.records)
    # From then on in that unit: a later change of unit recommissions the stream.
    res = det.score_batch(tag_windows(to_fahrenheit(celsius(20, 10)), "[degF]", start=need + 20))
    assert all(r.reason == "commissioning" and not r.anomaly for r in res)


def tank_windows(temps: np.ndarray, unit: str, start: int) -> list[WindowRecord]:
    """Window records of a tank's temperature (in ``unit``) beside its pressure (bar, 2.0)."""
    temp = Stream("plc", "tank-1", "SN", industrial_metric(TAG, unit), "industrial", 1.0)
    press = Stream("plc", "tank-1", "SN", industrial_metric("Tank1/Pressure", "bar"), "industrial", 1.0)
    noise = 0.01 * np.random.default_rng(start).standard_normal(len(temps))
    return [
        WindowRecord(
            "tank-1",
            "industrial",
            start + i,
            float(start + i),
            1e9 + start + i,
            1.0,
            (
                StreamFeatures(press, 10, 0.0, {"mean": 2.0 + float(p)}),
                StreamFeatures(temp, 10, 0.0, {"mean": float(t)}),
            ),
        )
        for i, (t, p) in enumerate(zip(temps, noise, strict=True))
    ]


def test_a_change_open_when_its_stream_s_unit_changes_is_neither_cleared_nor_judged_until_recommissioned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path)
    need = det.commissioning_windows
    det.score_batch(tank_windows(celsius(need + 50, 20), "Cel", 0))
    episodes = EpisodeTracker(clear_after=2)
    said = []
    for r in det.score_batch(tank_windows(celsius(10, 21) + 10.0, "Cel", need + 50)):  # overheated: 60 degC
        e = episodes.update(("tank-1", "stream_change"), r)
        said += [e.kind] if e else []
    assert said == [AlarmKind.ANOMALY]
    # The PLC now reports the same overheated tank in degF, the pressure normal throughout.
    with caplog.at_level(logging.INFO, "gateway.inference.streams"):
        res = det.score_batch(tank_windows(to_fahrenheit(celsius(need, 22) + 10.0), "[degF]", need + 60))
    for r in res:
        e = episodes.update(("tank-1", "stream_change"), r)
        said += [e.kind] if e else []
    assert all(r.verdict == "indeterminate" and r.reason == "unit_changed" for r in res)
    assert AlarmKind.ANOMALY_CLEARED not in said, said
    assert said == [AlarmKind.ANOMALY, AlarmKind.ANOMALY_INDETERMINATE]
    # Commissioned on the overheated values: said, the change still open.
    assert any("while its change was open" in r.getMessage() for r in caplog.records)
    assert det.score_batch(tank_windows(to_fahrenheit(celsius(1, 27) + 10.0), "[degF]", 2 * need + 60))[
        0
    ].anomaly


def test_an_unread_unit_is_unknown_not_a_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path)
    need = det.commissioning_windows
    fahr = to_fahrenheit(celsius(need + 30, 23))
    det.score_batch(tag_windows(fahr[:need], "[degF]"))
    # Restarted with the unit not read (the OPC UA driver gives ""), then read again.
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path)
    with caplog.at_level(logging.INFO, "gateway.inference.streams"):
        res = det.score_batch(tag_windows(fahr[need : need + 10], "", start=need))
        res = [*res, *det.score_batch(tag_windows(fahr[need + 10 :], "[degF]", start=need + 10))]
    assert not any("unit changed" in r.getMessage() for r in caplog.records)
    assert all(r.reason == "" and not r.anomaly for r in res)
    assert det.subject_states() == {"tank-1": "active"}
    # A stream first seen without its unit takes it from the first window that has one.
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path / "new")
    det.score_batch(tag_windows(fahr[:need], ""))
    det.score_batch(tag_windows(fahr[need : need + 5], "[degF]", start=need))
    path = next((tmp_path / "new" / "models").glob("stream_change-*.json"))
    assert json.loads(path.read_text())["streams"][TAG]["unit"] == "degF"


def test_a_unit_taken_for_a_state_stored_without_units_is_stored_at_once(tmp_path: Path) -> None:
    path, need = commissioned_as_version_2(tmp_path, 24)
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path)
    det.score_batch(tag_windows(celsius(5, 25), "Cel", start=need))
    assert json.loads(path.read_text())["streams"][TAG]["unit"] == "degC"
    # So a change while the gateway is down is seen at the restart.
    det = StreamChange(USE, hop_s=1.0, state_dir=tmp_path)
    res = det.score_batch(tag_windows(to_fahrenheit(celsius(30, 26)), "[degF]", start=need + 5))
    assert all(r.reason == "commissioning" and not r.anomaly for r in res)


NOVELTY = NoveltyUse(commissioning_s=150.0, adapt_rate=0.0)
TEMP = "Pump1/Temperature"


def in_fahrenheit(records: list[WindowRecord]) -> list[WindowRecord]:
    """The records with the machine's temperature reported in degF (values and unit)."""
    return relabel(records, TEMP, industrial_metric(TEMP, "[degF]"), lambda v: v * 1.8 + 32.0)


def in_celsius(records: list[WindowRecord]) -> list[WindowRecord]:
    """The records with the machine's temperature labelled degC (the generated values are)."""
    return relabel(records, TEMP, industrial_metric(TEMP, "Cel"))


def commissioned_machine(state_dir: Path, rng: np.random.Generator) -> tuple[Path, int]:
    """A machine commissioned with its temperature in degC: its state file and commissioning windows."""
    model = NoveltyModel(NOVELTY, hop_s=1.0, state_dir=state_dir)
    need = model.commissioning_windows
    res = model.score_batch(in_celsius(window_records(machine_rows(need, rng))))
    assert model.fit_of("pump-1") is not None
    assert not any(r.anomaly for r in res)
    return next((state_dir / "models").glob("novelty-*.json")), need


def test_the_novelty_detector_recommissions_a_machine_one_of_whose_inputs_changed_unit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(12)
    path, need = commissioned_machine(tmp_path, rng)
    assert json.loads(path.read_text())["units"][TEMP] == "degC"
    # Restarted with the temperature in degF: 60 degC read as 140 "degC" is hundreds of spreads off.
    model = NoveltyModel(NOVELTY, hop_s=1.0, state_dir=tmp_path)
    later = in_fahrenheit(window_records(machine_rows(need + 100, rng), start=need))
    with caplog.at_level(logging.INFO, "gateway.inference.novelty"):
        res = model.score_batch(later[:10])
    assert not any(r.anomaly for r in res), "a change of unit judged as a fault"
    assert all(r.reason == "commissioning" for r in res)
    said = [r.getMessage() for r in caplog.records if "unit changed" in r.getMessage()]
    assert len(said) == 1, said
    assert f"degC to degF: {TEMP}" in said[0]
    assert model.subject_states() == {"pump-1": f"commissioning (unit changed from degC to degF: {TEMP})"}
    # Commissioned again in the new unit, then judged.
    res = model.score_batch(later[10:])
    assert model.fit_of("pump-1") is not None
    assert model.subject_states()["pump-1"].startswith("active")
    # Judged in degF: normal windows, no episode (alarms are raised on two flagged windows in a
    # row; a lone one is its stated false-alarm rate at work).
    assert not any(a.anomaly and b.anomaly for a, b in itertools.pairwise(res))
    state = json.loads(path.read_text())
    assert state["version"] == 2
    assert state["units"][TEMP] == "degF"


def test_a_novelty_state_stored_without_units_is_kept_until_a_unit_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(13)
    path, need = commissioned_machine(tmp_path, rng)
    state = json.loads(path.read_text())
    state["version"] = 1  # as version 1 wrote it: no units
    del state["units"], state["why"]
    path.write_text(json.dumps(state))
    model = NoveltyModel(NOVELTY, hop_s=1.0, state_dir=tmp_path)
    with caplog.at_level(logging.INFO, "gateway.inference.novelty"):
        res = model.score_batch(in_celsius(window_records(machine_rows(30, rng), start=need)))
    assert model.fit_of("pump-1") is not None  # kept
    assert any(r.reason == "" for r in res)
    assert not any(r.anomaly for r in res)
    assert any("no units (version 1)" in r.getMessage() for r in caplog.records)
    res = model.score_batch(in_fahrenheit(window_records(machine_rows(10, rng), start=need + 30)))
    assert all(r.reason == "commissioning" and not r.anomaly for r in res)


def test_a_novelty_state_stored_without_units_stores_the_units_it_takes_at_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    path, need = commissioned_machine(tmp_path, rng)
    state = json.loads(path.read_text())
    state["version"] = 1
    del state["units"], state["why"]
    path.write_text(json.dumps(state))
    model = NoveltyModel(NOVELTY, hop_s=1.0, state_dir=tmp_path)  # adapt_rate 0: no other save
    model.score_batch(in_celsius(window_records(machine_rows(3, rng), start=need)))
    assert json.loads(path.read_text())["units"][TEMP] == "degC"
    model = NoveltyModel(NOVELTY, hop_s=1.0, state_dir=tmp_path)
    res = model.score_batch(in_fahrenheit(window_records(machine_rows(10, rng), start=need + 3)))
    assert all(r.reason == "commissioning" and not r.anomaly for r in res)


def test_an_unread_unit_does_not_recommission_a_machine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(15)
    path, need = commissioned_machine(tmp_path, rng)
    model = NoveltyModel(NOVELTY, hop_s=1.0, state_dir=tmp_path)
    unread = relabel(window_records(machine_rows(10, rng), start=need), TEMP, industrial_metric(TEMP, ""))
    with caplog.at_level(logging.INFO, "gateway.inference.novelty"):
        res = model.score_batch(unread)
        res = [*res, *model.score_batch(in_celsius(window_records(machine_rows(10, rng), start=need + 10)))]
    assert not any("unit changed" in r.getMessage() for r in caplog.records)
    assert model.fit_of("pump-1") is not None
    assert model.subject_states()["pump-1"].startswith("active")
    assert any(r.reason == "" for r in res)  # judged once warmed up again after the restart
    assert json.loads(path.read_text())["units"][TEMP] == "degC"


def test_a_machine_recommissioned_with_an_anomaly_open_says_so_and_leaves_it_unjudged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(16)
    _, need = commissioned_machine(tmp_path, rng)
    model = NoveltyModel(NOVELTY, hop_s=1.0, state_dir=tmp_path)
    hot = relabel(
        window_records(machine_rows(need + 10, rng), start=need),
        TEMP,
        industrial_metric(TEMP, "Cel"),
        lambda v: v + 20.0,
    )
    res = model.score_batch(hot[:10])
    assert res[-1].anomaly
    in_f = relabel(hot[10:], TEMP, industrial_metric(TEMP, "[degF]"), lambda v: v * 1.8 + 32.0)
    with caplog.at_level(logging.INFO, "gateway.inference.novelty"):
        res = model.score_batch(in_f)
    assert all(r.reason == "unit_changed" and r.verdict == "indeterminate" for r in res)
    assert any("while an anomaly was open" in r.getMessage() for r in caplog.records)
