"""Supervision: one task group, ordered start, restart by error class, watchdog and ordered stop.

Units are started group by group (outbox, uplink, models, sources); each group is given until the
start timeout to call ``started()`` or to fail a first time before the next group starts.  READY
is sent when every unit has reached that point, so systemd's start does not hang on a sensor that
is simply switched off: that sensor is shown in STATUS as retrying.

What a failure means is decided by the error's class (``gateway.errors``):

* transient (and ``OSError``/``TimeoutError``): retry with capped, jittered exponential backoff;
* authentication: retry with a long backoff (fast retries lock accounts and fill logs);
* config: never retry; the unit is marked failed and the others keep running - unless the unit is
  *critical* (the outbox, the pipeline), in which case the daemon stops with exit code 78;
* anything else is a bug: logged with its traceback, then treated as transient.

WATCHDOG=1 is sent only while the event loop turns (the sender is a task on it) and every unit
with a heartbeat has beaten recently, so a blocked loop or a wedged stage gets the service restarted.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from gateway import backoff
from gateway.errors import AuthError, ConfigError, EdgetwinError, TransientError
from gateway.notify import Notifier

log = logging.getLogger(__name__)

RunFn = Callable[[Callable[[], None]], Awaitable[None]]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78  # EX_CONFIG; the unit file's RestartPreventExitStatus keeps systemd from looping


class Group(enum.IntEnum):
    """Start order; stop runs in reverse."""

    OUTBOX = 0
    UPLINK = 1
    MODELS = 2
    PIPELINE = 3
    SOURCES = 4


class UnitState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "retrying"
    FAILED = "failed"
    STOPPED = "stopped"


# The whole stop, from SIGTERM to the supervisor's return, fits this budget: every wait on the
# way is cut to what is left of it.  With the outbox's close after it (its close timeout plus
# the grace given to a cancelled cleanup, 6 s) and a margin of 4 s, it stays inside the unit's
# TimeoutStopSec=30s (tests/test_stop_budget.py forces every wait to its maximum).
STOP_BUDGET_S = 20.0
UNIT_STOP_S = 5.0  # one group of units, at most, to end after its cancellation
_CANCEL_RESERVE_S = 3.0  # kept back from the drain for the units' cancellation after it
_DRAIN_CANCEL_S = 2.0  # a drain past its deadline, to end after its cancellation


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped, jittered exponential backoff, per error class."""

    base_s: float = 1.0
    cap_s: float = 60.0
    # Authentication failures: a PLC or broker that refuses our credentials will keep refusing
    # until someone changes them; retrying every few seconds only locks the account.
    auth_s: float = 300.0
    # A unit that ran this long after starting is healthy again: its backoff starts over.
    healthy_after_s: float = 60.0

    def delay(self, error: BaseException, attempt: int) -> float:
        """Seconds to wait before the next attempt after ``error`` (attempt counts from 1)."""
        if isinstance(error, AuthError):
            return backoff.jittered(self.auth_s)
        return backoff.delay(attempt, self.base_s, self.cap_s)


@dataclass(slots=True)
class Unit:
    """One supervised unit of work."""

    name: str
    group: Group
    run: RunFn
    critical: bool = False  # a config error here stops the whole daemon
    heartbeat: Callable[[], float] | None = None  # monotonic time of the unit's last sign of life
    stale_after_s: float = 10.0
    state: UnitState = UnitState.STARTING
    last_error: str = ""
    failures: int = 0
    retry_at: float = 0.0
    first_outcome: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    """Runs units in one task group; see the module docstring for the policy."""

    def __init__(
        self,
        notifier: Notifier,
        *,
        start_timeout_s: float = 30.0,
        backoff: Backoff | None = None,
        status_interval_s: float = 5.0,
        stop_budget_s: float = STOP_BUDGET_S,
    ) -> None:
        self._notifier = notifier
        self._stop_budget_s = stop_budget_s
        self._stop_deadline: float | None = None
        self._start_timeout_s = start_timeout_s
        self._backoff = backoff or Backoff()
        self._status_interval_s = status_interval_s
        self._units: list[Unit] = []
        self._stop = asyncio.Event()
        self._exit_code = EXIT_OK
        self._ready = False
        self.summary: Callable[[], str] = lambda: ""  # extra STATUS text (queue depth, counters)

    @property
    def units(self) -> tuple[Unit, ...]:
        """The registered units, in registration order."""
        return tuple(self._units)

    def add(self, unit: Unit) -> None:
        """Register a unit before :meth:`run`."""
        if any(u.name == unit.name for u in self._units):
            raise ValueError(f"supervisor: unit name {unit.name!r} used twice: names must be unique")
        self._units.append(unit)

    def request_stop(self, exit_code: int = EXIT_OK) -> None:
        """Ask for an orderly stop (signal handlers, a critical failure)."""
        if exit_code != EXIT_OK and self._exit_code == EXIT_OK:
            self._exit_code = exit_code
        self._stop.set()

    @property
    def ready(self) -> bool:
        """True once READY has been sent."""
        return self._ready

    async def run(self, drain: Callable[[float], Coroutine[Any, Any, None]], drain_deadline_s: float) -> int:
        """Start everything, run until a stop is requested, drain, stop in reverse; return the exit code."""
        # Named, tracked tasks rather than a TaskGroup: leaving a TaskGroup waits for every child
        # without limit, and a unit that swallows cancellation must not hold the stop (and the
        # outbox's final flush) hostage. Every wait below is bounded.
        tasks: dict[str, asyncio.Task[None]] = {}
        helpers = [asyncio.create_task(self._watchdog(), name="supervisor:watchdog")]
        try:
            start_deadline = time.monotonic() + self._start_timeout_s
            for group in sorted({u.group for u in self._units}):
                members = [u for u in self._units if u.group == group]
                for unit in members:
                    tasks[unit.name] = asyncio.create_task(self._keep_running(unit), name=f"unit:{unit.name}")
                await self._await_first_outcome(members, start_deadline)
                if self._stop.is_set():
                    break
            if not self._stop.is_set():
                await self._await_critical(start_deadline)
            if not self._stop.is_set():
                self._ready = True
                self._notifier.ready(self.status_line())
                log.info("gateway ready: %s", self.status_line())
            helpers.append(asyncio.create_task(self._status_loop(), name="supervisor:status"))
            await self._stop.wait()

            self._notifier.stopping("stopping: draining")
            self._stop_deadline = time.monotonic() + self._stop_budget_s
            # The drain gets what the stop budget leaves once the units' cancellation is reserved.
            drain_deadline_s = max(
                0.0, min(drain_deadline_s, self._stop_budget_s - UNIT_STOP_S - _CANCEL_RESERVE_S)
            )
            log.info("stopping: intake closed, draining for at most %.0f s", drain_deadline_s)
            # Stop intake first, then drain what was accepted, then stop the rest in reverse order.
            await self._cancel(
                [tasks[u.name] for u in self._units if u.group == Group.SOURCES and u.name in tasks]
            )
            deadline = min(time.monotonic() + drain_deadline_s, self._stop_deadline - _CANCEL_RESERVE_S)
            await self._drain(drain, deadline, drain_deadline_s)
            for group in sorted({u.group for u in self._units}, reverse=True):
                await self._cancel(
                    [tasks[u.name] for u in self._units if u.group == group and u.name in tasks]
                )
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.wait(helpers, timeout=min(1.0, self._stop_left()))
            await self._cancel(list(tasks.values()))
        for unit in self._units:
            if unit.state != UnitState.FAILED:
                unit.state = UnitState.STOPPED
        return self._exit_code

    async def _drain(
        self, drain: Callable[[float], Coroutine[Any, Any, None]], deadline: float, budget_s: float
    ) -> None:
        task = asyncio.create_task(drain(deadline), name="supervisor:drain")
        done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            log.warning(
                "stopping: drain deadline of %.0f s passed; what is left stays in the outbox", budget_s
            )
            task.cancel()
            await asyncio.wait({task}, timeout=min(_DRAIN_CANCEL_S, self._stop_left()))
        elif not task.cancelled() and task.exception() is not None:
            # A full disk or a closed stdout must not skip the ordered stop below.
            log.error("stopping: drain failed: %s; what is left stays in the outbox", task.exception())

    async def _cancel(self, tasks: list[asyncio.Task[None]]) -> None:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            # Bounded: a unit that ignores cancellation must not hold the stop forever, nor all
            # of them together the stop past its budget.
            limit = min(UNIT_STOP_S, self._stop_left())
            _, stuck = await asyncio.wait(pending, timeout=limit) if limit > 0 else (set(), set(pending))
            if stuck:
                log.error(
                    "stopping: %s did not stop within %.1f s; going on without them",
                    ", ".join(t.get_name() for t in stuck),
                    limit,
                )

    def _stop_left(self) -> float:
        """Seconds left of the stop budget (all of a unit's wait before the stop began)."""
        if self._stop_deadline is None:
            return UNIT_STOP_S
        return max(0.0, self._stop_deadline - time.monotonic())

    async def _await_critical(self, deadline: float) -> None:
        """READY needs the critical units (outbox, pipeline) running, not merely retrying."""
        while not self._stop.is_set():
            down = [u.name for u in self._units if u.critical and u.state != UnitState.RUNNING]
            if not down:
                return
            if time.monotonic() >= deadline:
                log.error("gateway cannot start: %s not running (see the errors above)", ", ".join(down))
                self.request_stop(EXIT_FAILURE)
                return
            await asyncio.sleep(0.05)

    async def _await_first_outcome(self, members: list[Unit], deadline: float) -> None:
        async def all_started() -> None:
            for unit in members:
                await unit.first_outcome.wait()

        waiters = {
            asyncio.create_task(all_started(), name="supervisor:start-wait"),
            asyncio.create_task(self._stop.wait(), name="supervisor:stop-wait"),
        }
        try:
            await asyncio.wait(
                waiters, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        for unit in members:
            if not unit.first_outcome.is_set():
                log.warning(
                    "unit %s has not started within %.0f s; going on without it",
                    unit.name,
                    self._start_timeout_s,
                )

    async def _keep_running(self, unit: Unit) -> None:
        attempt = 0
        while True:
            started_at: float | None = None

            def started(unit: Unit = unit) -> None:
                nonlocal started_at
                started_at = time.monotonic()
                if unit.state != UnitState.RUNNING:
                    if unit.failures:
                        log.info("unit %s recovered after %d failure(s)", unit.name, unit.failures)
                    else:
                        log.info("unit %s started", unit.name)
                unit.state = UnitState.RUNNING
                unit.failures = 0
                unit.first_outcome.set()

            try:
                await unit.run(started)
                error: BaseException = TransientError(
                    f"unit {unit.name}: run() returned: it should run until cancelled"
                )
            except asyncio.CancelledError:
                unit.state = UnitState.STOPPED
                raise
            except ConfigError as exc:
                unit.state = UnitState.FAILED
                unit.last_error = str(exc)
                unit.first_outcome.set()
                log.error("unit %s failed and will not be retried: %s", unit.name, exc)
                if unit.critical:
                    self.request_stop(EXIT_CONFIG)
                return
            except (TransientError, AuthError, OSError, TimeoutError) as exc:
                error = exc
            except EdgetwinError as exc:
                # Corrupt data, refused records: known conditions, worth a retry, not a trace.
                error = exc
            except Exception as exc:
                log.exception(
                    "unit %s: unexpected error (a bug; please report it with this trace)", unit.name
                )
                error = exc
            if self._stop.is_set():
                # Stopping: nothing restarts, whatever the unit did with its cancellation.
                unit.state = UnitState.STOPPED
                return
            if started_at is not None and time.monotonic() - started_at >= self._backoff.healthy_after_s:
                attempt = 0
            attempt += 1
            unit.failures += 1
            unit.last_error = f"{type(error).__name__}: {error}"
            delay = self._backoff.delay(error, attempt)
            unit.retry_at = time.monotonic() + delay
            if unit.state != UnitState.BACKOFF:
                log.warning("unit %s failed (%s); retrying in %.1f s", unit.name, unit.last_error, delay)
            else:
                log.debug("unit %s failed again (%s); retrying in %.1f s", unit.name, unit.last_error, delay)
            unit.state = UnitState.BACKOFF
            unit.first_outcome.set()
            await asyncio.sleep(delay)

    def stale_units(self, now: float | None = None) -> list[str]:
        """Names of running units whose heartbeat is older than they allow."""
        now = time.monotonic() if now is None else now
        return [
            u.name
            for u in self._units
            if u.heartbeat is not None
            and u.state == UnitState.RUNNING
            and now - u.heartbeat() > u.stale_after_s
        ]

    async def _watchdog(self) -> None:
        interval = self._notifier.watchdog_interval_s
        if interval is None:
            return
        period = interval / 4  # systemd's advice is half; a quarter leaves room for a slow turn
        was_stale: list[str] = []
        while True:
            await asyncio.sleep(period)
            stale = self.stale_units()
            if stale:
                if stale != was_stale:
                    log.error("watchdog: withholding keep-alive, stalled: %s", ", ".join(stale))
            else:
                if was_stale:
                    log.info("watchdog: all units alive again")
                self._notifier.watchdog()
            was_stale = stale

    def status_line(self) -> str:
        """One line for STATUS= and logs: what runs, what retries, what failed."""
        counts = dict.fromkeys(UnitState, 0)
        for u in self._units:
            counts[u.state] += 1
        parts = [f"{counts[UnitState.RUNNING]}/{len(self._units)} units running"]
        now = time.monotonic()
        retrying = [
            f"{u.name} in {max(0.0, u.retry_at - now):.0f}s"
            for u in self._units
            if u.state == UnitState.BACKOFF
        ]
        failed = [u.name for u in self._units if u.state == UnitState.FAILED]
        if retrying:
            parts.append("retrying: " + ", ".join(retrying))
        if failed:
            parts.append("failed (see log): " + ", ".join(failed))
        extra = self.summary()
        if extra:
            parts.append(extra)
        return "; ".join(parts)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self._status_interval_s)
            self._notifier.status(self.status_line())
