"""The time certificate renewal goes by: the monotonic clock, set from wall-clock readings that pass a check.

Renewal compares the client certificate's validity (wall-clock dates) with *now*.  A wall clock
that steps (NTP on a Pi without a real-time clock, a manual change, a bad RTC) must not make the
gateway renew at the wrong time, nor refuse the renewed certificate from the twin:

* The time is kept as an *anchor* (a wall reading and the monotonic clock at that moment) and
  projected forward on the monotonic clock, so a step neither brings a renewal forward nor puts it
  off.
* A wall reading moves the anchor only when it is *sane*: inside the validity of the certificate
  the gateway holds (it was issued before now and has connected, so a clock before its start or
  past its end is wrong), and either within :data:`STEP_TOLERANCE_S` of the projection (drift,
  NTP slewing) or at the same offset from it for :data:`CONFIRM_S` on the monotonic clock (a
  correction that stays, e.g. NTP setting the clock after boot).
* With no anchor yet (the first reading was not sane) the wall clock is all there is, and is used.

Pure apart from the two clocks, which are injected (tests jump the wall clock).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: A wall reading further than this from the monotonic projection is a step, not drift.
STEP_TOLERANCE_S = 120.0
#: A step that stays at the same offset this long (monotonic) is taken as a correction.
CONFIRM_S = 600.0


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class RenewalClock:
    """Now, for judging certificates: monotonic time from the newest sane wall reading."""

    wall: Callable[[], dt.datetime] | None = None  # None: the system's wall clock
    mono: Callable[[], float] = time.monotonic
    anchor: tuple[dt.datetime, float] | None = None
    #: The newest step seen (signed seconds, wall minus projection) while it lasts; None when none.
    step_s: float | None = None
    _step_since: float = field(default=0.0, repr=False)

    def now(self, not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
        """The time to judge by, given the validity of the certificate the gateway holds."""
        wall, mono = (self.wall or _utc_now)(), self.mono()
        if self.anchor is None:
            if not_before <= wall < not_after:
                self.anchor = (wall, mono)
            return wall
        projected = self.anchor[0] + dt.timedelta(seconds=mono - self.anchor[1])
        offset = (wall - projected).total_seconds()
        sane = not_before <= wall < not_after
        if abs(offset) <= STEP_TOLERANCE_S:
            if not sane:
                # Near the projection but outside the validity: small steps in a row must not drag
                # the anchor past the certificate's end (or before its start).
                return projected
            if self.step_s is not None:
                log.info(
                    "downlink: wall clock back in step with the monotonic clock; renewal follows it again"
                )
                self.step_s = None
            self.anchor = (wall, mono)
            return wall
        if self.step_s is None or abs(offset - self.step_s) > STEP_TOLERANCE_S:
            log.warning(
                "downlink: wall clock stepped by %+.0f s (reads %s, %s): certificate renewal keeps "
                "to the monotonic clock until it is back or has stayed %.0f s inside the certificate's validity",
                offset,
                f"{wall:%Y-%m-%dT%H:%M:%SZ}",
                "inside the certificate's validity" if sane else "outside the certificate's validity",
                CONFIRM_S,
            )
            self.step_s, self._step_since = offset, mono
            return projected
        if sane and mono - self._step_since >= CONFIRM_S:
            log.info("downlink: wall-clock step of %+.0f s has lasted: taken as a correction", offset)
            self.anchor, self.step_s = (wall, mono), None
            return wall
        return projected
