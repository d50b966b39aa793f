"""Windower: window grid, due logic, alignment, gaps, catch-up, alarms - on synthetic samples."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np
import pytest

from gateway.alarms import fold_device_alarm
from gateway.contracts import Alarm, AlarmKind, WindowRecord
from gateway.errors import ConfigError
from gateway.pipeline.windows import Windower
from gateway.sample import MDC, Metric, Quality, Sample, SampleBlock, Stream, industrial_metric

T0 = 1000.0  # monotonic seconds at the start of every scenario
WALL = 1.7e9  # wall clock = monotonic + WALL - T0 for the devices below


def stream(
    device: str = "dev1",
    *,
    subject: str = "bed1",
    metric: Metric = MDC["MDC_PULS_OXIM_SAT_O2"],
    rate_hz: float | None = 10.0,
    kind: str = "medical",
) -> Stream:
    return Stream("src", subject, device, metric, kind=kind, rate_hz=rate_hz)


def samples(
    s: Stream,
    start: float,
    stop: float,
    rate_hz: float,
    value: float = 1.0,
    quality: Quality = Quality.GOOD,
) -> list[Sample]:
    n = round((stop - start) * rate_hz)
    return [Sample(s, start + i / rate_hz, WALL - T0 + start + i / rate_hz, value, quality) for i in range(n)]


class Rig:
    """A windower plus the alarms it raised."""

    def __init__(
        self,
        *,
        window_s: float = 1.0,
        hop_s: float = 1.0,
        grace_s: float = 0.5,
        lost: float = 3.0,
        restore: float = 2.0,
    ):
        self.alarms: list[Alarm] = []
        self.w = Windower(
            window_s=window_s,
            hop_s=hop_s,
            grace_s=grace_s,
            lost_after_s=lost,
            on_alarm=self.alarms.append,
            restore_after_s=restore,
        )

    def feed(self, items: Iterable[Sample]) -> None:
        for item in items:
            self.w.put(item)

    def close(self, now: float) -> list[WindowRecord]:
        return self.w.close_due(now, WALL - T0 + now)

    def kinds(self) -> list[AlarmKind]:
        return [a.kind for a in self.alarms]


def test_windows_cover_hop_grid_with_features() -> None:
    rig = Rig()
    s = stream()
    rig.feed(samples(s, T0 + 0.05, T0 + 3.05, 10.0, value=7.0))
    recs = rig.close(T0 + 3.5)  # windows ending at T0+1, +2, +3 are due (grace 0.5)
    assert [r.index for r in recs] == [1001, 1002, 1003]
    assert [r.end_mono for r in recs] == [T0 + 1, T0 + 2, T0 + 3]
    for r in recs:
        assert r.subject == "bed1"
        assert r.kind == "medical"
        assert r.length_s == 1.0
        (sf,) = r.streams
        assert sf.stream == s
        assert sf.count == 10
        assert sf.missing == 0.0
        assert sf.features == {"mean": 7.0, "std": 0.0, "min": 7.0, "max": 7.0, "slope": 0.0}
    assert rig.w.counters()["windows"] == 3


def test_first_window_is_the_first_ending_after_the_first_sample() -> None:
    rig = Rig()
    rig.feed(samples(stream(), T0 + 2.3, T0 + 2.6, 10.0))
    (rec,) = rig.close(T0 + 3.5)
    assert rec.index == 1003
    assert rec.streams[0].count == 3
    assert rec.streams[0].missing == pytest.approx(0.7)


def test_due_only_after_grace_and_each_window_once() -> None:
    rig = Rig(grace_s=0.25)
    rig.feed(samples(stream(), T0, T0 + 1.2, 10.0))
    assert rig.close(T0 + 1.2) == []
    assert rig.close(T0 + 1.2499) == []
    assert [r.index for r in rig.close(T0 + 1.25)] == [1001]
    assert rig.close(T0 + 1.25) == []
    assert rig.close(T0 + 2.0) == []
    assert [r.index for r in rig.close(T0 + 2.25)] == [1002]


def test_late_sample_within_grace_is_counted() -> None:
    rig = Rig(grace_s=0.5)
    s = stream()
    rig.feed(samples(s, T0, T0 + 0.9, 10.0))
    assert rig.close(T0 + 1.3) == []
    rig.feed([Sample(s, T0 + 0.95, WALL, 1.0)])  # arrives 0.35 s late, before the grace ends
    (rec,) = rig.close(T0 + 1.5)
    assert rec.streams[0].count == 10


def test_streams_of_a_subject_are_aligned_at_different_rates() -> None:
    rig = Rig()
    fast = stream("fast", rate_hz=10.0)
    slow = stream("slow", metric=MDC["MDC_TEMP_BODY"], rate_hz=4.0)
    other = stream("x", subject="bed2", rate_hz=10.0)
    rig.feed(samples(slow, T0, T0 + 2.0, 4.0, value=37.0))
    rig.feed(samples(fast, T0, T0 + 2.0, 10.0, value=98.0))
    rig.feed(samples(other, T0 + 0.5, T0 + 2.0, 10.0))
    recs = rig.close(T0 + 2.5)
    assert [(r.subject, r.index) for r in recs] == [
        ("bed1", 1001),
        ("bed2", 1001),
        ("bed1", 1002),
        ("bed2", 1002),
    ]
    for r in recs:
        if r.subject != "bed1":
            continue
        assert r.end_mono == T0 + (r.index - 1000)
        by_key = {sf.stream.device: sf for sf in r.streams}
        assert by_key["fast"].count == 10
        assert by_key["slow"].count == 4
        assert by_key["slow"].missing == 0.0
        assert by_key["slow"].features["mean"] == 37.0
        assert by_key["fast"].features["mean"] == 98.0
    assert [sf.stream.device for sf in recs[0].streams] == ["fast", "slow"]  # stable order by key


def test_gap_when_a_stream_has_no_usable_sample() -> None:
    rig = Rig(lost=100.0)
    a = stream("a")
    b = stream("b")
    rig.feed(samples(a, T0, T0 + 3.0, 10.0))
    rig.feed(samples(b, T0, T0 + 1.0, 10.0))  # b stops after the first second
    recs = rig.close(T0 + 3.5)
    assert len(recs) == 3
    for r in recs[1:]:
        sb = next(sf for sf in r.streams if sf.stream == b)
        assert sb.gap
        assert sb.count == 0
        assert sb.missing == 1.0
        assert sb.features == {}
    assert not recs[0].streams[1].gap
    assert rig.w.counters()["gaps"] == 2


def test_flagged_and_nan_values_are_not_used_and_not_interpolated() -> None:
    rig = Rig()
    s = stream()
    t = [T0 + i / 10 for i in range(10)]
    rig.feed(
        [
            Sample(s, t[0], WALL, 1.0),
            Sample(s, t[1], WALL, 100.0, Quality.ARTIFACT),
            Sample(s, t[2], WALL, 100.0, Quality.SENSOR_OFF),
            Sample(s, t[3], WALL, 100.0, Quality.BAD_STATUS),
            Sample(s, t[4], WALL, math.nan),
            Sample(s, t[5], WALL, 3.0, Quality.LOW_PERFUSION),  # weak but still a measurement
            Sample(s, t[6], WALL, 5.0, Quality.UNCERTAIN),
        ]
    )
    (rec,) = rig.close(T0 + 1.5)
    sf = rec.streams[0]
    assert sf.count == 3
    assert sf.missing == pytest.approx(0.7)
    assert sf.features["mean"] == 3.0
    assert sf.features["min"] == 1.0
    assert sf.features["max"] == 5.0
    assert all(math.isfinite(x) for x in sf.features.values())


def test_rr_stream_gets_hrv_features_and_event_missing_fraction() -> None:
    rig = Rig(window_s=5.0, hop_s=5.0)
    rr = stream("ecg", metric=MDC["MDC_ECG_TIME_PD_RR_GL"], rate_hz=None)
    intervals = [800.0, 810.0, 790.0, 850.0, 845.0]
    t = T0
    for ms in intervals:
        t += ms / 1000.0
        rig.w.put(Sample(rr, t, WALL, ms))
    recs = rig.close(T0 + 10.5)
    assert [r.index for r in recs] == [201, 202]
    first, second = recs[0].streams[0], recs[1].streams[0]
    assert first.count == 5
    assert first.missing == 0.0
    assert first.features["rmssd"] == pytest.approx(math.sqrt(4125.0 / 4.0))
    assert first.features["sdnn"] == pytest.approx(math.sqrt(730.0))
    assert first.features["pnn50"] == 25.0
    assert first.features["mean"] == 819.0
    assert second.gap
    assert second.missing == 1.0


def test_catch_up_after_a_stall_emits_every_window_in_order() -> None:
    rig = Rig(lost=100.0)
    rig.feed(samples(stream(), T0, T0 + 6.0, 10.0))  # 60 rows: the 64-row ring still holds them
    recs = rig.close(T0 + 6.5)  # nobody closed windows for 6 s
    assert [r.index for r in recs] == list(range(1001, 1007))
    assert all(r.streams[0].count == 10 for r in recs)
    assert rig.close(T0 + 6.5) == []
    assert rig.w.counters()["overwritten"] == 0


def test_catch_up_beyond_the_ring_reports_gaps_not_skips() -> None:
    rig = Rig(lost=1000.0)
    s = stream()  # 10 Hz: ring of 64 rows (the minimum)
    rig.feed(samples(s, T0, T0 + 100.0, 10.0))
    recs = rig.close(T0 + 100.5)
    assert [r.index for r in recs] == list(range(1001, 1101))
    counts = [r.streams[0].count for r in recs]
    assert counts[:93] == [0] * 93  # overwritten before anyone looked: reported as gaps
    assert counts[-6:] == [10] * 6  # the newest 64 rows are still there
    c = rig.w.counters()
    assert c["overwritten"] == 1000 - 64
    assert c["gaps"] >= 93


def test_ring_grows_when_a_stream_is_faster_than_its_nominal_rate() -> None:
    rig = Rig(lost=100.0)
    s = stream(rate_hz=10.0)  # says 10 Hz, sends 100 Hz: the 64-row ring holds 0.64 s
    counts = []
    for step in range(20):
        start = T0 + step * 0.5
        rig.feed(samples(s, start, start + 0.5, 100.0))
        counts += [r.streams[0].count for r in rig.close(start + 0.5)]
    assert counts[0] < 100
    assert counts[-3:] == [100, 100, 100]  # the ring grew to hold a whole window
    assert counts == sorted(counts)


def test_overlapping_windows_share_samples() -> None:
    rig = Rig(window_s=2.0, hop_s=1.0)
    rig.feed(samples(stream(), T0, T0 + 4.0, 10.0))
    recs = rig.close(T0 + 4.5)
    assert [r.index for r in recs] == [1001, 1002, 1003, 1004]
    assert [r.streams[0].count for r in recs] == [10, 20, 20, 20]  # the first has only 1 s of data
    assert recs[0].streams[0].missing == 0.5


def test_window_not_a_multiple_of_hop() -> None:
    rig = Rig(window_s=1.5, hop_s=1.0)
    rig.feed(samples(stream(), T0, T0 + 4.0, 10.0))
    recs = rig.close(T0 + 4.5)
    assert [r.streams[0].count for r in recs] == [10, 15, 15, 15]


def test_adjacent_windows_partition_samples_with_awkward_hop() -> None:
    # A little grace: with none, a window may close a hair before its last sample is handed over.
    wide = Rig(window_s=0.3, hop_s=0.1, grace_s=0.05, lost=100.0)
    narrow = Rig(window_s=0.1, hop_s=0.1, grace_s=0.05, lost=100.0)
    s = stream(rate_hz=100.0)
    items = samples(s, T0, T0 + 5.0, 100.0)
    recs: list[WindowRecord] = []
    wide_recs: list[WindowRecord] = []
    for i in range(0, len(items), 10):
        narrow.feed(items[i : i + 10])
        wide.feed(items[i : i + 10])
        recs += narrow.close(items[i].t_mono + 0.1)
        wide_recs += wide.close(items[i].t_mono + 0.1)
    recs += narrow.close(T0 + 5.1)
    wide_recs += wide.close(T0 + 5.1)
    assert len(recs) == 50
    # Each sample lands in exactly one window of width == hop, whatever rounding 0.1 brings.
    assert sum(r.streams[0].count for r in recs) == len(items)
    # A 0.3 s window is exactly the union of the three 0.1 s windows that end inside it.
    narrow_count = {r.index: r.streams[0].count for r in recs}
    assert [r.index for r in wide_recs] == [r.index for r in recs]
    for r in wide_recs:
        parts = sum(narrow_count.get(k, 0) for k in (r.index - 2, r.index - 1, r.index))
        assert r.streams[0].count == parts
    assert narrow.w.counters()["overwritten"] == 0


def test_end_wall_uses_the_device_wall_offset() -> None:
    rig = Rig()
    s = stream()
    rig.feed([Sample(s, T0 + 0.5, 5000.5, 1.0), Sample(s, T0 + 1.2, 5001.2, 1.0)])
    (rec,) = rig.w.close_due(T0 + 1.5, 99999.0)
    assert rec.end_wall == pytest.approx(5001.0)


def test_kind_comes_from_the_streams() -> None:
    rig = Rig()
    s = stream(metric=industrial_metric("Pump1/Motor/Current", "A"), kind="industrial", subject="pump1")
    rig.feed(samples(s, T0, T0 + 1.0, 10.0))
    (rec,) = rig.close(T0 + 1.5)
    assert rec.kind == "industrial"
    assert rec.subject == "pump1"


def test_stream_joining_before_the_first_window_moves_the_start_back() -> None:
    rig = Rig()
    a = stream("a")
    b = stream("b")
    rig.feed(samples(a, T0 + 2.0, T0 + 3.0, 10.0))
    rig.feed(samples(b, T0 + 0.5, T0 + 3.0, 10.0))  # older data arrives later (slower link)
    recs = rig.close(T0 + 3.5)
    assert [r.index for r in recs] == [1001, 1002, 1003]


def test_out_of_order_samples_are_dropped_and_counted() -> None:
    rig = Rig()
    s = stream()
    rig.feed(samples(s, T0, T0 + 1.0, 10.0))
    rig.feed([Sample(s, T0 + 0.35, WALL, 500.0)])
    (rec,) = rig.close(T0 + 1.5)
    assert rec.streams[0].count == 10
    assert rec.streams[0].features["max"] == 1.0
    c = rig.w.counters()
    assert c["out_of_order"] == 1
    assert c["samples"] == 10


def test_equal_stream_objects_share_one_ring() -> None:
    rig = Rig()
    rig.feed(samples(stream(), T0, T0 + 0.5, 10.0))
    rig.feed(samples(stream(), T0 + 0.5, T0 + 1.0, 10.0))  # a driver restarted, new Stream object
    (rec,) = rig.close(T0 + 1.5)
    assert len(rec.streams) == 1
    assert rec.streams[0].count == 10
    assert rig.w.counters()["streams"] == 1


# ---- alarms --------------------------------------------------------------------------------


def test_fault_and_restore_alarms_once_per_state_change() -> None:
    rig = Rig(restore=0.0)  # immediate restore: one alarm per flip
    s = stream()
    rig.feed(samples(s, T0, T0 + 0.5, 10.0))
    rig.feed(samples(s, T0 + 0.5, T0 + 0.8, 10.0, quality=Quality.SENSOR_OFF | Quality.ARTIFACT))
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT]
    fault = rig.alarms[0]
    assert fault.t_mono == pytest.approx(T0 + 0.5)
    assert fault.stream == s
    assert fault.subject == "bed1"
    assert fault.detail["quality"] == int(Quality.SENSOR_OFF | Quality.ARTIFACT)
    rig.feed(samples(s, T0 + 0.8, T0 + 1.0, 10.0, quality=Quality.ARTIFACT))  # noisy, not a fault
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_RESTORED]
    assert rig.alarms[1].t_mono == pytest.approx(T0 + 0.8)
    assert rig.alarms[1].detail["after"] == "sensor_fault"
    rig.feed(samples(s, T0 + 1.0, T0 + 1.5, 10.0, quality=Quality.BAD_STATUS))
    assert rig.kinds()[-1] == AlarmKind.SENSOR_FAULT
    assert len(rig.alarms) == 3
    assert rig.w.counters()["alarms"] == 3


def test_lost_alarm_once_then_restored_by_new_data() -> None:
    rig = Rig(lost=3.0)
    s = stream()
    rig.feed(samples(s, T0, T0 + 1.0, 10.0))
    last = T0 + 0.9
    rig.close(last + 3.0)
    assert rig.alarms == []
    rig.close(last + 3.01)
    assert rig.kinds() == [AlarmKind.SENSOR_LOST]
    lost = rig.alarms[0]
    assert lost.t_mono == last + 3.01
    assert lost.detail["silent_s"] == pytest.approx(3.0)  # rounded to 0.1 s
    rig.close(last + 10.0)
    assert len(rig.alarms) == 1
    rig.feed(samples(s, T0 + 12.0, T0 + 12.5, 10.0))
    assert rig.kinds() == [AlarmKind.SENSOR_LOST, AlarmKind.SENSOR_RESTORED]
    assert rig.alarms[1].detail["after"] == "sensor_lost"
    assert rig.alarms[1].t_mono == T0 + 12.0


def test_faulty_data_after_loss_is_a_fault_not_a_restore() -> None:
    rig = Rig(lost=1.0)
    s = stream()
    rig.feed(samples(s, T0, T0 + 0.5, 10.0))
    rig.close(T0 + 5.0)
    rig.feed(samples(s, T0 + 5.0, T0 + 5.5, 10.0, quality=Quality.SENSOR_OFF))
    assert rig.kinds() == [AlarmKind.SENSOR_LOST, AlarmKind.SENSOR_FAULT]


def test_lost_stream_still_produces_gap_windows() -> None:
    rig = Rig(lost=1.0)
    rig.feed(samples(stream(), T0, T0 + 1.0, 10.0))
    recs = rig.close(T0 + 5.5)
    assert [r.streams[0].gap for r in recs] == [False, True, True, True, True]


def block(s: Stream, t: list[float], quality: list[int], value: float = 1.0) -> SampleBlock:
    ta = np.asarray(t, np.float64)
    return SampleBlock(s, ta, ta + WALL - T0, np.full(ta.size, value), np.asarray(quality, np.uint8))


def test_block_state_changes_in_row_order() -> None:
    rig = Rig(restore=0.0)  # immediate restore: one alarm per flip
    s = stream()
    off, art = int(Quality.SENSOR_OFF), int(Quality.ARTIFACT)
    rig.w.put_block(
        block(s, [T0, T0 + 0.1, T0 + 0.2, T0 + 0.3, T0 + 0.4, T0 + 0.5], [0, art, off, off, 0, off])
    )
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_RESTORED, AlarmKind.SENSOR_FAULT]
    assert [a.t_mono for a in rig.alarms] == [T0 + 0.2, T0 + 0.4, T0 + 0.5]
    rig.w.put_block(block(s, [T0 + 0.6, T0 + 0.7], [off, off]))  # still faulty: nothing new
    assert len(rig.alarms) == 3
    rig.w.put_block(block(s, [T0 + 0.8, T0 + 0.9], [0, 0]))
    assert rig.kinds()[-1] == AlarmKind.SENSOR_RESTORED
    assert rig.alarms[-1].t_mono == T0 + 0.8
    assert len(rig.alarms) == 4


def test_block_ignores_dropped_rows_for_state() -> None:
    rig = Rig()
    s = stream()
    rig.w.put_block(block(s, [T0, T0 + 0.5], [0, 0]))
    # The faulty row is older than the newest stored one: dropped, so it raises nothing.
    rig.w.put_block(block(s, [T0 + 0.6, T0 + 0.2, T0 + 0.7], [0, int(Quality.SENSOR_OFF), 0]))
    assert rig.alarms == []
    assert rig.w.counters()["out_of_order"] == 1
    assert rig.w.counters()["samples"] == 4


def test_block_restores_a_lost_stream_and_empty_block_is_harmless() -> None:
    rig = Rig(lost=1.0)
    s = stream()
    rig.w.put_block(block(s, [T0, T0 + 0.1], [0, 0]))
    rig.close(T0 + 5.0)
    rig.w.put_block(block(s, [], []))
    rig.w.put_block(block(s, [T0 + 5.0, T0 + 5.1], [0, 0]))
    assert rig.kinds() == [AlarmKind.SENSOR_LOST]  # inside the 2 s hold after the loss
    rig.w.put_block(block(s, [T0 + 6.9, T0 + 7.05, T0 + 7.1], [0, 0, 0]))
    assert rig.kinds() == [AlarmKind.SENSOR_LOST, AlarmKind.SENSOR_RESTORED]
    assert rig.alarms[1].t_mono == T0 + 7.05  # the first row past the hold


# ---- restore hold after a fault (flapping probes) --------------------------------------------

OFF = int(Quality.SENSOR_OFF)


def feed_rows(rig: Rig, s: Stream, t: np.ndarray, q: np.ndarray, how: str) -> None:
    """Hand rows over one sample at a time, as one block, or in blocks of 7 rows."""
    if how == "put":
        for i in range(t.size):
            rig.w.put(Sample(s, float(t[i]), float(t[i]) + WALL - T0, 1.0, Quality(int(q[i]))))
        return
    step = t.size if how == "block" else 7
    for i in range(0, t.size, step):
        rig.w.put_block(block(s, t[i : i + step].tolist(), q[i : i + step].tolist()))


def flapping_then_good(good_s: float) -> tuple[np.ndarray, np.ndarray]:
    """10 s of a 10 Hz probe flipping good/faulty every sample, then ``good_s`` of good samples."""
    n_flap = 100
    n = n_flap + round(good_s * 10)
    t = T0 + np.arange(n) / 10.0
    q = np.zeros(n, np.uint8)
    q[1:n_flap:2] = OFF
    return t, q


@pytest.mark.parametrize("how", ["put", "block", "blocks_of_7"])
def test_flapping_stream_raises_one_fault_and_one_restore_after_the_hold(how: str) -> None:
    s = stream()
    t, q = flapping_then_good(1.9)
    rig = Rig(lost=30.0)
    feed_rows(rig, s, t, q, how)
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT]  # good for 1.9 s only: still held
    assert rig.alarms[0].t_mono == t[1]
    t, q = flapping_then_good(3.0)
    rig = Rig(lost=30.0)
    feed_rows(rig, s, t, q, how)
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_RESTORED]
    restored = rig.alarms[1]
    # The sample that completed 2 s of unbroken good data (the first good one is row 100).
    done = int(np.flatnonzero(t >= t[100] + 2.0)[0])
    assert restored.t_mono == t[done]
    assert restored.t_mono - t[100] == pytest.approx(2.0)
    assert restored.t_wall == t[done] + WALL - T0
    assert restored.detail == {"after": "sensor_fault", "quality": 0}
    assert rig.w.counters()["alarms"] == 2


@pytest.mark.parametrize("how", ["put", "block", "blocks_of_7"])
def test_restore_after_zero_keeps_one_alarm_per_flip(how: str) -> None:
    s = stream()
    t, q = flapping_then_good(1.0)
    rig = Rig(lost=30.0, restore=0.0)
    feed_rows(rig, s, t, q, how)
    assert len(rig.alarms) == 100  # 50 faulty rows, each followed by a good one
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_RESTORED] * 50
    assert [a.t_mono for a in rig.alarms] == t[1:101].tolist()


@pytest.mark.parametrize("how", ["put", "block", "blocks_of_7"])
def test_hold_interrupted_by_a_faulty_sample_restarts(how: str) -> None:
    s = stream()
    t = T0 + np.arange(50) / 10.0
    q = np.zeros(50, np.uint8)
    q[0] = OFF  # fault at row 0
    q[16] = OFF  # good rows 1..15 (1.5 s), one faulty row, then good from row 17
    rig = Rig(lost=30.0)
    feed_rows(rig, s, t, q, how)
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_RESTORED]  # no second fault
    assert rig.alarms[0].t_mono == t[0]
    assert rig.alarms[1].t_mono == t[int(np.flatnonzero(t >= t[17] + 2.0)[0])]
    assert rig.alarms[1].t_mono == pytest.approx(T0 + 3.7)  # not T0 + 2.1, where the first hold ended


def test_loss_during_a_hold_is_restored_by_new_data_after_the_loss_hold() -> None:
    rig = Rig(lost=1.0)
    s = stream()
    rig.feed(samples(s, T0, T0 + 0.5, 10.0, quality=Quality.SENSOR_OFF))
    rig.feed(samples(s, T0 + 0.5, T0 + 1.0, 10.0))  # holding
    rig.close(T0 + 3.0)
    rig.feed(samples(s, T0 + 3.0, T0 + 3.2, 10.0))  # too soon after the loss alarm
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_LOST]
    rig.feed(samples(s, T0 + 5.05, T0 + 5.2, 10.0))
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_LOST, AlarmKind.SENSOR_RESTORED]
    assert rig.alarms[2].detail["after"] == "sensor_lost"
    assert rig.alarms[2].t_mono == T0 + 5.05


def test_a_restore_after_a_long_outage_is_not_held() -> None:
    rig = Rig(lost=1.0)
    s = stream()
    rig.feed(samples(s, T0, T0 + 0.5, 10.0))
    rig.close(T0 + 2.0)
    rig.close(T0 + 30.0)
    rig.feed(samples(s, T0 + 30.0, T0 + 30.2, 10.0))
    assert rig.kinds() == [AlarmKind.SENSOR_LOST, AlarmKind.SENSOR_RESTORED]
    assert rig.alarms[1].t_mono == T0 + 30.0  # the hold ended long ago: restored at once


@pytest.mark.parametrize("how", ["put", "block"])
def test_a_device_toggling_every_0_3_s_never_flaps_faster_than_the_restore_delay(how: str) -> None:
    # On for 0.3 s, off for 0.3 s, for two minutes; silence of 0.2 s is a loss.  Without the hold
    # this raised a loss and a restore every 0.6 s: 400 alarms.
    restore, lost, rate = 2.0, 0.2, 50.0
    rig = Rig(lost=lost, restore=restore)
    s = stream(rate_hz=rate)
    t = T0
    while t < T0 + 120.0:
        rows = T0 + np.arange(round((t - T0) * rate), round((t + 0.3 - T0) * rate)) / rate
        if how == "put":
            rig.feed(Sample(s, float(x), float(x) + WALL - T0, 1.0, Quality(0)) for x in rows)
        else:
            rig.w.put_block(block(s, rows.tolist(), [0] * rows.size))
        for k in range(1, 13):  # the timer path every 0.05 s, through the on and the off phase
            rig.close(t + k * 0.05)
        t += 0.6
    kinds = rig.kinds()
    assert AlarmKind.SENSOR_LOST in kinds  # it does go and come back ...
    assert AlarmKind.SENSOR_RESTORED in kinds
    # ... but a loss and its restore are at least the restore delay apart, every time:
    pairs = list(itertools.pairwise(rig.alarms))
    for lost_alarm, restored in pairs[::2]:
        assert (lost_alarm.kind, restored.kind) == (AlarmKind.SENSOR_LOST, AlarmKind.SENSOR_RESTORED)
        assert restored.t_mono - lost_alarm.t_mono >= restore
    assert len(kinds) <= 2 * math.ceil(120.0 / (lost + restore)) + 2, len(kinds)


@pytest.mark.parametrize("restore", [0.0, 0.35, 2.0])
def test_blocks_and_single_samples_raise_the_same_alarms(restore: float) -> None:
    rng = np.random.default_rng(11)
    s = stream(rate_hz=20.0)
    n = 3000
    t = T0 + np.arange(n) / 20.0
    # Long good and faulty stretches with flapping in between, cut into blocks of random sizes.
    p_fault = np.repeat(rng.choice([0.0, 0.5, 1.0, 0.05], n // 100), 100)
    q = np.where(rng.random(n) < p_fault, OFF, np.where(rng.random(n) < 0.1, int(Quality.ARTIFACT), 0))
    q = q.astype(np.uint8)
    one, many = Rig(lost=30.0, restore=restore), Rig(lost=30.0, restore=restore)
    feed_rows(one, s, t, q, "put")
    i = 0
    while i < n:
        k = int(rng.integers(1, 60))
        many.w.put_block(block(s, t[i : i + k].tolist(), q[i : i + k].tolist()))
        i += k
    assert len(one.alarms) >= 4
    assert one.alarms == many.alarms


def test_blocks_and_single_samples_give_the_same_windows() -> None:
    rng = np.random.default_rng(3)
    s = stream(rate_hz=50.0)
    t = T0 + np.arange(400) / 50.0
    v = rng.normal(size=400)
    v[rng.integers(0, 400, 20)] = math.nan
    q = np.where(rng.random(400) < 0.1, int(Quality.ARTIFACT), 0).astype(np.uint8)
    one, many = Rig(), Rig()
    a: list[WindowRecord] = []
    b: list[WindowRecord] = []
    for i in range(0, 400, 25):
        for j in range(i, i + 25):
            one.w.put(Sample(s, float(t[j]), float(t[j]) + 1.0, float(v[j]), Quality(int(q[j]))))
        many.w.put_block(SampleBlock(s, t[i : i + 25], t[i : i + 25] + 1.0, v[i : i + 25], q[i : i + 25]))
        a += one.close(float(t[i]) + 0.5)
        b += many.close(float(t[i]) + 0.5)
    assert len(a) == len(b) == 7
    assert a == b
    assert 0 < sum(r.streams[0].count for r in a) < 350  # some NaN and flagged rows were left out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_s": 0.0},
        {"hop_s": -1.0},
        {"grace_s": -0.1},
        {"lost_after_s": math.nan},
        {"window_s": math.inf},
        {"restore_after_s": -0.5},
        {"restore_after_s": math.nan},
    ],
)
def test_settings_are_validated(kwargs: dict[str, float]) -> None:
    settings = {"window_s": 1.0, "hop_s": 1.0, "grace_s": 0.0, "lost_after_s": 5.0, **kwargs}
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        Windower(
            window_s=settings["window_s"],
            hop_s=settings["hop_s"],
            grace_s=settings["grace_s"],
            lost_after_s=settings["lost_after_s"],
            restore_after_s=settings.get("restore_after_s", 2.0),
            on_alarm=lambda a: None,
        )


def test_ring_capacity_follows_rate_and_spans_window_grace_and_hop() -> None:
    w = Windower(window_s=1.0, hop_s=1.0, grace_s=0.5, lost_after_s=5.0, on_alarm=lambda a: None)
    assert w.capacity_for(stream(rate_hz=256.0)) == 1280  # 256 Hz x 2.5 s x 2
    assert w.capacity_for(stream(rate_hz=None)) == 64  # event series: 8/s x 2.5 s x 2, floor 64
    long = Windower(window_s=60.0, hop_s=10.0, grace_s=2.0, lost_after_s=5.0, on_alarm=lambda a: None)
    assert long.capacity_for(stream(rate_hz=None)) == 1152  # 8/s x 72 s x 2


def test_slow_stream_is_lost_only_after_three_missed_samples() -> None:
    rig = Rig(lost=3.0)
    slow = Stream("thermo", "bed-1", "dev-9", MDC["MDC_TEMP_BODY"], rate_hz=0.1)
    rig.feed(samples(slow, T0, T0 + 0.5, 10.0))
    last = T0 + 0.4
    rig.close(last + 29.0)
    assert rig.alarms == []  # 10 s between samples is normal for a thermometer
    rig.close(last + 30.5)
    assert rig.kinds() == [AlarmKind.SENSOR_LOST]


def test_imputed_values_are_not_features() -> None:
    rig = Rig(lost=30.0)
    s = stream()
    rig.feed(samples(s, T0, T0 + 2.0, 10.0, quality=Quality.IMPUTED))
    records = rig.close(T0 + 100.0)
    assert records
    assert all(sf.gap for r in records for sf in r.streams)


@pytest.mark.parametrize("restore", [0.0, 2.0])
def test_a_driver_reporting_its_device_lost_and_back_every_0_3_s_never_flaps_faster(restore: float) -> None:
    # A serial adapter with a loose contact: the driver says "lost" and "back" every 0.3 s while
    # the data comes and goes with it.  Every alarm that would leave the gateway is collected.
    rig = Rig(lost=30.0, restore=restore)
    a, b = stream(rate_hz=10.0), stream(rate_hz=10.0, metric=MDC["MDC_PULS_OXIM_PULS_RATE"])
    out: list[Alarm] = []

    def driver(kind: AlarmKind, t: float) -> None:
        detail: dict[str, float | str] = {"cause": "unplugged"}
        if kind is AlarmKind.SENSOR_RESTORED:
            detail["after"] = "sensor_lost"
        folded = fold_device_alarm(Alarm(kind, a.subject, t, t + WALL - T0, a, detail), rig.w)
        if folded is not None:
            out.append(folded)

    t = T0
    while t < T0 + 120.0:
        rows = (t + np.arange(3) / 10.0).tolist()
        for s in (a, b):
            rig.w.put_block(block(s, rows, [0] * 3))
        for k in range(1, 7):
            rig.close(t + k * 0.05)
        driver(AlarmKind.SENSOR_LOST, t + 0.3)
        for k in range(7, 13):
            rig.close(t + k * 0.05)
        t += 0.6
        driver(AlarmKind.SENSOR_RESTORED, t)
    sent = sorted(out + rig.alarms, key=lambda x: x.t_mono)
    kinds = [x.kind for x in sent]
    assert set(kinds) == {AlarmKind.DEVICE_LOST, AlarmKind.DEVICE_RESTORED}
    if restore == 0.0:
        assert len(sent) >= 400  # a pair per flip: what the hold prevents
        return
    for lost_alarm, back in itertools.pairwise(sent):
        assert lost_alarm.kind != back.kind  # strictly alternating, one outage at a time
        if lost_alarm.kind is AlarmKind.DEVICE_LOST:
            assert back.t_mono - lost_alarm.t_mono >= restore
    assert len(sent) <= 2 * math.ceil(120.0 / restore) + 2, len(sent)
    print(f"\n{len(sent)} device alarms in 120 s of flapping")


def test_a_source_forgotten_by_a_config_revision_raises_no_loss_and_leaves_the_others() -> None:
    rig = Rig()
    old = Stream("old-src", "bed1", "dev1", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=10.0)
    other = Stream("src", "bed2", "dev2", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=10.0)
    rig.feed(samples(old, T0, T0 + 2, 10.0) + samples(other, T0, T0 + 2, 10.0))
    assert rig.w.forget_source("old-src") == 1
    assert rig.w.forget_source("old-src") == 0
    rig.feed(samples(other, T0 + 2, T0 + 8, 10.0))
    records = rig.close(T0 + 8)
    assert rig.kinds() == []  # the old source's silence is no loss: it was removed
    assert {r.subject for r in records} == {"bed2"}
    assert [s["source"] for s in rig.w.stream_states()] == ["src"]
    # Without the forget, the same silence is a loss.
    control = Rig()
    control.feed(samples(old, T0, T0 + 2, 10.0) + samples(other, T0, T0 + 8, 10.0))
    control.close(T0 + 8)
    assert AlarmKind.SENSOR_LOST in control.kinds()


# ---- a device naming itself after its first data under its port -------------------------------


def test_a_device_naming_itself_takes_its_ports_samples_into_its_windows() -> None:
    rig = Rig(window_s=2.0, hop_s=2.0, grace_s=0.0, lost=1.0)
    port, named = stream("/dev/ttyUSB7"), stream("SN-1")
    rig.feed(samples(port, T0 + 0.1, T0 + 1.1, 10.0, value=86.0))
    assert rig.w.adopt_device("src", "/dev/ttyUSB7", "SN-1", "bed1") == 1
    rig.feed(samples(named, T0 + 1.1, T0 + 5.1, 10.0, value=97.0))
    records = rig.close(T0 + 4.0)
    assert rig.kinds() == []  # the port's silence is no loss: its samples are the device's
    assert [len(r.streams) for r in records] == [1, 1]
    whole = records[0].streams[0]  # the window from T0 to T0 + 2
    assert whole.stream is named
    assert whole.count == 19  # 10 from the port (T0 + 0.1 ... 1.0), 9 from the device
    assert whole.features["min"] == 86.0
    assert whole.features["max"] == 97.0
    assert [s["metric"] for s in rig.w.stream_states()] == [named.metric.name]


def test_a_fault_raised_under_the_port_is_restored_by_the_devices_data() -> None:
    rig = Rig(restore=1.0, lost=1.0)
    port, named = stream("/dev/ttyUSB7"), stream("SN-1")
    rig.feed(samples(port, T0, T0 + 1.0, 10.0, quality=Quality.SENSOR_OFF))
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT]
    rig.w.adopt_device("src", "/dev/ttyUSB7", "SN-1", "bed1")
    rig.w.resume(AlarmKind.SENSOR_FAULT, named)  # kept by the ledger: the state it has stays
    rig.feed(samples(named, T0 + 1.0, T0 + 3.0, 10.0))
    rig.close(T0 + 3.0)
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_RESTORED]
    assert rig.alarms[1].stream is named
    assert rig.alarms[1].t_mono == pytest.approx(T0 + 2.0)


def test_a_device_lost_under_its_port_is_restored_once_by_its_data_under_its_name() -> None:
    rig = Rig(lost=1.0, restore=0.0)
    spo2, pulse = MDC["MDC_PULS_OXIM_SAT_O2"], MDC["MDC_PULS_OXIM_PULS_RATE"]
    at_port = [stream("/dev/ttyUSB7", metric=m) for m in (spo2, pulse)]
    named = [stream("SN-1", metric=m) for m in (spo2, pulse)]
    rig.feed(s for st in at_port for s in samples(st, T0, T0 + 1.0, 10.0))
    rig.close(T0 + 3.0)
    assert rig.kinds() == [AlarmKind.DEVICE_LOST]
    assert rig.w.adopt_device("src", "/dev/ttyUSB7", "SN-1", "bed1") == 2
    rig.feed(samples(named[0], T0 + 4.0, T0 + 5.0, 10.0))
    rig.close(T0 + 5.0)
    assert rig.kinds() == [AlarmKind.DEVICE_LOST, AlarmKind.DEVICE_RESTORED]
    assert rig.alarms[1].stream is named[0]
    assert rig.alarms[1].detail["streams"] == 2


def test_a_port_stream_of_another_subject_or_taken_name_ends_as_forgotten() -> None:
    rig = Rig(lost=1.0)
    port, other_bed, named = stream("/dev/ttyUSB7"), stream("/dev/ttyUSB7", subject="bed2"), stream("SN-1")
    rig.feed(samples(named, T0, T0 + 1.0, 10.0) + samples(other_bed, T0, T0 + 1.0, 10.0))
    rig.feed(samples(port, T0, T0 + 1.0, 10.0))
    assert rig.w.adopt_device("src", "/dev/ttyUSB7", "SN-1", "bed1") == 0  # SN-1's own stream is here
    rig.feed(samples(named, T0 + 1.0, T0 + 4.0, 10.0))
    rig.close(T0 + 4.0)
    assert rig.kinds() == []
    assert [(s["subject"], s["accepted"]) for s in rig.w.stream_states()] == [("bed1", 40)]


# ---- a stream rebuilt under the same key ----------------------------------------------------


def rows(start: float, stop: float, rate_hz: float) -> tuple[np.ndarray, np.ndarray]:
    t = start + np.arange(round((stop - start) * rate_hz)) / rate_hz
    return t, np.zeros(t.size, np.uint8)


@pytest.mark.parametrize("how", ["put", "block"])
def test_a_stream_rebuilt_with_a_new_rate_replaces_its_entry_without_a_loss(how: str) -> None:
    rig = Rig(lost=3.0)
    before = stream(rate_hz=10.0)
    after = stream(rate_hz=4.0)  # the server revised its sampling interval after a restart
    assert after.key == before.key
    assert after != before
    feed_rows(rig, before, *rows(T0, T0 + 2.0, 10.0), how)
    records = rig.close(T0 + 2.0)
    feed_rows(rig, after, *rows(T0 + 2.0, T0 + 12.0, 4.0), how)
    for now in np.arange(T0 + 2.5, T0 + 12.01, 0.5):
        records += rig.close(float(now))
    assert rig.kinds() == []  # the old object's silence is no loss
    assert [len(r.streams) for r in records] == [1] * len(records)
    assert [r.streams[0].count for r in records] == [10] * 2 + [4] * 9
    assert records[-1].streams[0].stream is after
    assert records[-1].streams[0].missing == 0.0  # judged against the new rate
    assert [s["status"] for s in rig.w.stream_states()] == ["ok"]
    assert rig.w.counters()["streams"] == 1


def test_a_lost_stream_rebuilt_is_restored_by_the_new_streams_data() -> None:
    rig = Rig(lost=1.0)
    before = stream(rate_hz=10.0)
    after = stream(rate_hz=2.0)
    rig.feed(samples(before, T0, T0 + 1.0, 10.0))
    rig.close(T0 + 5.0)
    assert rig.kinds() == [AlarmKind.SENSOR_LOST]
    rig.feed(samples(after, T0 + 8.0, T0 + 10.0, 2.0))
    rig.close(T0 + 10.0)
    assert rig.kinds() == [AlarmKind.SENSOR_LOST, AlarmKind.SENSOR_RESTORED]
    restored = rig.alarms[1]
    assert restored.stream is after
    assert restored.detail["after"] == "sensor_lost"
    assert restored.t_mono == T0 + 8.0
    assert [s["status"] for s in rig.w.stream_states()] == ["ok"]


def test_a_faulted_stream_rebuilt_keeps_its_fault_until_the_new_stream_restores_it() -> None:
    rig = Rig(restore=1.0)
    before = stream(rate_hz=10.0)
    after = stream(rate_hz=5.0)
    rig.feed(samples(before, T0, T0 + 1.0, 10.0, quality=Quality.SENSOR_OFF))
    rig.feed(samples(after, T0 + 1.0, T0 + 1.8, 5.0))
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT]  # the hold after a fault runs on
    rig.feed(samples(after, T0 + 1.8, T0 + 3.0, 5.0))
    assert rig.kinds() == [AlarmKind.SENSOR_FAULT, AlarmKind.SENSOR_RESTORED]
    assert rig.alarms[1].t_mono == pytest.approx(T0 + 2.0)


def test_a_stream_rebuilt_with_a_new_unit_restarts_its_ring() -> None:
    rig = Rig()
    celsius = stream(metric=industrial_metric("Pump/Temp", "Cel"), kind="industrial")
    fahrenheit = stream(metric=industrial_metric("Pump/Temp", "[degF]"), kind="industrial")
    assert celsius.key == fahrenheit.key
    rig.feed(samples(celsius, T0, T0 + 0.5, 10.0, value=100.0))
    rig.feed(samples(fahrenheit, T0 + 0.5, T0 + 2.0, 10.0, value=212.0))
    records = rig.close(T0 + 2.5)
    assert rig.kinds() == []
    assert [len(r.streams) for r in records] == [1, 1]
    first = records[0].streams[0]
    assert first.stream is fahrenheit
    assert first.count == 5  # the rows in degrees Celsius are not windowed with the new unit
    assert first.features["mean"] == 212.0


def test_a_driver_going_back_to_its_earlier_stream_rebinds_the_entry_to_it() -> None:
    # A driver that caches a stream per rate (the serial driver on protocol auto-detection) can
    # go back to the object it used first: the entry follows it, its rate judges the windows.
    rig = Rig(lost=3.0)
    slow, fast = stream(rate_hz=0.2), stream(rate_hz=10.0)
    feed_rows(rig, slow, *rows(T0, T0 + 10.0, 0.2), "put")
    rig.close(T0 + 10.0)
    feed_rows(rig, fast, *rows(T0 + 10.0, T0 + 12.0, 10.0), "put")
    rig.close(T0 + 12.0)
    feed_rows(rig, slow, *rows(T0 + 12.0, T0 + 40.0, 0.2), "put")
    records: list[WindowRecord] = []
    for now in np.arange(T0 + 12.5, T0 + 40.01, 0.5):
        records += rig.close(float(now))
    late = [r for r in records if r.end_mono > T0 + 25.0]
    assert late
    assert {r.streams[0].stream.rate_hz for r in late} == {0.2}
    # A window holding one of its rows is whole at 0.2 Hz (at 10 Hz it was judged 90 % missing).
    held = [r.streams[0].missing for r in late if r.streams[0].count]
    assert held
    assert held == [0.0] * len(held)
    assert rig.kinds() == []


def test_a_late_sample_in_the_old_unit_is_not_windowed_with_the_new_one() -> None:
    rig = Rig()
    celsius = stream(metric=industrial_metric("Pump/Temp", "Cel"), kind="industrial")
    fahrenheit = stream(metric=industrial_metric("Pump/Temp", "[degF]"), kind="industrial")
    rig.feed(samples(celsius, T0, T0 + 0.5, 10.0, value=100.0))
    rig.feed(samples(fahrenheit, T0 + 0.5, T0 + 1.0, 10.0, value=212.0))
    rig.feed(samples(celsius, T0 + 1.0, T0 + 1.5, 10.0, value=100.0))
    rig.feed(samples(fahrenheit, T0 + 1.5, T0 + 2.0, 10.0, value=212.0))
    records = rig.close(T0 + 2.5)
    seen = [s for r in records for s in r.streams if s.count]
    assert seen  # the last rows, in degF, are windowed
    for s in seen:  # each unit change restarts the ring: no window averages both units
        expected = 212.0 if s.stream is fahrenheit else 100.0
        assert s.features["mean"] == expected, (s.stream.metric.unit, s.count, s.features["mean"])
    assert rig.kinds() == []
