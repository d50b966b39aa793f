"""Pure parts of the MCU driver: tick unwrapping, clock sync, sample assembly, loss counting."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from drivers.mcu.protocol import NodeRestartedError, SampleAssembler, SeqTracker, metric_for
from firmware_bridge.messages import Channel, Samples
from firmware_bridge.timesync import ClockSync, TickUnwrapper
from gateway.sample import MDC, Quality, Stream

WRAP = 1 << 32


def test_tick_unwrapper_crosses_the_wrap_and_tolerates_older_values() -> None:
    u = TickUnwrapper()
    assert u(WRAP - 10) == WRAP - 10
    assert u(5) == WRAP + 5
    assert u(WRAP - 3) == WRAP - 3  # a little older than the latest: not a second wrap
    assert u(100) == WRAP + 100
    u.reset()
    assert u(7) == 7


def _simulate_sync(
    drift_ppm: float, tick_hz: int, start_tick: int, rng: random.Random, n: int, every_s: float
) -> ClockSync:
    clock = ClockSync(tick_hz)
    for i in range(n):
        t_send = 1000.0 + i * every_s
        rtt = 0.0002 + rng.random() * 0.0003
        if i % 5 == 3:
            rtt = 0.05  # an answer that sat in a buffer
        # the node read its counter at 40 % of the round trip (the midpoint is off by 0.1 rtt)
        t_node = t_send + 0.4 * rtt
        ticks = start_tick + (t_node - 1000.0) * tick_hz * (1 + drift_ppm * 1e-6)
        clock.add(t_send, t_send + rtt, int(ticks) % WRAP)
    return clock


def test_clock_sync_estimates_drift_and_maps_ticks_across_the_wrap() -> None:
    rng = random.Random(4)
    tick_hz = 1_000_000
    start = WRAP - 3_000_000  # wraps 3 s in
    clock = _simulate_sync(120.0, tick_hz, start, rng, n=30, every_s=0.5)
    assert clock.drift_ppm == pytest.approx(120.0, abs=15.0)
    assert clock.rtt_s < 0.0006
    # a sample taken 10 s after the first sync, 7 s past the wrap
    true_t = 1010.0
    tick = int(start + 10.0 * tick_hz * (1 + 120e-6)) % WRAP
    got = float(clock.to_gateway(clock.unwrap(tick)))
    assert got == pytest.approx(true_t, abs=0.0003)


def test_clock_sync_uses_the_nominal_rate_until_the_span_is_long_enough() -> None:
    clock = ClockSync(1000)
    clock.add(10.0, 10.002, 5000)
    assert clock.drift_ppm == 0.0
    assert float(clock.to_gateway(6000)) == pytest.approx(11.001)
    with pytest.raises(ValueError, match="tick rate"):
        ClockSync(0)


def test_seq_tracker_counts_gaps_through_the_wrap_and_ignores_restarts() -> None:
    t = SeqTracker()
    assert t.see(65534) == 0
    assert t.see(65535) == 0
    assert t.see(2) == 2  # 0 and 1 lost
    assert t.see(3) == 0
    assert t.see(0) == 0  # a restart: far behind
    assert (t.lost, t.resets) == (2, 1)


def _assembler(rate_hz: float = 100.0) -> tuple[SampleAssembler, Stream]:
    ch = Channel(0, 0, int(rate_hz * 1000), 0.01, 1.0, "pressure", "bar")
    stream = Stream("src", "machine-1", "NODE-1", metric_for(ch, {}), kind="industrial", rate_hz=rate_hz)
    clock = ClockSync(1000)
    clock.add(100.0, 100.0, 0)  # tick 0 is gateway second 100
    return SampleAssembler({0: (ch, stream)}, clock), stream


def test_assembler_scales_times_and_marks_invalid_samples() -> None:
    asm, stream = _assembler()
    block, gap = asm.add(Samples(0, 0, 500, (0, 100, -32768, -100)), wall_offset=1.7e9)
    assert gap is None
    assert block is not None
    assert block.stream is stream
    np.testing.assert_allclose(block.t_mono, [100.5, 100.51, 100.52, 100.53])
    np.testing.assert_allclose(block.t_wall, block.t_mono + 1.7e9)
    assert block.value[0] == pytest.approx(1.0)
    assert block.value[1] == pytest.approx(2.0)
    assert math.isnan(block.value[2])
    assert block.value[3] == pytest.approx(0.0)
    assert list(block.quality) == [0, 0, int(Quality.BAD_STATUS), 0]


def test_assembler_reports_gaps_without_filling_them_and_drops_duplicates() -> None:
    asm, _ = _assembler()
    b1, _ = asm.add(Samples(0, 0, 0, (1, 2, 3)), 0.0)
    b2, gap = asm.add(Samples(0, 10, 100, (4, 5)), 0.0)  # samples 3..9 never arrived
    assert b1 is not None
    assert b2 is not None
    assert gap is not None
    assert (gap.channel, gap.first_index, gap.missing) == ("pressure", 3, 7)
    assert len(b2) == 2  # nothing interpolated
    assert float(b2.t_mono[0]) == pytest.approx(100.1)
    dup, gap = asm.add(Samples(0, 10, 100, (4, 5)), 0.0)
    assert dup is None
    assert gap is None
    part, _ = asm.add(Samples(0, 11, 110, (5, 6, 7)), 0.0)  # overlaps by one
    assert part is not None
    assert len(part) == 2
    assert asm.missing == {"pressure": 7}
    assert asm.delivered == {"pressure": 7}
    assert asm.ranges == {"pressure": (0, 14)}
    assert asm.duplicates == 1
    assert asm.add(Samples(9, 0, 0, (1,)), 0.0) == (None, None)
    assert asm.unknown_channel == 1


def test_a_repeated_frame_is_neither_a_loss_nor_a_restart() -> None:
    t = SeqTracker()
    for seq in (10, 11, 12, 12, 11, 13):
        assert t.see(seq) == 0
    assert (t.lost, t.resets) == (0, 0)


def test_assembler_sees_a_reboot_in_the_sample_counter_or_the_clock() -> None:
    asm, _ = _assembler()
    for k in range(5):
        assert asm.add(Samples(0, 10 * k, 100 * k, tuple(range(10))), 0.0)[0] is not None
    with pytest.raises(NodeRestartedError, match="counter of pressure went back from 50 to 0"):
        asm.add(Samples(0, 0, 0, (1, 2, 3)), 0.0)  # a node that booted again, its HELLO lost
    asm, _ = _assembler()
    asm.add(Samples(0, 1000, 5000, (1, 2)), 0.0)
    with pytest.raises(NodeRestartedError, match=r"clock of pressure went back 4\.0 s"):
        asm.add(Samples(0, 1002, 1000, (3,)), 0.0)  # counter kept, clock started again


def test_assembler_never_moves_time_backwards_after_a_clock_refit() -> None:
    asm, _ = _assembler()
    b1, _ = asm.add(Samples(0, 0, 1000, (1, 2)), 0.0)
    asm.clock.add(200.0, 200.0, 100_000)  # a later sync that pulls the line back a little
    asm.clock.add(200.5, 200.5, 100_600)
    asm.clock.add(201.0, 201.0, 101_100)
    b2, _ = asm.add(Samples(0, 2, 1020, (3,)), 0.0)
    assert b1 is not None
    assert b2 is not None
    assert b2.t_mono[0] > b1.t_mono[-1]


def test_channel_names_become_metrics_and_mdc_names_medical_ones() -> None:
    ch = Channel(0, 0, 1000, 0.1, 0.0, "skin_temp", "Cel")
    assert metric_for(ch, {}).name == "skin_temp"
    assert metric_for(ch, {}).unit == "Cel"
    assert metric_for(ch, {"skin_temp": "MDC_TEMP_BODY"}) is MDC["MDC_TEMP_BODY"]
    assert metric_for(ch, {"skin_temp": "Bed3/Probe/Temp"}).name == "Bed3/Probe/Temp"
