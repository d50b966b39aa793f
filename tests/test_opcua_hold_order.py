"""OPC UA held values and timestamps that disagree with the server's confirmations, on loopback.

The driver corrects every source timestamp by one estimate of the queueing age per connection.
A server that mixes PLC- and server-stamped nodes, or a PLC whose clock steps back within
``clock_tolerance_s``, stamps a fresh change earlier than the time up to which the server had
already confirmed the node unchanged (and the driver had held its old value).  The change must
land after those held ticks, within a publish of when it really happened, with wall time running
forward; the old value is never shown past it.

A server that caps the notifications of one publish response splits a burst of changes over
several responses (``MoreNotifications`` set on all but the last): a response of such a sequence
does not say that the nodes it leaves out are unchanged, since their changes may still be queued.
So a quiet tag whose change comes late in the sequence is not held past that change.

The peer is a real asyncua server in the test's process, written with source timestamps chosen
by the test, on the same clock as the gateway: the truth is when the test wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import threading
import time

import pytest
from asyncua import ua
from asyncua.common.node import Node
from asyncua.server import subscription_service
from asyncua.server.internal_subscription import InternalSubscription
from asyncua.server.server import Server
from peers import free_port
from test_opcua_driver import Recorder, Running, make_driver, until

from drivers.opcua.driver import HOLD_LAG_S
from drivers.opcua.uahelp import ua_time

URI = "urn:edgetwin:test:stamps"
QUIET, TICKING = "Plc/Quiet", "Plc/Ticking"
SAMPLING_S = 0.1  # the interval the driver asks (and this server grants)
PUBLISH_S = 0.1  # make_driver's publishing interval


#: Notifications a capped server sends per publish response (``CappedSubscription``).
CAP = 4


class CappedSubscription(InternalSubscription):
    """A server subscription that sends at most ``CAP`` notifications per publish response.

    The rest stay queued, in order, for the next publishing cycle, and the response says so with
    ``MoreNotifications``: an embedded server with a small message budget drains a burst of
    changes over several cycles.
    """

    def _pop_triggered_datachanges(self, result: ua.PublishResult) -> None:
        queued = self._triggered_datachanges
        taken: list[ua.MonitoredItemNotification] = []
        for mid in list(queued):
            pending = queued[mid]
            while pending and len(taken) < CAP:
                taken.append(pending.pop(0))
            if not pending:
                del queued[mid]
            if len(taken) == CAP:
                break
        if taken:
            result.NotificationMessage.NotificationData.append(
                ua.DataChangeNotification(MonitoredItems=taken)
            )

    def _pop_publish_result(self) -> ua.PublishResult:
        result = super()._pop_publish_result()
        result.MoreNotifications = bool(self._triggered_datachanges)
        return result


class Plc:
    """A server with a quiet tag and a tag written every 100 ms, each stamped by a clock of its own.

    It runs on its own event loop in a thread, as a PLC runs apart from the gateway.  With
    ``burst`` it has that many more tags (``Plc/Burst<n>``), written together before the quiet
    tag by ``write_burst``.
    """

    def __init__(self, port: int, burst: int = 0) -> None:
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/plc"
        self.ticking_clock_s = 0.0  # the ticking tag's clock, relative to the gateway's
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-plc", daemon=True)
        self.server = Server()
        self.quiet: Node | None = None
        self.ticking: Node | None = None
        self.burst_count = burst
        self.burst: list[Node] = []
        self.ticker: asyncio.Task[None] | None = None

    def __enter__(self) -> Plc:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    async def _start(self) -> None:
        server = self.server
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(URI)
        obj = await server.nodes.objects.add_object(idx, "Plc")
        self.quiet = await obj.add_variable(idx, "Quiet", 1.0, varianttype=ua.VariantType.Double)
        self.ticking = await obj.add_variable(idx, "Ticking", 0.0, varianttype=ua.VariantType.Double)
        for n in range(self.burst_count):
            self.burst.append(
                await obj.add_variable(idx, f"Burst{n}", 0.0, varianttype=ua.VariantType.Double)
            )
        await self._write(self.quiet, 1.0, 0.0)
        await server.start()
        self.ticker = asyncio.create_task(self._tick(), name="test:ticking")

    async def _stop(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.ticker
        await self.server.stop()

    async def _write(self, node: Node | None, value: float, clock_s: float) -> None:
        assert node is not None
        now = dt.datetime.now(dt.UTC)
        await node.write_value(
            ua.DataValue(
                ua.Variant(value, ua.VariantType.Double),
                SourceTimestamp=ua_time(now + dt.timedelta(seconds=clock_s)),
                ServerTimestamp=ua_time(now),
            )
        )

    async def _tick(self) -> None:
        for n in itertools.count():
            await self._write(self.ticking, float(n), self.ticking_clock_s)
            await asyncio.sleep(SAMPLING_S)

    async def write_quiet(self, value: float, clock_s: float) -> None:
        """Write the quiet tag, stamped by a clock ``clock_s`` ahead of the gateway's."""
        fut = asyncio.run_coroutine_threadsafe(self._write(self.quiet, value, clock_s), self.loop)
        await asyncio.wrap_future(fut)

    async def _burst(self, value: float) -> None:
        for node in self.burst:
            await self._write(node, value, 0.0)
        await self._write(self.quiet, value, 0.0)

    async def write_burst(self, value: float) -> None:
        """Write every burst tag, then the quiet tag, in one go: the quiet tag's change is queued last."""
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._burst(value), self.loop))


@pytest.mark.parametrize(
    ("ticking_clock_s", "quiet_clock_s"),
    [
        # The ticking tag is stamped by a PLC 1 s ahead, the quiet one by the server.
        pytest.param(1.0, 0.0, id="mixed-stamps"),
        # One PLC clock for both, stepped back by 1 s while the quiet tag is held.
        pytest.param(None, -1.0, id="plc-clock-stepped-back"),
    ],
)
def test_a_change_stamped_before_the_held_ticks_lands_after_them_at_its_time(
    ticking_clock_s: float | None, quiet_clock_s: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.opcua.driver")

    async def main() -> tuple[Recorder, float, float]:
        with Plc(free_port()) as server:
            if ticking_clock_s is not None:
                server.ticking_clock_s = ticking_clock_s
            driver = make_driver(
                server.endpoint,
                namespace_uri=URI,
                nodes=[{"browse_path": QUIET}, {"browse_path": TICKING}],
                diagnostics_every_s=1.0,
            )
            sink = Recorder()
            async with Running(driver, sink) as run:
                await until(lambda: run.starts == 1 and bool(sink.of(QUIET)), 15, "data")
                await until(lambda: driver.held[QUIET] >= 15, 10, "the quiet tag held")
                if ticking_clock_s is None:
                    server.ticking_clock_s = quiet_clock_s  # the PLC's clock steps back
                    await asyncio.sleep(0.5)
                written_at = time.monotonic()
                await server.write_quiet(2.0, quiet_clock_s)
                await until(lambda: any(s.value == 2.0 for s in sink.of(QUIET)), 5, "the change")
                await asyncio.sleep(1.0)  # held again after the change
            return sink, written_at, driver.held[QUIET]

    sink, written_at, held = asyncio.run(main())
    quiet = sink.of(QUIET)
    change = next(i for i, s in enumerate(quiet) if s.value == 2.0)
    before, at = quiet[:change], quiet[change]
    assert held > 15
    assert len(before) > 15
    assert all(s.value == 1.0 for s in before)
    # Held ticks of the old value end before the change (not on it, nor after it) ...
    assert before[-1].t_mono < at.t_mono, (before[-1], at)
    # ... and the change lands where it happened: after the last confirmation that the old
    # value held (less a sampling interval and the lag held ticks keep), before its arrival.
    lag = SAMPLING_S + HOLD_LAG_S + PUBLISH_S
    assert written_at - lag - 0.05 <= at.t_mono <= written_at + 0.5, (at.t_mono - written_at, at)
    # Neither clock runs backwards in the tag's stream, nor in the ticking tag's.
    for tag in (QUIET, TICKING):
        samples = sink.of(tag)
        for a, b in itertools.pairwise(samples):
            assert a.t_mono <= b.t_mono, (tag, a, b)
            assert a.t_wall <= b.t_wall, (tag, a.t_wall - b.t_wall, a, b)
    # Counted in the clock report, and said once, not per value.
    clock = [d.detail for d in sink.diagnostics if d.kind == "opcua_clock"]
    assert sum(int(d["restamped"]) for d in clock) >= 1, clock
    said = [r.getMessage() for r in caplog.records if "before the server confirmed" in r.getMessage()]
    assert len(said) == 1, said


def test_a_split_publish_response_does_not_confirm_the_nodes_it_leaves_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every subscription of the peer server is capped (the server's own limit, whatever is asked).
    monkeypatch.setattr(subscription_service, "InternalSubscription", CappedSubscription)
    burst = 10 * CAP  # the quiet tag's change comes about 11 publishing intervals after the first

    async def main() -> tuple[Recorder, float]:
        with Plc(free_port(), burst=burst) as server:
            driver = make_driver(
                server.endpoint,
                namespace_uri=URI,
                nodes=[{"browse_path": QUIET}, {"browse_path": TICKING}]
                + [{"browse_path": f"Plc/Burst{n}"} for n in range(burst)],
                diagnostics_every_s=1.0,
            )
            sink = Recorder()
            async with Running(driver, sink) as run:
                await until(lambda: run.starts == 1 and bool(sink.of(QUIET)), 15, "data")
                await until(lambda: driver.held[QUIET] >= 15, 10, "the quiet tag held")
                written_at = time.monotonic()
                await server.write_burst(2.0)
                await until(lambda: any(s.value == 2.0 for s in sink.of(QUIET)), 5, "the change")
                await asyncio.sleep(1.0)  # held again after the change
            return sink, written_at

    sink, written_at = asyncio.run(main())
    quiet = sink.of(QUIET)
    change = next(i for i, s in enumerate(quiet) if s.value == 2.0)
    before, at = quiet[:change], quiet[change]
    assert len(before) > 15
    assert all(s.value == 1.0 for s in before)
    # The old value is not held past its change, though the responses before the change's
    # arrived after it: they were parts of one sequence, and the change was still queued.
    assert before[-1].t_mono < written_at + 0.05, (before[-1].t_mono - written_at, before[-1])
    assert before[-1].t_mono < at.t_mono
    # The change lands where it happened, not where a confirmation it never had put it.
    assert written_at - 0.05 <= at.t_mono <= written_at + 0.2, (at.t_mono - written_at, at)
    # So do the other tags of the burst, each in its own part of the sequence.
    for n in range(burst):
        first = next(s for s in sink.of(f"Plc/Burst{n}") if s.value == 2.0)
        assert written_at - 0.05 <= first.t_mono <= written_at + 0.2, (n, first.t_mono - written_at)
    clock = [d.detail for d in sink.diagnostics if d.kind == "opcua_clock"]
    assert sum(int(d["restamped"]) for d in clock) == 0, clock
    for a, b in itertools.pairwise(quiet):
        assert a.t_mono <= b.t_mono, (a, b)
        assert a.t_wall <= b.t_wall, (a.t_wall - b.t_wall, a, b)
