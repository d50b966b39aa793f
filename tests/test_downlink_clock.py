"""The time certificate renewal goes by, with the wall clock jumped (injected clocks).

The end-to-end run with the renewal's wall clock jumped in a real gateway process, against the real
TLS mosquitto, is ``test_downlink_clock_e2e.py`` (campaign).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from test_downlink_renewal import GW, _setup

from gateway.downlink.clock import CONFIRM_S, STEP_TOLERANCE_S, RenewalClock
from gateway.downlink.renewal import sign_csr

T0 = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
NOT_BEFORE = T0 - dt.timedelta(minutes=1)
NOT_AFTER = T0 + dt.timedelta(hours=1)  # a short-lived certificate


class Clocks:
    """A wall clock the test sets and a monotonic clock the test advances."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.offset = dt.timedelta(0)  # the wall clock's error

    def advance(self, seconds: float) -> None:
        self.mono += seconds

    def wall(self) -> dt.datetime:
        return T0 + dt.timedelta(seconds=self.mono - 1000.0) + self.offset

    def true(self) -> dt.datetime:
        return T0 + dt.timedelta(seconds=self.mono - 1000.0)

    def clock(self) -> RenewalClock:
        return RenewalClock(wall=self.wall, mono=lambda: self.mono)


def _now(c: RenewalClock) -> dt.datetime:
    return c.now(NOT_BEFORE, NOT_AFTER)


def test_a_jump_forward_past_expiry_or_back_before_issuance_does_not_move_the_time() -> None:
    clocks = Clocks()
    clock = clocks.clock()
    assert _now(clock) == T0  # sane: the anchor
    clocks.advance(30)
    clocks.offset = dt.timedelta(days=1)  # forward, past the certificate's end
    assert _now(clock) == clocks.true()
    assert clock.step_s == 86400
    clocks.advance(CONFIRM_S * 2)  # however long it lasts: outside the validity it is never taken
    assert _now(clock) == clocks.true()
    clocks.offset = -dt.timedelta(hours=1)  # back, before the certificate was issued
    assert _now(clock) == clocks.true()
    assert clock.step_s == -3600
    clocks.offset = dt.timedelta(seconds=STEP_TOLERANCE_S / 2)  # back in step (within drift)
    assert _now(clock) == clocks.wall()
    assert clock.step_s is None


def test_small_steps_in_a_row_cannot_drag_the_time_past_the_certificates_end() -> None:
    clocks = Clocks()
    clock = clocks.clock()
    assert _now(clock) == T0
    for _ in range(100):  # 100 s ahead at each reading, each one inside the drift tolerance
        clocks.advance(1)
        clocks.offset += dt.timedelta(seconds=STEP_TOLERANCE_S * 0.8)
        _now(clock)
    assert clocks.wall() > NOT_AFTER + dt.timedelta(hours=1)
    assert _now(clock) <= NOT_AFTER + dt.timedelta(seconds=STEP_TOLERANCE_S)


def test_a_step_inside_the_validity_is_taken_once_it_has_lasted() -> None:
    clocks = Clocks()
    clock = clocks.clock()
    _now(clock)
    clocks.offset = dt.timedelta(minutes=5)  # NTP correcting a clock that was behind
    assert _now(clock) == clocks.true()
    clocks.advance(CONFIRM_S / 2)
    assert _now(clock) == clocks.true()  # not yet
    clocks.offset = dt.timedelta(minutes=5, seconds=1)  # the same step, still there
    clocks.advance(CONFIRM_S / 2)
    assert _now(clock) == clocks.wall()  # taken as a correction
    assert clock.step_s is None
    clocks.advance(10)
    assert _now(clock) == clocks.wall()  # and followed from then on


def test_with_no_sane_reading_yet_the_wall_clock_is_all_there_is() -> None:
    clocks = Clocks()
    clocks.offset = -dt.timedelta(days=365)  # a Pi booted without a real-time clock
    clock = clocks.clock()
    assert _now(clock) == clocks.wall()
    assert clock.anchor is None
    clocks.offset = dt.timedelta(0)  # NTP sets it
    assert _now(clock) == clocks.wall()
    assert clock.anchor is not None


def test_a_renewed_certificate_is_taken_while_the_wall_clock_reads_before_its_issuance(
    tmp_path: Path,
) -> None:
    ca, renewal = _setup(tmp_path)
    real = dt.datetime.now(dt.UTC)
    offset = dt.timedelta(0)
    renewal.clock = RenewalClock(wall=lambda: dt.datetime.now(dt.UTC) + offset)
    assert abs((renewal.now() - real).total_seconds()) < 60  # anchored on a sane reading
    good = sign_csr(renewal.make_csr(), ca.cert, ca.key, days=90, gateway=GW)
    offset = -dt.timedelta(days=2)  # the wall clock jumps back, before the new certificate's start
    assert renewal.check(good, renewal.now()).not_valid_after_utc > real
    assert renewal.clock.step_s is not None
    assert round(renewal.days_left(renewal.now())) > 80  # the current pair, judged by the kept time
