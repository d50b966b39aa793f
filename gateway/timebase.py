"""Record time that survives restarts and clock steps, without dates leaving the gateway.

A gateway keeps, in its state directory (``timebase.json``), a per-site *origin* (the wall time
of its first start), a *boot counter* and the highest record time it has used.  That file is only
ever replaced synced (at a start, a stop, a reset); the high mark a running gateway writes every
``PERSIST_EVERY_S`` goes to ``timebase.high`` unsynced, so a power cut can tear only that one (and
lose at most the high mark of the run it cut), never the origin or the counter.  Every process
start increments the counter: that is the *run* every record carries.  Record time ``t`` is
seconds since the origin, running on the monotonic clock within a run and starting each run no
lower than where the previous run ended, so a consumer can order every record of a gateway by
(run, t) and never sees time go backwards.

The wall clock is still watched: when it steps (NTP on a Pi without a real-time clock, a manual
change), the step is reported once (:meth:`TimeBase.take_steps`, sent as a ``clock_step``
diagnostic).  A backward step is absorbed: record time keeps running, so records never show time
running backwards.  A forward step first makes up for what was absorbed (the clock catching up
again, as NTP does on a Pi that booted with an old time) and moves record time ahead only by the
rest.  So record time follows the wall clock whenever the wall clock is not behind it.

Durations across restarts (how long an alarm carried over a restart has held) are counted on a
third clock, :meth:`TimeBase.life`: the monotonic clock within a run, and between two runs the
downtime the wall clock shows (its reading at the start less its reading at the last stop, never
less than 0).  A wall-clock step seen during the run is taken as the wall clock setting itself
right, so it corrects that downtime and nothing else: a Pi that booted days behind counts its true
downtime once NTP steps its clock, one that booted ahead loses the excess when it is stepped back,
and a step never lengthens a span within a run.  Record time cannot serve: it moves ahead with a
forward step and never goes back, so a condition raised before NTP stepped the clock would have
held the whole step longer after the next restart.

Rotating the site key starts a new origin and counter (:meth:`TimeBase.reset`): time that went on
across a rotation would link the old identity to the new one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ConfigError
from gateway.privatefile import write_atomic

log = logging.getLogger(__name__)

FILE_NAME = "timebase.json"
#: The running high mark (written unsynced, beside FILE_NAME): see the module doc.
HIGH_NAME = "timebase.high"
#: A change of the wall clock against the monotonic clock larger than this is a step, not drift.
STEP_TOLERANCE_S = 2.0
#: How often the highest record time is written back (a crash loses at most this much of it).
PERSIST_EVERY_S = 10.0
#: Forward steps remembered for :meth:`TimeBase.at`; a record sealed after more steps than this
#: since its instant takes the offset of the oldest one kept (a clock this unsteady has no true time).
MOVES_KEPT = 16


@dataclass(frozen=True, slots=True)
class ClockStep:
    """One wall-clock step seen by the time base."""

    step_s: float  # signed: negative when the wall clock went back
    applied_s: float  # how far record time moved ahead with it (0 for a step back, absorbed)
    t: float  # record time (site seconds) when it was seen


@dataclass(frozen=True, slots=True)
class _Saved:
    """What a time base file holds."""

    origin: float
    boot: int
    high: float  # the highest record time used
    life: float  # :meth:`TimeBase.life` when written
    wall: float  # the wall clock's reading when written


def _read(path: Path) -> _Saved:
    state = json.loads(path.read_text(encoding="utf-8"))
    origin, boot, high = float(state["origin"]), int(state["boot"]), float(state["high"])
    # Written before the life clock: record time stands in for it, the wall clock it followed.
    life, wall = float(state.get("life", high)), float(state.get("wall", origin + high))
    if not (all(map(math.isfinite, (origin, high, life, wall))) and boot >= 0):
        raise ValueError(
            f"origin {origin}, boot {boot}, high {high}, life {life}, wall {wall}: non-finite or negative"
        )
    return _Saved(origin, boot, high, life, wall)


def _running(path: Path, saved: _Saved) -> _Saved:
    """What the run ``saved.boot`` of ``saved.origin`` wrote while running, when newer than ``saved``."""
    try:
        running = _read(path)
    except FileNotFoundError:
        return saved
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # Written unsynced: a power cut may leave it torn.  Only the last run's high mark is lost;
        # a wall clock that is right (or steps forward) starts the next run after it anyway.
        log.warning("time base %s: unreadable (%s): the last run's time is taken from its start", path, exc)
        return saved
    if (running.origin, running.boot) != (saved.origin, saved.boot) or running.high <= saved.high:
        return saved  # of a reset origin (not this one's), or older than the orderly stop's
    return running


class TimeBase:
    """The gateway's record clock: run number, site origin, monotonic record time; see the module doc."""

    def __init__(
        self,
        *,
        origin: float,
        boot: int,
        high: float,
        path: Path | None = None,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        life: float = 0.0,
        last_wall: float | None = None,
    ) -> None:
        self.path = path
        self._write_failed = False
        self.origin = origin  # wall time (Unix seconds) of the site's first start: never sent
        self.run = boot
        self._wall = wall
        self._mono = mono
        mono0, wall0 = mono(), wall()
        # A new run starts where the wall clock says, or just after the last run if it says less.
        start = max(wall0 - origin, high + 0.001 if high > 0 else 0.0)
        self._offset = start - mono0  # record time = monotonic + offset
        self._wm = wall0 - mono0  # wall minus monotonic, as last seen: its jumps are steps
        self._steps: list[ClockStep] = []
        # (monotonic instant a forward step was seen, how far record time moved then), newest last:
        # an instant before it keeps the record time it had (see :meth:`at`).
        self._moves: deque[tuple[float, float]] = deque(maxlen=MOVES_KEPT)
        self._behind = 0.0  # how far the wall clock is behind record time (steps back absorbed)
        # The life clock (see the module doc): the last run's at its stop, and the downtime since as
        # the wall clock shows it, signed (a clock behind reads less than the stop), steps added.
        self._life0, self._mono0 = life, mono0
        self._downtime: float | None = None if last_wall is None else wall0 - last_wall
        if high - (wall0 - origin) > STEP_TOLERANCE_S:
            # The wall clock reads less than when the last run stopped: stepped back while down.
            self._behind = high - (wall0 - origin)
            self._steps.append(ClockStep((wall0 - origin) - high, 0.0, start))
            log.warning(
                "time base: the wall clock is %.3f s behind the last run's time; record time goes on "
                "from the last run",
                high - (wall0 - origin),
            )
        self._persisted_at = mono0
        self._save()

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> TimeBase:
        """Start a new run: read the state directory's time base (creating it) and count this start."""
        path = state_dir / FILE_NAME
        saved: _Saved | None = None
        try:
            saved = _running(path.with_name(HIGH_NAME), _read(path))
        except FileNotFoundError:
            log.info("time base: new site origin in %s", path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable: start again.  Runs restart at 1, which a twin orders before the runs it
            # saw, until the gateway's epoch changes; said loudly so the operator knows why.
            log.error(
                "time base %s: unreadable (%s): a new site origin and run counter are started; "
                "twins may show this gateway's values as older until its sequence epoch changes",
                path,
                exc,
            )
        if saved is None:
            return cls(origin=wall(), boot=1, high=0.0, path=path, wall=wall, mono=mono)
        return cls(
            origin=saved.origin,
            boot=saved.boot + 1,
            high=saved.high,
            path=path,
            wall=wall,
            mono=mono,
            life=saved.life,
            last_wall=saved.wall,
        )

    @classmethod
    def ephemeral(cls, start_wall: float | None = None) -> TimeBase:
        """A time base kept in memory only (tools and tests), run 1.

        Without ``start_wall``: origin now, on the real clocks.  With it (a replay that makes its
        own times): origin at ``start_wall`` and monotonic 0, the clocks held there, so a record's
        time is its monotonic instant and a wall stamp ``w`` is ``w - start_wall``.
        """
        if start_wall is None:
            return cls(origin=time.time(), boot=1, high=0.0)
        return cls(origin=start_wall, boot=1, high=0.0, wall=lambda: start_wall, mono=lambda: 0.0)

    def reset(self) -> None:
        """Start a new origin and boot counter (after a key rotation: nothing may link the two).

        The counter is left at 0: the next start is run 1, as for a gateway that never ran.
        """
        wall0, mono0 = self._wall(), self._mono()
        self.origin, self.run = wall0, 0
        self._offset = -mono0
        self._wm = wall0 - mono0
        self._behind = 0.0
        # The life clock goes on: the alarm ledger, kept across a rotation, counts the spans of its
        # conditions on it, as it did on the wall clock.
        self._steps.clear()
        self._moves.clear()
        self._save()

    def now(self) -> float:
        """The current record time (seconds since the site origin)."""
        return self._mono() + self._offset

    def at(self, t_mono: float) -> float:
        """The record time of monotonic instant ``t_mono`` (the gateway's ``time.monotonic``).

        The rule for stamps: a record's time is its monotonic instant plus the offset in force
        then, so a forward step moves only the records of instants after it was seen, and a
        sample stamped before it keeps its place even when its window is sealed after.  Its wall
        stamp is not used: a driver's wall stamp may be projected from an earlier reading and so
        be on either side of the step.
        """
        self.check()
        return t_mono + self._offset - sum(applied for seen, applied in self._moves if seen > t_mono)

    def life(self, t_mono: float) -> float:
        """The life clock at monotonic instant ``t_mono``: spans across restarts are differences of it (see the module doc)."""
        self.check()
        return self._life_at(t_mono)

    def _life_at(self, t_mono: float) -> float:
        return self._life0 + max(0.0, self._downtime or 0.0) + (t_mono - self._mono0)

    def site(self, t_wall: float) -> float:
        """The record time of an instant the gateway stamped with wall time ``t_wall``."""
        self.check()
        return t_wall - self._wm + self._offset

    def check(self) -> ClockStep | None:
        """Look for a wall-clock step now; remember it for :meth:`take_steps` and return it."""
        mono = self._mono()
        wm = self._wall() - mono
        step = wm - self._wm
        if mono - self._persisted_at >= PERSIST_EVERY_S:
            self._persisted_at = mono
            # Not synced: this runs on the event loop, and a lost high mark only matters when the
            # wall clock also went back; the run counter is synced at every start.
            self._save(sync=False, strict=False)
        if abs(step) <= STEP_TOLERANCE_S:
            return None
        if self._downtime is not None:
            self._downtime += step  # the wall clock setting itself right: so was its reading at the start
        if step < 0:
            self._behind -= step
            applied = 0.0
        else:
            caught_up = min(step, self._behind)
            self._behind -= caught_up
            applied = step - caught_up
            self._offset += applied
            if applied:
                self._moves.append((mono, applied))
        self._wm = wm
        found = ClockStep(step, applied, mono + self._offset)
        self._steps.append(found)
        log.warning(
            "time base: the wall clock stepped %+.3f s; record time moved ahead %.3f s "
            "(the wall clock is %.3f s behind it now)",
            step,
            applied,
            self._behind,
        )
        return found

    def take_steps(self) -> list[ClockStep]:
        """The steps seen since the last call (each reported once)."""
        self.check()
        steps, self._steps = self._steps, []
        return steps

    def close(self) -> None:
        """Write the highest record time back (an orderly stop)."""
        self._save(strict=False)

    def _save(self, *, sync: bool = True, strict: bool = True) -> None:
        """Write the state file (synced), or only the running high mark; ConfigError when ``strict`` (a start), else a warning."""
        if self.path is None:
            return
        life = self._life_at(self._mono())
        state = {
            "origin": self.origin,
            "boot": self.run,
            "high": self.now(),
            "life": life,
            "wall": self._wall(),
        }
        body = json.dumps(state).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if sync:
                write_atomic(self.path, body)
            else:
                # Not synced (on the event loop), so never over the origin and counter: see the module doc.
                high = self.path.with_name(HIGH_NAME)
                tmp = high.with_name(f".{high.name}.{os.getpid()}.tmp")
                tmp.write_bytes(body)
                tmp.replace(high)
            if self._write_failed:
                log.info("time base %s: written again", self.path)
            self._write_failed = False
        except OSError as exc:
            if not strict:
                # The run counter was written at the start; a stale high mark is no reason to stop.
                log.log(
                    logging.DEBUG if self._write_failed else logging.WARNING,
                    "time base %s: cannot write the high mark: %s",
                    self.path,
                    exc.strerror,
                )
                self._write_failed = True
                return
            raise ConfigError(
                f"time base {self.path}: cannot write: {exc.strerror}: "
                "make the state directory writable by the gateway's user"
            ) from exc
