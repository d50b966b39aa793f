"""Record time across restarts and wall-clock steps, and the twin's view of a restarted gateway.

The clocks are injected: a restart is a new TimeBase over the same state directory, and the wall
clock stepped back an hour is an injected wall clock that reads an hour less.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.contracts import Diagnostic, StreamFeatures, WindowRecord
from gateway.records import FeaturesWindow, SeqMeta, decode, encode, wrap
from gateway.sample import MDC, Stream
from gateway.timebase import FILE_NAME, TimeBase
from gateway.twin.decoder import decode_message
from gateway.twin.sequence import SequenceChecker
from gateway.twin.view import TwinView

SPO2 = Stream("oxi", "bed-7", "AA:BB:CC:DD:EE:FF", MDC["MDC_PULS_OXIM_SAT_O2"])


class Clocks:
    """A wall clock and a monotonic clock the test moves by hand."""

    def __init__(self, wall: float, mono: float = 1000.0) -> None:
        self.w = wall
        self.m = mono

    def wall(self) -> float:
        return self.w

    def mono(self) -> float:
        return self.m

    def advance(self, s: float) -> None:
        self.w += s
        self.m += s


def _open(state: Path, c: Clocks) -> TimeBase:
    return TimeBase.open(state, wall=c.wall, mono=c.mono)


def test_runs_count_up_and_time_goes_on_from_the_site_origin(tmp_path: Path) -> None:
    c = Clocks(1.7e9)
    first = _open(tmp_path, c)
    assert (first.run, first.now()) == (1, 0.0)
    c.advance(100.0)
    assert first.site(c.w) == pytest.approx(100.0)
    first.close()
    c.advance(50.0)
    c.m = 5.0  # the machine rebooted: the monotonic clock starts again
    second = _open(tmp_path, c)
    assert second.run == 2
    assert second.now() == pytest.approx(150.0)  # counted from the origin, not from this start
    saved = json.loads((tmp_path / FILE_NAME).read_text())
    assert (saved["origin"], saved["boot"]) == (1.7e9, 2)


def test_a_restart_with_the_wall_clock_an_hour_back_keeps_time_going_forward(tmp_path: Path) -> None:
    c = Clocks(1.7e9)
    first = _open(tmp_path, c)
    c.advance(600.0)
    last_of_first = first.site(c.w)
    first.close()
    c.w -= 3600.0  # NTP not yet synced after a reboot: the wall clock is an hour behind
    second = _open(tmp_path, c)
    assert second.run == 2
    assert second.site(c.w) > last_of_first  # starts after the last run, not an hour earlier
    (step,) = second.take_steps()  # and says so once
    assert (round(step.step_s), step.applied_s) == (-3600, 0.0)
    # NTP puts the wall clock right: it catches up, record time does not jump an hour ahead.
    c.advance(5.0)
    before_sync = second.site(c.w)
    c.w += 3600.0
    assert second.site(c.w) == pytest.approx(before_sync, abs=0.01)
    (sync,) = second.take_steps()
    assert (round(sync.step_s), sync.applied_s) == (3600, 0.0)
    c.advance(10.0)
    assert second.site(c.w) == pytest.approx(last_of_first + 15.0, abs=0.01)


def test_a_step_back_while_running_is_absorbed_and_reported_once(tmp_path: Path) -> None:
    c = Clocks(1.7e9)
    tb = _open(tmp_path, c)
    c.advance(100.0)
    before = tb.site(c.w)
    c.advance(1.0)
    c.w -= 3600.0
    after = tb.site(c.w)
    assert after == pytest.approx(before + 1.0)  # no time running backwards
    (step,) = tb.take_steps()
    assert (round(step.step_s), step.applied_s) == (-3600, 0.0)
    assert tb.take_steps() == []
    c.w += 7200.0  # an NTP step forward: an hour of catching up, then an hour ahead
    assert tb.site(c.w) == pytest.approx(after + 3600.0)
    (fwd,) = tb.take_steps()
    assert fwd.applied_s == pytest.approx(3600.0)


def test_drift_below_the_tolerance_is_no_step(tmp_path: Path) -> None:
    c = Clocks(1.7e9)
    tb = _open(tmp_path, c)
    c.advance(10.0)
    c.w += 0.5
    tb.site(c.w)
    assert tb.take_steps() == []


def test_an_unreadable_time_base_starts_again_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / FILE_NAME).write_text("{not json")
    tb = _open(tmp_path, Clocks(1.7e9))
    assert tb.run == 1
    assert "unreadable" in caplog.text


def test_reset_starts_a_new_origin_and_counter(tmp_path: Path) -> None:
    c = Clocks(1.7e9)
    tb = _open(tmp_path, c)
    tb.close()
    tb = _open(tmp_path, c)
    c.advance(5000.0)
    tb.reset()
    assert (tb.run, tb.now()) == (0, 0.0)
    assert json.loads((tmp_path / FILE_NAME).read_text())["boot"] == 0
    c.advance(1.0)
    again = _open(tmp_path, c)
    assert (again.run, again.now()) == (1, 1.0)  # the first run of the new identity
    # The alarms kept across the rotation go on counting how long they have held (life is never sent).
    assert again.life(c.m) == pytest.approx(5001.0)


def _window(anon: Anonymizer, c: Clocks, spo2: float) -> bytes:
    sf = StreamFeatures(SPO2, 10, 0.0, {"mean": spo2})
    rec = WindowRecord("bed-7", "medical", 0, c.m, c.w, 10.0, (sf,))
    sealed = anon.seal(lambda: anon.window(rec), encode)
    assert sealed is not None
    return sealed[1]


@pytest.mark.parametrize("wall_back_s", [0.0, 3600.0])
def test_the_twin_shows_a_restarted_gateways_values_at_once(tmp_path: Path, wall_back_s: float) -> None:
    """Two runs of one gateway, one epoch; the second starts with the wall clock as given."""
    c = Clocks(1.7e9)
    key = Pseudonymizer(b"k" * 32)
    view, checker = TwinView(), SequenceChecker()
    seq = 0
    topic = "edgetwin/v1/gw/features/x"

    def deliver(data: bytes, historical: bool = False) -> None:
        nonlocal seq
        seq += 1
        msg = decode_message(topic, wrap(data, SeqMeta(seq, 7, historical)))
        assert msg is not None
        rec = msg.record
        assert isinstance(rec, FeaturesWindow)
        view.update(msg)
        checker.observe("gw", 7, seq, msg.kind, historical, rec.run)

    first = Anonymizer(key, time_mode="relative", timebase=_open(tmp_path, c))
    for _ in range(60):  # ten minutes of windows at 97 %
        c.advance(10.0)
        last = _window(first, c, 97.0)
        deliver(last)
    first.timebase.close()
    c.advance(5.0)
    c.w -= wall_back_s
    second = Anonymizer(key, time_mode="relative", timebase=_open(tmp_path, c))
    c.advance(10.0)
    deliver(_window(second, c, 84.0))  # a desaturation in the new run's first window
    (subject,) = view.gateways["gw"].subjects.values()
    assert subject.streams["MDC_PULS_OXIM_SAT_O2"].features["mean"] == 84.0
    assert subject.run == 2
    (state,) = checker.gateways.values()
    assert (state.restarts, state.missing, state.duplicates, state.reordered) == (1, 0, 0, 0)
    # The step back an hour is reported as a diagnostic, never as time running backwards.
    assert len(second.timebase.take_steps()) == (1 if wall_back_s else 0)
    diag = second.seal(lambda: second.diagnostic(Diagnostic("counters", None, c.w, {})), encode)
    assert diag is not None
    assert decode(diag[1]).t > decode(last).t


def _files(state: Path) -> dict[str, tuple[int, int]]:
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in state.iterdir()}


def test_a_power_cut_after_a_running_save_keeps_the_origin_and_the_run_counter(tmp_path: Path) -> None:
    c = Clocks(1.7e9)
    _open(tmp_path, c).close()
    tb = _open(tmp_path, c)  # run 2
    before = _files(tmp_path)
    c.advance(30.0)
    tb.check()  # the running save of the high mark, unsynced
    written = [name for name, stamp in _files(tmp_path).items() if before.get(name) != stamp]
    assert written
    # The power cut: what was written unsynced is torn (its data never reached the disk).
    for name in written:
        (tmp_path / name).write_bytes(b"")
    c.advance(10.0)
    c.m = 5.0
    after = _open(tmp_path, c)
    assert after.run == 3  # the same site: its origin and counter survived
    assert after.now() == pytest.approx(40.0)


def test_a_killed_run_with_the_wall_clock_back_after_it_starts_after_its_running_high_mark(
    tmp_path: Path,
) -> None:
    c = Clocks(1.7e9)
    tb = _open(tmp_path, c)
    c.advance(30.0)
    tb.check()  # the running save; then killed: no close
    c.w -= 3600.0
    c.m = 5.0
    after = _open(tmp_path, c)
    assert after.run == 2
    assert after.now() == pytest.approx(30.001)


def _t_of(anon: Anonymizer, end_mono: float, end_wall: float) -> float:
    sf = StreamFeatures(SPO2, 10, 0.0, {"mean": 97.0})
    sealed = anon.seal(
        lambda: anon.window(WindowRecord("bed-7", "medical", 0, end_mono, end_wall, 10.0, (sf,))), encode
    )
    assert sealed is not None
    payload = decode(sealed[1])
    assert isinstance(payload, FeaturesWindow)
    return payload.t


def test_a_record_s_time_is_its_monotonic_instant_whatever_wall_stamp_a_driver_projected(
    tmp_path: Path,
) -> None:
    # A Pi without a real-time clock boots two days behind; NTP steps it forward mid-run, later a
    # few seconds back.  Drivers stamp wall time by projecting an earlier reading on the monotonic
    # clock (the simulator from its start, the MCU link from its last offset, a held OPC UA node from
    # its last change), so a stamp can be on either side of a step: record time must not follow it.
    c = Clocks(1.7e9 - 2 * 86400.0)
    anon = Anonymizer(Pseudonymizer(b"k" * 32), time_mode="relative", timebase=_open(tmp_path, c))
    m0, w0 = c.m, c.w  # the driver's anchor

    def projected(m: float) -> float:
        return w0 + (m - m0)

    c.advance(10.0)
    before = c.m - 1.0  # a window that ended before the step, sealed after it
    c.w += 2 * 86400.0
    assert _t_of(anon, before, projected(before)) == pytest.approx(9.0)
    (fwd,) = anon.timebase.take_steps()
    assert fwd.applied_s == pytest.approx(2 * 86400.0)
    c.advance(2.0)
    after = _t_of(anon, c.m, projected(c.m))
    assert after == pytest.approx(12.0 + 2 * 86400.0)  # moved ahead with the step it followed
    assert after > fwd.t
    c.advance(2.0)
    c.w -= 5.0  # a step back: absorbed, and a stamp of the old clock is not 5 s in the future
    old_clock = _t_of(anon, c.m, c.w + 5.0)
    c.advance(1.0)
    new_clock = _t_of(anon, c.m, c.w)
    assert new_clock - old_clock == pytest.approx(1.0)


@pytest.mark.parametrize("boot_error_s", [-2 * 86400.0, 2 * 86400.0])
def test_the_life_clock_counts_the_true_downtime_once_the_wall_clock_is_set_right(
    tmp_path: Path, boot_error_s: float
) -> None:
    c = Clocks(1.7e9)
    first = _open(tmp_path, c)
    c.advance(100.0)
    onset = first.life(c.m)  # a condition begins
    c.advance(50.0)
    first.close()
    c.advance(3600.0)  # an hour down; the machine boots with its wall clock two days off
    c.m = 5.0
    c.w += boot_error_s
    second = _open(tmp_path, c)
    c.advance(10.0)
    # Unknown downtime (the clock behind): what is known, never less; ahead: the excess until set right.
    assert second.life(c.m) - onset == pytest.approx(60.0 + max(0.0, 3600.0 + boot_error_s))
    c.w -= boot_error_s  # NTP sets it right
    c.advance(10.0)
    assert second.life(c.m) - onset == pytest.approx(3670.0)
    second.close()
    c.advance(60.0)  # down a minute, the clock right: the step before is not counted again
    c.m = 1.0
    assert _open(tmp_path, c).life(c.m) - onset == pytest.approx(3730.0)


def test_a_step_within_a_run_does_not_move_its_life_clock(tmp_path: Path) -> None:
    c = Clocks(1.7e9 - 2 * 86400.0)  # the first start, two days behind
    tb = _open(tmp_path, c)
    c.advance(10.0)
    onset = tb.life(c.m)
    c.w += 2 * 86400.0
    c.advance(10.0)
    assert tb.life(c.m) - onset == pytest.approx(10.0)
    assert tb.now() == pytest.approx(20.0 + 2 * 86400.0)  # record time follows the wall clock


def test_a_time_base_written_before_the_life_clock_counts_from_its_high_mark(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text(json.dumps({"origin": 1.7e9, "boot": 3, "high": 500.0}))
    c = Clocks(1.7e9 + 600.0, mono=7.0)
    tb = _open(tmp_path, c)
    assert tb.run == 4
    assert tb.life(c.m) == pytest.approx(600.0)  # the high mark, and 100 s down
    saved = json.loads((tmp_path / FILE_NAME).read_text())
    assert (saved["life"], saved["wall"]) == (pytest.approx(600.0), 1.7e9 + 600.0)
