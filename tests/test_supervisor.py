"""Supervisor: start order, restart by error class, READY/WATCHDOG/STOPPING, drain deadline."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import AuthError, ConfigError, TransientError
from gateway.liveness import WAIT_GRACE_S, Pulse
from gateway.notify import Notifier
from gateway.supervisor import DEVICE_BACKOFF, EXIT_CONFIG, Backoff, Group, Supervisor, Unit, UnitState

FAST = Backoff(base_s=0.01, cap_s=0.05, auth_s=5.0, healthy_after_s=60.0)


class Receiver:
    """A test-owned NOTIFY_SOCKET: collects every datagram the supervisor sends."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.path = path
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "notify.sock")
    yield r
    r.sock.close()


@pytest.fixture
def notifier(receiver: Receiver) -> Iterator[Notifier]:
    n = Notifier(str(receiver.path))
    yield n
    n.close()


def _forever(log: list[str], name: str) -> Callable[[Callable[[], None]], object]:
    async def run(started: Callable[[], None]) -> None:
        log.append(name)
        started()
        await asyncio.Event().wait()

    return run


async def _nothing_to_drain(deadline: float) -> None:
    return None


def _stop_once(sup: Supervisor, condition: Callable[[], bool], timeout_s: float = 10.0) -> asyncio.Task[None]:
    """Request the stop once ``condition`` holds (bounded), not after a fixed time a loaded machine may miss."""

    async def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        sup.request_stop()

    return asyncio.create_task(watch(), name="test:stop-once")


def test_start_order_ready_and_stop(receiver: Receiver, notifier: Notifier) -> None:
    order: list[str] = []

    async def main() -> int:
        sup = Supervisor(notifier, backoff=FAST)
        # Registered out of order on purpose: the group decides.
        sup.add(Unit("src", Group.SOURCES, _forever(order, "src")))  # type: ignore[arg-type]
        sup.add(Unit("up", Group.UPLINK, _forever(order, "up")))  # type: ignore[arg-type]
        sup.add(Unit("box", Group.OUTBOX, _forever(order, "box")))  # type: ignore[arg-type]
        stopper = _stop_once(sup, lambda: sup.ready)
        code = await sup.run(_nothing_to_drain, 1.0)
        await stopper
        assert all(u.state == UnitState.STOPPED for u in sup.units)
        return code

    assert asyncio.run(main()) == 0
    assert order == ["box", "up", "src"]
    messages = receiver.drain()
    # While starting, STATUS= follows each group; READY comes once the last one is up.
    assert [m.split(":")[0] for m in messages[:3]] == [
        "STATUS=starting (outbox up)",
        "STATUS=starting (uplink up)",
        "STATUS=starting (sources up)",
    ], messages
    assert messages[0].startswith("STATUS=starting (outbox up): 1/3 units running"), messages
    assert messages[3].startswith("READY=1\nSTATUS=3/3 units running"), messages
    assert messages[-1].startswith("STOPPING=1")


def test_transient_errors_retry_until_recovery() -> None:
    attempts: list[float] = []

    async def flaky(started: Callable[[], None]) -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 4:
            raise TransientError("flaky: link down")
        started()
        await asyncio.Event().wait()

    async def main() -> Supervisor:
        sup = Supervisor(Notifier(None), backoff=FAST)
        sup.add(Unit("flaky", Group.SOURCES, flaky))
        stopper = _stop_once(sup, lambda: sup.units[0].state == UnitState.RUNNING)
        await sup.run(_nothing_to_drain, 1.0)
        await stopper
        return sup

    sup = asyncio.run(main())
    assert len(attempts) == 4
    assert sup.units[0].failures == 0  # reset on recovery


def test_config_error_fails_one_source_and_the_rest_keep_running(
    receiver: Receiver, notifier: Notifier
) -> None:
    calls = {"bad": 0}
    ticks: list[float] = []

    async def bad(started: Callable[[], None]) -> None:
        calls["bad"] += 1
        raise ConfigError("source bad /dev/ttyUSB9: no such port: fix sources[1].port")

    async def good(started: Callable[[], None]) -> None:
        started()
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def main() -> tuple[int, Supervisor]:
        sup = Supervisor(notifier, backoff=FAST)
        sup.add(Unit("bad", Group.SOURCES, bad))
        sup.add(Unit("good", Group.SOURCES, good))
        stopper = _stop_once(sup, lambda: sup.ready and len(ticks) > 5)
        code = await sup.run(_nothing_to_drain, 1.0)
        await stopper
        return code, sup

    code, sup = asyncio.run(main())
    assert code == 0
    assert calls["bad"] == 1  # never retried
    assert len(ticks) > 5
    assert sup.units[0].state == UnitState.FAILED
    assert "fix sources[1].port" in sup.units[0].last_error
    ready = next(m for m in receiver.drain() if m.startswith("READY=1"))
    assert "1/2 units running" in ready
    assert "failed (see log): bad" in ready


def test_config_error_in_a_critical_unit_stops_with_78() -> None:
    async def broken(started: Callable[[], None]) -> None:
        raise ConfigError("outbox /nonexistent: directory not writable")

    async def main() -> int:
        sup = Supervisor(Notifier(None), backoff=FAST)
        sup.add(Unit("outbox", Group.OUTBOX, broken, critical=True))
        sup.add(Unit("src", Group.SOURCES, _forever([], "src")))  # type: ignore[arg-type]
        return await asyncio.wait_for(sup.run(_nothing_to_drain, 1.0), 5.0)

    assert asyncio.run(main()) == EXIT_CONFIG


def test_backoff_by_error_class() -> None:
    b = Backoff(base_s=1.0, cap_s=60.0, auth_s=300.0)
    for attempt in range(1, 12):
        d = b.delay(TransientError("x"), attempt)
        nominal = min(60.0, 2 ** (attempt - 1))
        assert nominal / 2 <= d <= nominal
    assert 150.0 <= b.delay(AuthError("refused"), 1) <= 300.0
    delays = {round(b.delay(TransientError("x"), 5), 6) for _ in range(20)}
    assert len(delays) > 1  # jittered


def test_auth_error_waits_long() -> None:
    calls: list[float] = []

    async def refused(started: Callable[[], None]) -> None:
        calls.append(time.monotonic())
        raise AuthError("broker 127.0.0.1:8883: not authorised")

    async def main() -> Supervisor:
        sup = Supervisor(Notifier(None), backoff=FAST)
        sup.add(Unit("uplink", Group.UPLINK, refused))
        asyncio.get_running_loop().call_later(0.5, sup.request_stop)
        await sup.run(_nothing_to_drain, 1.0)
        return sup

    sup = asyncio.run(main())
    assert len(calls) == 1  # the next try is seconds to minutes away, not milliseconds
    assert sup.units[0].failures == 1
    assert sup.units[0].last_error.startswith("AuthError")


async def _collect(receiver: Receiver) -> None:
    """Keep the test's notify socket drained, with arrival times, so no ping is dropped."""
    while True:
        receiver.drain()
        await asyncio.sleep(0.01)


def test_a_stalled_unit_is_restarted_while_the_pings_go_on(receiver: Receiver) -> None:
    attempts: list[float] = []
    cancelled: list[float] = []
    pulse = Pulse(stale_after_s=0.3)
    pings: list[float] = []

    async def stage(started: Callable[[], None]) -> None:
        attempts.append(time.monotonic())
        started()
        try:
            for _ in range(5):
                pulse.beat()
                await asyncio.sleep(0.02)
            if len(attempts) == 1:
                await asyncio.Event().wait()  # the first run hangs: no beat, no declared wait
            while True:
                pulse.beat()
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            cancelled.append(time.monotonic())
            raise

    async def main() -> Supervisor:
        notifier = Notifier(str(receiver.path), watchdog_usec=200_000)
        sup = Supervisor(notifier, backoff=FAST)
        sup.add(Unit("stage", Group.PIPELINE, stage, pulse=pulse))
        task = asyncio.create_task(sup.run(_nothing_to_drain, 1.0), name="test:supervisor")
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            await asyncio.sleep(0.01)
            before = len(receiver.messages)
            receiver.drain()
            pings.extend(time.monotonic() for m in receiver.messages[before:] if m == "WATCHDOG=1")
        sup.request_stop()
        await task
        notifier.close()
        return sup

    sup = asyncio.run(main())
    assert len(attempts) == 2  # restarted once, by the supervisor, and healthy since
    assert len(cancelled) == 2  # the hung run was cancelled; the second one at the stop
    assert 0.3 <= cancelled[0] - attempts[0] <= 1.5
    assert sup.units[0].stall_restarts == 0  # alive again after its restart
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 20
    # The pings never stopped (the period is 0.05 s); before, they stopped 0.3 s after the last beat
    # and never came back, as nothing restarted the unit.
    assert max(gaps) < 0.45


def test_a_critical_unit_stalled_again_after_its_restart_stops_the_pings(receiver: Receiver) -> None:
    beat = {"t": time.monotonic()}

    async def stage(started: Callable[[], None]) -> None:
        started()
        await asyncio.Event().wait()  # never beats again: a wedged writer thread, say

    async def main() -> tuple[int, int]:
        notifier = Notifier(str(receiver.path), watchdog_usec=200_000)
        sup = Supervisor(notifier, backoff=FAST)
        unit = Unit("box", Group.OUTBOX, stage, critical=True, heartbeat=lambda: beat["t"], stale_after_s=0.3)
        sup.add(unit)
        collector = asyncio.create_task(_collect(receiver), name="test:collect")
        task = asyncio.create_task(sup.run(_nothing_to_drain, 1.0), name="test:supervisor")
        await asyncio.sleep(0.25)
        early = receiver.messages.count("WATCHDOG=1")
        for _ in range(500):  # stall, restart, stall again: escalated (bounded wait)
            if sup.escalated_units():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # a ping already on its way
        receiver.messages.clear()
        await asyncio.sleep(0.5)
        late = receiver.messages.count("WATCHDOG=1")
        sup.request_stop()
        await task
        collector.cancel()
        notifier.close()
        return early, late

    early, late = asyncio.run(main())
    assert early >= 2
    assert late == 0


def test_pulse_bounded_waits_and_progress() -> None:
    pulse = Pulse(stale_after_s=5.0)
    t0 = pulse.last_beat
    assert pulse.stale_reason(t0 + 4.0) is None
    assert "no progress for 6 s" in (pulse.stale_reason(t0 + 6.0) or "")
    with pulse.waiting("connecting to broker", 10.0):
        inside = pulse.wait
        assert inside == "connecting to broker"
        # A reconnect inside its declared bound is alive, long after the last beat.
        assert pulse.stale_reason(t0 + 11.0) is None
        reason = pulse.stale_reason(t0 + 10.0 + WAIT_GRACE_S + 1.0)
        assert reason is not None
        assert reason.startswith("connecting to broker: waiting for 13 s, past its bound of 10 s")
    assert pulse.wait is None
    assert pulse.last_beat >= t0  # leaving the wait is progress


def test_status_names_what_a_unit_waits_for() -> None:
    pulse = Pulse()

    async def connecting(started: Callable[[], None]) -> None:
        started()
        with pulse.waiting("connecting to broker", 10.0):
            await asyncio.Event().wait()

    async def main() -> str:
        sup = Supervisor(Notifier(None), backoff=FAST)
        sup.add(Unit("uplink", Group.UPLINK, connecting, pulse=pulse))
        task = asyncio.create_task(sup.run(_nothing_to_drain, 1.0), name="test:supervisor")
        deadline = time.monotonic() + 10.0
        while "waiting:" not in (line := sup.status_line()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # until the unit has started and entered its wait
        sup.request_stop()
        await task
        return line

    assert "waiting: uplink (connecting to broker)" in asyncio.run(main())


def test_drain_is_cut_at_the_deadline() -> None:
    async def slow_drain(deadline: float) -> None:
        await asyncio.sleep(10)

    async def main() -> float:
        sup = Supervisor(Notifier(None), backoff=FAST)
        sup.add(Unit("src", Group.SOURCES, _forever([], "src")))  # type: ignore[arg-type]
        asyncio.get_running_loop().call_later(0.1, sup.request_stop)
        t0 = time.monotonic()
        await sup.run(slow_drain, 0.3)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 2.0


def test_a_unit_that_swallows_cancellation_cannot_hold_the_stop() -> None:
    async def stubborn(started: Callable[[], None]) -> None:
        started()
        for _ in range(30):  # bounded: ignores cancellation for up to 3 s
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                continue

    async def main() -> float:
        sup = Supervisor(Notifier(None), backoff=FAST)
        sup.add(Unit("stubborn", Group.SOURCES, stubborn))
        asyncio.get_running_loop().call_later(0.1, sup.request_stop)
        t0 = time.monotonic()
        await sup.run(_nothing_to_drain, 1.0)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 4.5


def test_a_failing_drain_still_stops_in_order() -> None:
    stopped: list[str] = []

    def unit(name: str) -> Callable[[Callable[[], None]], Coroutine[Any, Any, None]]:
        async def run(started: Callable[[], None]) -> None:
            started()
            try:
                await asyncio.Event().wait()
            finally:
                stopped.append(name)

        return run

    async def broken_drain(deadline: float) -> None:
        raise TransientError("outbox: disk full")

    async def main() -> int:
        sup = Supervisor(Notifier(None), backoff=FAST)
        for name, group in (("box", Group.OUTBOX), ("pipe", Group.PIPELINE), ("src", Group.SOURCES)):
            sup.add(Unit(name, group, unit(name)))
        asyncio.get_running_loop().call_later(0.1, sup.request_stop)
        return await sup.run(broken_drain, 1.0)

    assert asyncio.run(main()) == 0
    assert stopped == ["src", "pipe", "box"]


def test_no_ready_while_a_critical_unit_is_down(receiver: Receiver, notifier: Notifier) -> None:
    async def down(started: Callable[[], None]) -> None:
        raise TransientError("pipeline: not yet")

    async def main() -> int:
        sup = Supervisor(notifier, backoff=FAST, start_timeout_s=0.5)
        sup.add(Unit("pipeline", Group.PIPELINE, down, critical=True))
        return await asyncio.wait_for(sup.run(_nothing_to_drain, 1.0), 5.0)

    assert asyncio.run(main()) == 1
    assert not any(m.startswith("READY=1") for m in receiver.drain())


def test_device_backoff_polls_an_absent_device_and_slows_a_flapping_one() -> None:
    b = DEVICE_BACKOFF
    # Away (never started): polled at least every second, however long it stays away.
    assert all(b.delay(TransientError("absent"), attempt) <= b.cap_s for attempt in range(1, 200))
    # Started and dropped within the healthy period again and again: ever slower, up to the flap cap.
    flapping = [
        b.delay(TransientError("dropped"), attempt, flaps) for attempt, flaps in ((3, 2), (5, 4), (9, 8))
    ]
    nominal = [min(30.0, 0.25 * 2**f) for f in (2, 4, 8)]
    assert all(n / 2 <= d <= n for d, n in zip(flapping, nominal, strict=True))
    assert b.delay(TransientError("dropped"), 9, 8) >= 15.0
    # The default backoff (uplink, pipeline) knows nothing of flaps.
    assert Backoff().delay(TransientError("x"), 1, flaps=5) <= 1.0


def test_a_glitch_after_a_healthy_run_is_retried_fast_a_flapping_unit_slower() -> None:
    scaled = Backoff(base_s=0.01, cap_s=0.04, healthy_after_s=0.3, flap_cap_s=2.0)
    runs: dict[str, list[float]] = {"glitch": [], "flap": []}

    def unit(name: str, ran_s: float) -> Callable[[Callable[[], None]], Coroutine[Any, Any, None]]:
        async def run(started: Callable[[], None]) -> None:
            runs[name].append(time.monotonic())
            started()
            await asyncio.sleep(ran_s)
            raise TransientError(f"{name}: device dropped")

        return run

    async def main() -> None:
        sup = Supervisor(Notifier(None), backoff=FAST)
        sup.add(Unit("glitch", Group.SOURCES, unit("glitch", 0.35), backoff=scaled))
        sup.add(Unit("flap", Group.SOURCES, unit("flap", 0.02), backoff=scaled))
        asyncio.get_running_loop().call_later(2.5, sup.request_stop)
        await sup.run(_nothing_to_drain, 1.0)

    asyncio.run(main())
    glitch_waits = [b - a - 0.35 for a, b in itertools.pairwise(runs["glitch"])]
    flap_waits = [b - a - 0.02 for a, b in itertools.pairwise(runs["flap"])]
    # Each glitch came after a healthy run: retried at the first, fast delay (0.01 s) every time.
    assert len(glitch_waits) >= 4
    assert max(glitch_waits) < 0.25
    # The flapping unit: fast at first, then ever longer (0.04, 0.08, 0.16, ... s nominal, jittered).
    assert flap_waits[0] < 0.25
    assert max(flap_waits) > 0.5
    assert len(flap_waits) < 12


def test_an_attempt_that_hangs_before_it_started_is_restarted_too() -> None:
    pulse = Pulse(stale_after_s=0.3)
    attempts: list[float] = []

    async def connect_hangs_once(started: Callable[[], None]) -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            await asyncio.Event().wait()  # a connect with no timeout, before started()
        while True:
            pulse.beat()
            started()
            await asyncio.sleep(0.02)

    async def main() -> Supervisor:
        sup = Supervisor(Notifier(None), backoff=FAST, start_timeout_s=0.1)
        sup.add(Unit("src", Group.SOURCES, connect_hangs_once, pulse=pulse))
        asyncio.get_running_loop().call_later(2.0, sup.request_stop)
        await sup.run(_nothing_to_drain, 1.0)
        return sup

    sup = asyncio.run(main())
    assert len(attempts) == 2
    assert 0.3 <= attempts[1] - attempts[0] <= 1.5
    assert sup.units[0].failures == 0  # running since its restart


def test_one_unit_is_stopped_and_another_started_while_the_others_run(notifier: Notifier) -> None:
    """A config revision applied in place: one source out, one in; the rest never restarted."""
    order: list[str] = []
    cancelled: list[str] = []

    def tracked(name: str) -> Callable[[Callable[[], None]], Coroutine[Any, Any, None]]:
        async def run(started: Callable[[], None]) -> None:
            order.append(name)
            started()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        return run

    async def main() -> None:
        sup = Supervisor(notifier, backoff=FAST)
        sup.add(Unit("box", Group.OUTBOX, tracked("box")))
        sup.add(Unit("source:a", Group.SOURCES, tracked("a")))
        sup.add(Unit("source:b", Group.SOURCES, tracked("b")))

        async def swap() -> None:
            await sup.wait_ready(10.0)
            await sup.stop_unit("source:a")
            assert cancelled == ["a"]
            assert [u.name for u in sup.units] == ["box", "source:b"]
            sup.start_unit(Unit("source:c", Group.SOURCES, tracked("c")))
            deadline = time.monotonic() + 10.0
            while [u.state for u in sup.units][-1] != UnitState.RUNNING and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            sup.request_stop()

        swapper = asyncio.create_task(swap())
        await sup.run(_nothing_to_drain, 1.0)
        await swapper
        assert [u.name for u in sup.units] == ["box", "source:b", "source:c"]

    asyncio.run(main())
    assert order == ["box", "a", "b", "c"]  # box and b started once: never restarted
    assert sorted(cancelled) == ["a", "b", "box", "c"]  # c is stopped with the others at the end


def test_a_unit_swapped_before_its_group_starts_runs_once(notifier: Notifier) -> None:
    """A revision applied in place while the gateway is still starting: the new unit, once."""
    order: list[str] = []

    async def main() -> None:
        sup = Supervisor(notifier, backoff=FAST)

        async def early(started: Callable[[], None]) -> None:
            await sup.stop_unit("source:a")  # not started yet: only forgotten
            sup.start_unit(Unit("source:a", Group.SOURCES, _forever(order, "a-new")))  # type: ignore[arg-type]
            started()
            await asyncio.Event().wait()

        sup.add(Unit("up", Group.UPLINK, early))
        sup.add(Unit("source:a", Group.SOURCES, _forever(order, "a-old")))  # type: ignore[arg-type]
        stopper = _stop_once(sup, lambda: sup.ready)
        await sup.run(_nothing_to_drain, 1.0)
        await stopper

    asyncio.run(main())
    assert order == ["a-new"]


def test_a_unit_stopped_during_start_up_does_not_hold_ready(notifier: Notifier) -> None:
    """A revision removes a source that has not started yet: READY does not wait out its start time-out."""
    order: list[str] = []

    async def never_started(started: Callable[[], None]) -> None:
        order.append("slow")
        await asyncio.Event().wait()

    async def main() -> float:
        sup = Supervisor(notifier, backoff=FAST, start_timeout_s=20.0)
        sup.add(Unit("source:slow", Group.SOURCES, never_started))
        sup.add(Unit("source:b", Group.SOURCES, _forever(order, "b")))  # type: ignore[arg-type]

        async def remove() -> float:
            while "slow" not in order:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            try:
                await sup.stop_unit("source:slow")
                await sup.wait_ready(10.0)
                return time.monotonic() - t0
            finally:
                sup.request_stop()

        remover = asyncio.create_task(remove())
        await sup.run(_nothing_to_drain, 1.0)
        return await remover

    assert asyncio.run(main()) < 5.0


def test_no_unit_starts_once_the_gateway_is_stopping(notifier: Notifier) -> None:
    async def main() -> None:
        sup = Supervisor(notifier, backoff=FAST)
        sup.request_stop()
        assert sup.stopping
        sup.start_unit(Unit("source:late", Group.SOURCES, _forever([], "late")))  # type: ignore[arg-type]
        assert sup.units == ()

    asyncio.run(main())
