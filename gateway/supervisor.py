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

Liveness (``gateway.liveness``): a unit is alive while it makes progress or waits inside a bound
it declared; a reconnect loop that keeps trying is alive.  A unit that is neither is *stalled*: the
supervisor cancels that unit alone and restarts it with its backoff.  WATCHDOG=1 is sent whenever
the event loop turns (the sender is a task on it), so only a blocked loop stops the pings - and a
critical unit (outbox, pipeline) still stalled right after its restart, which nothing inside the
process can mend, so the service manager restarts the process.

Device units get their own backoff (:data:`DEVICE_BACKOFF`): a device that is away is polled
quickly, so it delivers within a second or two of coming back; a device that drops again soon after
each start is flapping and is retried ever more slowly; one glitch after a short healthy run starts
the count over.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from gateway import backoff
from gateway.errors import AuthError, ConfigError, EdgetwinError, TransientError
from gateway.liveness import Pulse, stale_reason
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
    # Runs that ended before ``healthy_after_s`` in a row (flaps) grow the delay up to this cap.
    flap_cap_s: float | None = None

    def delay(self, error: BaseException, attempt: int, flaps: int = 0) -> float:
        """Seconds to wait before the next attempt after ``error`` (attempt counts from 1).

        ``flaps`` counts the runs in a row that started and then failed before ``healthy_after_s``.
        """
        if isinstance(error, AuthError):
            return backoff.jittered(self.auth_s)
        if self.flap_cap_s is not None and flaps >= 2:
            # Started and dropped again and again: a bad cable or a device at the edge of range.
            # Reconnecting at once would flap alarms and logs; slow down, up to flap_cap_s.
            return backoff.jittered(min(self.flap_cap_s, self.base_s * 2 ** min(flaps, 30)))
        return backoff.delay(attempt, self.base_s, self.cap_s)


#: Backoff of device units (sources).  A device that is away (unplugged, out of range, PLC
#: down) costs one cheap open or connect per attempt, so it is tried at least every second and
#: delivers within about a second of coming back; 5 s of running mark a glitch as over.
DEVICE_BACKOFF = Backoff(base_s=0.25, cap_s=1.0, healthy_after_s=5.0, flap_cap_s=30.0)

STALL_CHECK_S = 0.5  # how often a running unit's liveness is looked at
CANCEL_WAIT_S = 5.0  # how long a cancelled unit may take to end


class StalledError(TransientError):
    """A unit neither made progress nor waited within a declared bound; it was cancelled."""


@dataclass(slots=True)
class Unit:
    """One supervised unit of work."""

    name: str
    group: Group
    run: RunFn
    critical: bool = False  # a config error here stops the whole daemon
    heartbeat: Callable[[], float] | None = None  # monotonic time of the unit's last sign of life
    stale_after_s: float = 10.0
    pulse: Pulse | None = None  # progress and bounded waits; judged instead of ``heartbeat``
    backoff: Backoff | None = None  # instead of the supervisor's default (device units)
    state: UnitState = UnitState.STARTING
    last_error: str = ""
    failures: int = 0
    retry_at: float = 0.0
    stall_restarts: int = 0  # restarts for a stall since the unit last showed life after one
    attempting: bool = False  # an attempt runs (not in a backoff sleep, not stopped)
    first_outcome: asyncio.Event = field(default_factory=asyncio.Event)

    def stale_reason(self, now: float) -> str | None:
        """Why this unit counts as stalled, or None (alive, between attempts, or reports no liveness)."""
        if not self.attempting:
            return None
        if self.pulse is not None:
            # Judged from the attempt's start (a connect that hangs before started() is stalled too).
            return self.pulse.stale_reason(now)
        if self.heartbeat is not None and self.state == UnitState.RUNNING:
            return stale_reason(self.heartbeat(), self.stale_after_s, now)
        return None


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
        self._tasks: dict[str, asyncio.Task[None]] = {}  # by unit name, while running
        self._stop = asyncio.Event()
        self._exit_code = EXIT_OK
        self._ready = False
        self._ready_event = asyncio.Event()
        self.summary: Callable[[], str] = lambda: ""  # extra STATUS text (queue depth, counters)
        # The whole STATUS text when it returns one (the gateway's status snapshot headline).
        self.describe: Callable[[], str | None] = lambda: None

    @property
    def units(self) -> tuple[Unit, ...]:
        """The registered units, in registration order."""
        return tuple(self._units)

    def add(self, unit: Unit) -> None:
        """Register a unit before :meth:`run`."""
        if any(u.name == unit.name for u in self._units):
            raise ValueError(f"supervisor: unit name {unit.name!r} used twice: names must be unique")
        self._units.append(unit)

    @property
    def stopping(self) -> bool:
        """True once a stop has been requested: units are being (or have been) stopped."""
        return self._stop.is_set()

    def start_unit(self, unit: Unit) -> None:
        """Register ``unit`` and start it now, while the others run (a config revision applied in place).

        Refused (logged, not started nor registered) once the gateway is stopping: nothing would
        stop it in order.
        """
        if self._stop.is_set():
            log.info("unit %s not started: the gateway is stopping", unit.name)
            return
        self.add(unit)
        self._tasks[unit.name] = asyncio.create_task(self._keep_running(unit), name=f"unit:{unit.name}")

    async def stop_unit(self, name: str) -> None:
        """Cancel unit ``name`` alone and forget it; bounded, and not cut short by a cancellation of the caller."""
        task = self._tasks.pop(name, None)
        for unit in self._units:
            if unit.name == name:
                unit.first_outcome.set()  # gone: start-up does not wait for it until its deadline
        self._units = [u for u in self._units if u.name != name]
        if task is not None:
            # Shielded: a caller cancelled mid-way must not leave the old unit running beside a new one.
            await asyncio.shield(self._cancel([task]))

    def request_stop(self, exit_code: int = EXIT_OK) -> None:
        """Ask for an orderly stop (signal handlers, a critical failure)."""
        if exit_code != EXIT_OK and self._exit_code == EXIT_OK:
            self._exit_code = exit_code
        self._stop.set()

    @property
    def ready(self) -> bool:
        """True once READY has been sent."""
        return self._ready

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until READY has been sent, for at most ``timeout_s``; whether it was."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready_event.wait(), timeout_s)
        return self._ready

    async def run(self, drain: Callable[[float], Coroutine[Any, Any, None]], drain_deadline_s: float) -> int:
        """Start everything, run until a stop is requested, drain, stop in reverse; return the exit code."""
        # Named, tracked tasks rather than a TaskGroup: leaving a TaskGroup waits for every child
        # without limit, and a unit that swallows cancellation must not hold the stop (and the
        # outbox's final flush) hostage. Every wait below is bounded.
        tasks = self._tasks
        helpers = [asyncio.create_task(self._watchdog(), name="supervisor:watchdog")]
        try:
            start_deadline = time.monotonic() + self._start_timeout_s
            for group in sorted({u.group for u in self._units}):
                members = [u for u in self._units if u.group == group]
                for unit in members:
                    if unit.name not in tasks:  # not started already by start_unit (a revision in place)
                        tasks[unit.name] = asyncio.create_task(
                            self._keep_running(unit), name=f"unit:{unit.name}"
                        )
                await self._await_first_outcome(members, start_deadline)
                if self._stop.is_set():
                    break
                # systemd shows STATUS= while the unit is still activating: what the outbox found on
                # opening (records lost to a damaged disk) is told from the first group on, even if
                # a stop comes before READY.
                self._notifier.status(f"starting ({group.name.lower()} up): {self.status_line()}")
            if not self._stop.is_set():
                await self._await_critical(start_deadline)
            if not self._stop.is_set():
                self._ready = True
                self._ready_event.set()
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
        policy = unit.backoff or self._backoff
        attempt = flaps = 0
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
                await self._attempt(unit, started)
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
            if started_at is not None:
                if time.monotonic() - started_at >= policy.healthy_after_s:
                    attempt = flaps = 0  # a glitch after a healthy run: start over, retry fast
                else:
                    flaps += 1
            attempt += 1
            unit.failures += 1
            unit.last_error = f"{type(error).__name__}: {error}"
            delay = policy.delay(error, attempt, flaps)
            unit.retry_at = time.monotonic() + delay
            if unit.state != UnitState.BACKOFF:
                log.warning("unit %s failed (%s); retrying in %.1f s", unit.name, unit.last_error, delay)
            else:
                log.debug("unit %s failed again (%s); retrying in %.1f s", unit.name, unit.last_error, delay)
            unit.state = UnitState.BACKOFF
            unit.first_outcome.set()
            await asyncio.sleep(delay)

    async def _attempt(self, unit: Unit, started: Callable[[], None]) -> None:
        """One run of ``unit`` as a task of its own, cancelled if it stalls (:class:`StalledError`)."""

        async def run() -> None:
            await unit.run(started)

        task = asyncio.create_task(run(), name=f"unit:{unit.name}:run")
        begun = time.monotonic()
        if unit.pulse is not None:
            unit.pulse.beat()  # starting an attempt is progress
        unit.attempting = True
        try:
            while True:
                due = time.monotonic() + STALL_CHECK_S
                await asyncio.wait({task}, timeout=STALL_CHECK_S)
                if task.done():
                    task.result()  # the unit's error, if it failed
                    return
                now = time.monotonic()
                if now - due > STALL_CHECK_S:
                    continue  # the whole loop was blocked: give the unit a turn before judging it
                reason = unit.stale_reason(now)
                if reason is None:
                    sign = unit.pulse.last_beat if unit.pulse is not None else None
                    if sign is None and unit.heartbeat is not None:
                        sign = unit.heartbeat()
                    if unit.stall_restarts and sign is not None and sign > begun:
                        unit.stall_restarts = 0  # alive again after a restart for a stall
                    continue
                if self._stop.is_set():
                    continue  # the ordered stop cancels it anyway
                unit.stall_restarts += 1
                # A stall is a bug or a wait without a bound: worth an ERROR once, not per restart.
                log.log(
                    logging.ERROR if unit.stall_restarts == 1 else logging.DEBUG,
                    "unit %s stalled: %s: cancelling it to restart it",
                    unit.name,
                    reason,
                )
                task.cancel()
                await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
                if not task.done():
                    log.error(
                        "unit %s did not end within %.0f s of its cancellation: it is restarted when it "
                        "ends (a bug: please report it)",
                        unit.name,
                        CANCEL_WAIT_S,
                    )
                    await asyncio.wait({task})
                raise StalledError(f"unit {unit.name}: stalled: {reason}")
        except asyncio.CancelledError:
            task.cancel()
            # Bounded: a unit that ignores cancellation must not hold the stop forever.
            await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
            raise
        finally:
            unit.attempting = False

    def stale_units(self, now: float | None = None) -> list[str]:
        """Names of running units that neither progress nor wait within a declared bound."""
        now = time.monotonic() if now is None else now
        return [u.name for u in self._units if u.stale_reason(now) is not None]

    def escalated_units(self) -> list[str]:
        """Critical units still stalled after a restart: only the service manager can mend them."""
        return [u.name for u in self._units if u.critical and u.stall_restarts >= 2]

    async def _watchdog(self) -> None:
        interval = self._notifier.watchdog_interval_s
        if interval is None:
            return
        period = interval / 4  # systemd's advice is half; a quarter leaves room for a slow turn
        was_escalated: list[str] = []
        loop_late = False
        while True:
            due = time.monotonic() + period
            await asyncio.sleep(period)
            late = time.monotonic() - due
            # This task runs only when the loop turns: a late wake-up is a blocked loop, seen after.
            if late > period and not loop_late:
                log.warning("watchdog: the event loop was blocked for %.1f s", late)
            loop_late = late > period
            escalated = self.escalated_units()
            if escalated:
                if escalated != was_escalated:
                    log.error(
                        "watchdog: withholding keep-alive: critical unit(s) %s stalled again after a "
                        "restart: the service manager is to restart the gateway",
                        ", ".join(escalated),
                    )
            else:
                if was_escalated:
                    log.info("watchdog: critical units alive again; keep-alive resumed")
                self._notifier.watchdog()
            was_escalated = escalated

    def status_line(self) -> str:
        """One line for STATUS= and logs: what runs, what retries, what failed."""
        described = self.describe()
        if described:
            return described
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
        waiting = [
            f"{u.name} ({u.pulse.wait})"
            for u in self._units
            if u.attempting and u.pulse is not None and u.pulse.wait is not None
        ]
        if retrying:
            parts.append("retrying: " + ", ".join(retrying))
        if waiting:
            parts.append("waiting: " + ", ".join(waiting))
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
