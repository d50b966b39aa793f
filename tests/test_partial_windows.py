"""A window that holds only part of its span is not judged as if it were whole (``partial``).

After a start, and after a stream returns from an outage, a model's window holds only the seconds
since; below ``min_coverage`` of an input's expected samples the verdict is indeterminate and the
window neither commissions nor adapts the model.  Streams without a nominal rate are never partial
for being sparse, and steady-state windows (a dropped sample) are judged as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from model_support import pump_1hz, pump_1hz_config
from test_alarm_campaign import alarm_records

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import DEFAULT_MIN_COVERAGE, StreamFeatures, WindowRecord
from gateway.inference.build import build_models
from gateway.inference.novelty import NoveltyModel, NoveltyUse
from gateway.inference.streams import StreamChange, StreamUse
from gateway.outbox import AsyncOutbox, Outbox
from gateway.pipeline.windows import Windower
from gateway.runtime import Pipeline
from gateway.sample import SampleBlock, Stream, industrial_metric

T0 = 1000.0
WALL = 1.7e9
SUBJECT = "line2-m3"  # the simulated pump of model_support
COMMISSION_S = 30.0  # 30 windows at the 1 s hop
PARTIAL_AT_START = 15  # pump_skab's 20 s window at 1 Hz: 1..15 samples < 0.8 x 20


def run_pump(
    tmp: Path, seconds: int, keep: Callable[[str, int], bool] = lambda _name, _k: True
) -> list[tuple[str, int, str]]:
    """The simulated pump at 1 Hz through the composed pipeline with pump_skab; one run of the gateway.

    Per window (end ``T0 + j``): ``("partial", j, "")``, ``("commissioning", j, "")`` or
    ``("judged", j, state)``, read from the model's own counters as the status board reads them.
    ``keep(stream, k)``: whether the sample of second ``k`` of that stream is delivered.
    """
    config = pump_1hz_config(
        tmp, {"streams": {"enabled": False}, "use": [{"name": "pump_skab", "commissioning_s": COMMISSION_S}]}
    )
    (model,) = build_models(config.core.models, hop_s=1.0, state_dir=tmp, fault_alarms=False)
    gen, streams = pump_1hz(7)

    async def main() -> list[tuple[str, int, str]]:
        anon = Anonymizer(Pseudonymizer(b"f" * 32), time_mode="relative", start_wall=WALL)
        out: list[tuple[str, int, str]] = []
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            pipeline = Pipeline(config, anon, outbox, [model])
            for k in range(seconds):
                for name, series in gen.generate(float(k), k + 1.0).series.items():
                    if len(series) and keep(name, k):
                        t = T0 + series.t
                        pipeline.sink.put_block(
                            SampleBlock(streams[name], t, WALL + t, series.value, series.quality)
                        )
                before = model.stats()
                assert await pipeline.step(now_mono=T0 + k + 1.0, now_wall=WALL + T0 + k + 1.0) == 1
                after = model.stats()
                state = model.subject_states().get(SUBJECT, "")
                if after["partial_windows"] != before["partial_windows"]:
                    out.append(("partial", k + 1, ""))
                elif after["model_windows"] != before["model_windows"]:
                    out.append(("judged", k + 1, state))
                else:
                    out.append(("commissioning", k + 1, state))
            await alarm_records(outbox, pipeline)  # every window sent: none refused
        return out

    return asyncio.run(main())


def kinds(rows: list[tuple[str, int, str]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for kind, j, _ in rows:
        out.setdefault(kind, []).append(j)
    return out


def test_after_a_start_and_a_restart_the_first_windows_are_neither_judged_nor_commissioned_on(
    tmp_path: Path,
) -> None:
    need = round(COMMISSION_S)
    first = kinds(run_pump(tmp_path, 70))
    # The first windows hold 1..15 of the 20 s: partial, not commissioning windows.
    assert first["partial"] == list(range(1, PARTIAL_AT_START + 1))
    # Commissioning takes `need` whole windows after them (before: the partial ones counted).
    assert first["commissioning"] == list(range(PARTIAL_AT_START + 1, PARTIAL_AT_START + need + 1))
    # Steady state: every whole window is judged.
    assert first["judged"] == list(range(PARTIAL_AT_START + need + 1, 71))
    # A restart on the same state: commissioned already, yet its first windows hold the seconds
    # since the start only, and are not judged.
    again = kinds(run_pump(tmp_path, 25))
    assert again["partial"] == list(range(1, PARTIAL_AT_START + 1))
    assert again["judged"] == list(range(PARTIAL_AT_START + 1, 26))
    assert "commissioning" not in again


def test_a_stream_back_from_an_outage_is_partial_until_it_fills_the_window(tmp_path: Path) -> None:
    # Current is silent for 20 s (seconds 60..79): the windows lose it, one is a gap, then it returns.
    # One Voltage sample is dropped at second 100: a window short of one sample is still whole.
    def keep(name: str, k: int) -> bool:
        if name.endswith("/Current"):
            return not 60 <= k < 80
        return not (name.endswith("/Voltage") and k == 100)

    got = {j: kind for kind, j, _ in run_pump(tmp_path, 130, keep)}
    start = PARTIAL_AT_START + round(COMMISSION_S)
    assert all(got[j] == "judged" for j in range(start + 1, 65))  # Current holds 19..16 of 20
    # Window j holds Current's seconds j-20..59: 15 down to 1 of 20.
    assert [j for j in range(65, 80) if got[j] == "partial"] == list(range(65, 80))
    # A gap (no sample at all) stays what it was: an absent input at its normal value.
    assert got[80] == "judged"
    # Back: window j holds Current's seconds 80..j-1; partial until 16 of them.
    assert [j for j in range(81, 96) if got[j] == "partial"] == list(range(81, 96))
    assert all(got[j] == "judged" for j in range(96, 131))  # the dropped Voltage sample included


# ---- the detectors that learn per machine: novelty and the per-stream detector -------------------

A = Stream("plc", "pump-1", "PLC-1", industrial_metric("Flow", "l/min"), kind="industrial", rate_hz=1.0)
B = Stream("plc", "pump-1", "PLC-1", industrial_metric("Pressure", "bar"), kind="industrial", rate_hz=1.0)
# An event series: no nominal rate, a sample now and then.
E = Stream("plc", "pump-1", "PLC-1", industrial_metric("Strokes", "1"), kind="industrial", rate_hz=None)


def record(k: int, counts: dict[Stream, int], rng: np.random.Generator, length: float = 10.0) -> WindowRecord:
    """A window holding ``counts`` samples of each stream (of ``length`` expected at 1 Hz)."""
    streams = []
    for s in (A, B, E):
        n = counts.get(s, 10)
        expected = None if s.rate_hz is None else length * s.rate_hz
        miss = (0.0 if n else 1.0) if expected is None else max(0.0, 1.0 - n / expected)
        feats = {"mean": 20.0 + rng.standard_normal()} if n else {}
        streams.append(StreamFeatures(s, n, miss, feats))
    return WindowRecord("pump-1", "industrial", k, float(k), WALL + k, length, tuple(streams))


def test_novelty_neither_commissions_on_nor_judges_partial_windows() -> None:
    rng = np.random.default_rng(5)
    model = NoveltyModel(NoveltyUse(ewma=1.0, commissioning_s=30.0), hop_s=1.0)
    need = model.commissioning_windows
    # The first 7 windows after a start hold 1..7 of Flow's 10 s; the event series has 1 sample.
    starting = [model.score_batch([record(k, {A: k + 1, B: 10, E: 1}, rng)])[0] for k in range(7)]
    assert [r.reason for r in starting] == ["partial"] * 7
    assert model.coverage.partial_windows == 7
    results = [model.score_batch([record(7 + k, {E: 1}, rng)])[0] for k in range(need + 20)]
    # Commissioned on `need` whole windows after them, not on the partial ones.
    assert [r.reason for r in results[:need]] == ["commissioning"] * need
    assert model.fit_of("pump-1") is not None
    judged = [r for r in results[need:] if r.verdict != "indeterminate"]
    assert judged  # scored once settled, the sparse event series never partial
    assert model.coverage.partial_windows == 7
    # A stream back from an outage: partial, and no adaptation of the standardisation.
    fit = model.fit_of("pump-1")
    assert fit is not None
    mean = fit.mean.copy()
    (r,) = model.score_batch([record(999, {B: 3}, rng)])
    assert (r.verdict, r.reason) == ("indeterminate", "partial")
    assert np.array_equal(fit.mean, mean)


def test_the_per_stream_detector_learns_and_judges_each_stream_on_whole_windows_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(6)
    det = StreamChange(StreamUse(commissioning_s=30.0), hop_s=1.0)
    need = det.commissioning_windows
    commissioned: dict[str, int] = {}
    caplog.set_level("INFO", logger="gateway.inference.streams")
    for k in range(need + 20):
        # Flow holds 1..7 of its 10 s in the first 7 windows (a start); the others are whole or sparse.
        (r,) = det.score_batch([record(k, {A: k + 1} if k < 7 else {}, rng)])
        for rec in caplog.records:
            for name in ("Flow", "Pressure", "Strokes"):
                if rec.getMessage().endswith(f"stream {name} commissioned"):
                    commissioned.setdefault(name, k)
    # Each stream learns from its own whole windows: Flow skipped its partial ones.
    assert commissioned == {"Pressure": need - 1, "Strokes": need - 1, "Flow": need - 1 + 7}
    assert r.verdict == "normal"
    assert det.coverage.partial_windows == 0  # the others were judged meanwhile: no window unjudged
    # A window where the only stream left to judge is partial: indeterminate, counted.
    only_a = WindowRecord(
        "pump-1", "industrial", 900, 900.0, WALL + 900, 10.0, (StreamFeatures(A, 2, 0.8, {"mean": 20.0}),)
    )
    (r,) = det.score_batch([only_a])
    assert r.reason == "partial"
    assert det.coverage.partial_windows == 1


def test_the_windower_counts_expected_samples_from_the_nominal_rate_only() -> None:
    """What ``partial`` rests on: a sparse stream without a nominal rate is whole when it has a sample."""
    w = Windower(window_s=10.0, hop_s=1.0, grace_s=0.0, lost_after_s=60.0, on_alarm=lambda _a: None)
    onchange = Stream("plc", "pump-1", "PLC-1", industrial_metric("Valve", "1"), "industrial", None, True)
    records = []
    for k in range(40):
        t = np.array([T0 + k + 0.5])
        w.put_block(SampleBlock(A, t, WALL + t, np.array([1.0]), np.zeros(1, np.uint8)))
        if k % 7 == 0:  # a change now and then
            w.put_block(SampleBlock(onchange, t, WALL + t, np.array([k % 2]), np.zeros(1, np.uint8)))
        records += w.close_due(T0 + k + 1.0, WALL + T0 + k + 1.0)
    share = DEFAULT_MIN_COVERAGE
    for rec in records:
        a, v = sorted(rec.streams, key=lambda sf: sf.stream.metric.name != "Flow")
        held = round(rec.end_mono - T0)
        assert a.partial(share) == (held < 8), held
        assert not v.partial(share)  # 1 or 2 changes in 10 s: sparse, not partial
    assert not StreamFeatures(A, 0, 1.0, {}).partial(share)  # a gap is not partial


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_min_coverage_is_a_setting_of_each_model(share: float) -> None:
    config = validate(
        {
            "models": {
                "use": [{"name": "pump_skab", "min_coverage": share}],
                "novelty": {"min_coverage": share},
                "streams": {"min_coverage": share},
            }
        },
        "<partial>",
        REGISTRY,
    )
    models = config.core.models
    (model,) = build_models(models, hop_s=1.0)
    assert model.coverage.min_coverage == share
    assert models.novelty is not None
    assert models.novelty.min_coverage == share
    assert models.streams is not None
    assert models.streams.min_coverage == share


def test_a_flagged_stream_that_holds_part_of_its_window_keeps_the_episode_open() -> None:
    """Inside a change, a window where the flagged stream is partial says nothing about the subject."""
    rng = np.random.default_rng(8)
    det = StreamChange(StreamUse(commissioning_s=30.0), hop_s=1.0)
    for k in range(det.commissioning_windows):
        det.score_batch([record(k, {}, rng)])

    def window(k: int, flow: float, held: int) -> WindowRecord:
        streams = (
            StreamFeatures(A, held, 1.0 - held / 10, {"mean": flow}),
            StreamFeatures(B, 10, 0.0, {"mean": 20.0}),
        )
        return WindowRecord("pump-1", "industrial", k, float(k), WALL + k, 10.0, streams)

    (r,) = det.score_batch([window(100, 80.0, 10)])  # Flow steps far off its level: flagged
    assert r.verdict == "anomalous"
    (r,) = det.score_batch([window(101, 20.0, 3)])  # then holds 3 s of its window: not "normal"
    assert (r.verdict, r.reason) == ("indeterminate", "partial")
    assert det.coverage.partial_windows == 1


def test_a_flagged_stream_in_a_gap_keeps_the_episode_open() -> None:
    """Inside a change, a window where the flagged stream has no sample at all is a gap, not normal."""
    rng = np.random.default_rng(8)
    det = StreamChange(StreamUse(commissioning_s=30.0), hop_s=1.0)
    for k in range(det.commissioning_windows):
        det.score_batch([record(k, {}, rng)])

    def window(k: int, flow: float | None) -> WindowRecord:
        a = StreamFeatures(A, 0, 1.0, {}) if flow is None else StreamFeatures(A, 10, 0.0, {"mean": flow})
        streams = (a, StreamFeatures(B, 10, 0.0, {"mean": 20.0}))
        return WindowRecord("pump-1", "industrial", k, float(k), WALL + k, 10.0, streams)

    (r,) = det.score_batch([window(100, 80.0)])  # Flow steps far off its level: flagged
    assert r.verdict == "anomalous"
    for k in (101, 102, 103):  # its sensor is out: the other stream alone cannot end the change
        (r,) = det.score_batch([window(k, None)])
        assert (r.verdict, r.reason) == ("indeterminate", "gap")
    (r,) = det.score_batch([window(104, 80.0)])  # back, still off its level: the same change
    assert r.verdict == "anomalous"
