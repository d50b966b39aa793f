"""OPC UA nominal rates and held values, against real PLC simulator processes on loopback.

A server may revise the sampling interval asked (100 ms -> 500 ms): the stream's nominal rate is
the revision, so its windows are whole and judged.  With no deadband a server reports a node only
when its value changes: a quantised tag that holds still is held by the driver for every sampling
tick the live subscription confirmed, so it is neither lost nor partial and its features are a
regular sampler's; when the server dies nothing is held past the last confirmation.  A server that revises otherwise
after a restart rebuilds each tag's stream at the new rate: one stream per tag, one outage, restored.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Iterator

import numpy as np
import pytest
from peers import free_port
from test_opcua_driver import Recorder, Running, make_driver, until

from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.plcsim import PlcSimProcess
from gateway.contracts import DEFAULT_MIN_COVERAGE, Alarm, AlarmKind, StreamFeatures, WindowRecord
from gateway.inference.partial import Coverage
from gateway.pipeline.windows import Windower
from gateway.sample import Sample

CURRENT, FLOW, PRESSURE, RUNNING = (
    "Pump1/Motor/Current",
    "Pump1/Hydraulics/Flow",
    "Pump1/Hydraulics/Pressure",
    "Pump1/Status/Running",
)
NODES = [{"browse_path": p} for p in (CURRENT, FLOW, PRESSURE, RUNNING)]
#: Flow written in steps of 4 l/min: it holds 32 while the pump runs normally (~32.1 +- 0.3),
#: drops to about 20 while a valve fault is on.
QUANTISED = ("--rate-hz", "10", "--quantize", "Flow:4")
LOSSES = (AlarmKind.SENSOR_LOST, AlarmKind.DEVICE_LOST)
OUTAGE = (*LOSSES, AlarmKind.SENSOR_RESTORED, AlarmKind.DEVICE_RESTORED)


class Pipeline:
    """A driver into a real windower whose windows are closed on a timer, as the gateway does."""

    def __init__(self, driver: OpcUaDriver, window_s: float, hop_s: float, grace_s: float, lost_s: float):
        self.alarms: list[Alarm] = []
        self.windower = Windower(
            window_s=window_s, hop_s=hop_s, grace_s=grace_s, lost_after_s=lost_s, on_alarm=self.alarms.append
        )
        self.sink = Recorder(self.windower)
        self.driver = driver
        self.records: list[WindowRecord] = []

    async def __aenter__(self) -> Running:
        self._ticker = asyncio.create_task(self._tick(), name="test:windows")
        self._run = Running(self.driver, self.sink)
        return await self._run.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        self._ticker.cancel()
        await self._run.__aexit__(*exc)

    async def _tick(self) -> None:
        while True:
            self.records.extend(self.windower.close_due(time.monotonic(), time.time()))
            await asyncio.sleep(0.1)

    async def until_holding(self, run: Running, lost_s: float) -> None:
        """Data, then Flow holding still for longer than the loss timeout, and nothing lost."""
        await until(lambda: run.starts == 1 and bool(self.sink.of(FLOW)), 10, "data")
        await until(lambda: quiet_for(self.sink.of(FLOW)) > lost_s + 1.5, 15, "Flow holding")
        assert not [a for a in self.alarms if a.kind in LOSSES], self.alarms

    def windows(
        self, metric: str, after: float, before: float = math.inf
    ) -> list[tuple[WindowRecord, StreamFeatures]]:
        """The metric's windows lying wholly in ``[after, before)`` (monotonic)."""
        return [
            (r, sf)
            for r in self.records
            for sf in r.streams
            if sf.stream.metric.name == metric and r.end_mono - r.length_s >= after and r.end_mono <= before
        ]


def regular_sampler(changes: list[Sample], start: float, end: float, dt: float) -> np.ndarray:
    """What a sampler every ``dt`` s over ``[start, end)`` reads from a value that changes at ``changes``."""
    ticks = start + (np.arange(round((end - start) / dt)) + 0.5) * dt
    times = np.array([s.t_mono for s in changes])
    values = np.array([s.value for s in changes])
    return values[np.searchsorted(times, ticks, side="right") - 1]


def changes_of(samples: list[Sample]) -> list[Sample]:
    """The samples that changed the value: the server's reports (a held sample repeats the value)."""
    out: list[Sample] = []
    for s in samples:
        if not out or s.value != out[-1].value:
            out.append(s)
    return out


def quiet_for(samples: list[Sample]) -> float:
    """Seconds since the value last changed (0 before any sample)."""
    changes = changes_of(samples)
    return time.monotonic() - changes[-1].t_mono if changes else 0.0


@pytest.fixture(scope="module")
def quantised() -> Iterator[PlcSimProcess]:
    sim = PlcSimProcess(free_port(), *QUANTISED)
    sim.start()
    yield sim
    sim.stop()


def test_a_revised_sampling_interval_is_the_nominal_rate_and_the_windows_are_judged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A PLC that samples every 500 ms and says so: the driver asks 100 ms (the default).
    sim = PlcSimProcess(free_port(), "--rate-hz", "2")
    sim.start()
    caplog.set_level(logging.INFO, logger="drivers.opcua.driver")

    async def main() -> Pipeline:
        driver = make_driver(sim.endpoint, nodes=NODES[:2])
        p = Pipeline(driver, window_s=4.0, hop_s=1.0, grace_s=0.5, lost_s=15.0)
        async with p as run:
            await until(lambda: run.starts == 1 and bool(p.sink.of(FLOW)), 10, "data")
            first = p.sink.of(FLOW)[0].t_mono
            await until(lambda: len(p.windows(FLOW, first)) >= 3, 15, "three whole windows")
        return p

    try:
        p = asyncio.run(main())
    finally:
        sim.stop()
    stream = p.sink.of(FLOW)[0].stream
    assert stream.rate_hz == 2.0  # the revision, not 1000 / 100 ms
    revisions = [r.getMessage() for r in caplog.records if "not the 100 ms asked" in r.getMessage()]
    assert len(revisions) == 1, revisions  # one line for both nodes, once
    assert "2 node(s) every 500 ms" in revisions[0]
    first = p.sink.of(FLOW)[0].t_mono
    coverage = Coverage("pump_skab", DEFAULT_MIN_COVERAGE)
    for metric in (CURRENT, FLOW):
        whole = p.windows(metric, first)
        assert len(whole) >= 3
        for record, sf in whole:
            assert sf.missing <= 1.0 - DEFAULT_MIN_COVERAGE, (metric, sf.count, sf.missing)
            assert coverage.short_stream(record.subject, [sf]) is None  # judged, not partial
    assert coverage.partial_windows == 0
    # Values that change every tick are delivered, never held in between (the one held sample is
    # the value as last confirmed, when the driver stopped).
    delivered = len(p.sink.of(CURRENT))
    assert p.driver.held[CURRENT] <= 1 + delivered // 100, (p.driver.held, delivered)
    assert not [a for a in p.alarms if a.kind in LOSSES]


def test_a_quantised_tag_that_holds_still_is_held_not_lost_and_weighs_by_its_duration(
    quantised: PlcSimProcess,
) -> None:
    lost_s = 2.0

    async def main() -> tuple[Pipeline, float, float]:
        driver = make_driver(quantised.endpoint, nodes=NODES)
        p = Pipeline(driver, window_s=4.0, hop_s=1.0, grace_s=1.0, lost_s=lost_s)
        async with p as run:
            await p.until_holding(run, lost_s)  # Flow holds 32 for longer than the loss timeout
            n_before = len(changes_of(p.sink.of(FLOW)))
            fault_at = time.monotonic()
            quantised.command("fault valve_fault 2.5")
            await until(lambda: len(changes_of(p.sink.of(FLOW))) >= n_before + 2, 10, "Flow down and back")
            await asyncio.sleep(lost_s + 5.0)
            end = time.monotonic() - 2.0  # windows cut by now
        return p, fault_at, end

    p, fault_at, end = asyncio.run(main())
    assert not [a for a in p.alarms if a.kind in LOSSES], p.alarms
    flow = p.sink.of(FLOW)
    assert flow[0].stream.rate_hz == 10.0
    held = p.driver.held[FLOW]
    changes = changes_of(flow)
    assert held > 10 * (lost_s + 1.5)
    assert held > len(flow) // 2, (held, len(flow), [s.value for s in changes])  # mostly held samples
    assert min(s.value for s in changes) <= 24.0  # the fault was seen
    assert p.driver.held[CURRENT] <= 1 + len(p.sink.of(CURRENT)) // 100  # a changing value is not held
    # Whole windows, with the features a regular 10 Hz sampler of the held value would give.
    coverage = Coverage("pump_skab", DEFAULT_MIN_COVERAGE)
    whole = p.windows(FLOW, flow[0].t_mono + 0.5, end)
    assert len(whole) >= 4
    across = 0
    for record, sf in whole:
        start = record.end_mono - record.length_s
        inw = [(round(x.t_mono - start, 2), x.value) for x in flow if start <= x.t_mono < record.end_mono]
        assert coverage.short_stream(record.subject, [sf]) is None, str((sf.count, sf.missing, inw))
        truth = regular_sampler(changes, start, record.end_mono, 0.1)
        jumps = sum(
            abs(b.value - a.value)
            for a, b in itertools.pairwise(changes)
            if start <= b.t_mono < record.end_mono
        )
        across += jumps > 0
        # A change is placed within a sampling tick of the sampler's; a sample not yet held at the
        # window's cut is one of the last value.
        # Moving one sample across a jump J moves the mean by at most J/N and the variance by at
        # most 3 x span x J / N.
        short = max(0, truth.size - sf.count)
        span = float(np.ptp(truth))
        tol = (2.0 * jumps + short * span) / truth.size + 1e-9
        tol_var = 3.0 * span * (2.0 * jumps + short * span) / truth.size + 1e-9
        assert abs(sf.features["mean"] - float(truth.mean())) <= tol, (sf.features, truth.mean(), tol)
        assert abs(sf.features["std"] ** 2 - float(truth.var())) <= tol_var, (
            sf.features,
            truth.std(),
            tol_var,
        )
    assert across >= 2  # windows with the fault's changes inside were compared, not only flat ones
    assert sum(1 for s in changes if s.t_mono > fault_at) >= 2


def test_a_held_tag_is_lost_with_its_plc_and_held_again_after_it_returns() -> None:
    sim = PlcSimProcess(free_port(), *QUANTISED)
    sim.start()
    lost_s = 2.0

    async def main() -> tuple[Pipeline, float, float, list[Sample]]:
        driver = make_driver(sim.endpoint, nodes=NODES)
        p = Pipeline(driver, window_s=2.0, hop_s=1.0, grace_s=0.3, lost_s=lost_s)
        async with p as run:
            await p.until_holding(run, lost_s)
            killed_at = time.monotonic()
            sim.kill()  # SIGKILL: no goodbye on the wire
            await until(lambda: not driver.link_up, 15, "the loss to be noticed")
            await until(lambda: any(a.kind in LOSSES for a in p.alarms), 10, "the loss alarm")
            await asyncio.sleep(3.0)  # an outage long enough for whole windows inside it
            during = list(p.sink.of(FLOW))  # everything delivered from before the kill to now
            await asyncio.to_thread(sim.start)
            back_at = time.monotonic()
            await until(lambda: any(s.t_mono > back_at for s in p.sink.of(FLOW)), 10, "Flow again")
            held = driver.held[FLOW]
            await asyncio.sleep(lost_s + 1.5)  # holding still again, past the loss timeout
            assert driver.held[FLOW] >= held + 10 * lost_s
        return p, killed_at, back_at, during

    try:
        p, killed_at, back_at, during = asyncio.run(main())
    finally:
        sim.stop()
    # Held up to the last confirmation and not a tick past it (the link died with the server).
    assert killed_at - 1.5 < during[-1].t_mono <= killed_at
    # One outage for the PLC, the quiet tag in it, and one restore: as for any other stream.
    outage = [a for a in p.alarms if a.kind in OUTAGE]
    seen = [
        (a.kind, a.stream.metric.name if a.stream else "", round(a.t_mono - killed_at, 2)) for a in outage
    ]
    assert [a.kind for a in outage] == [AlarmKind.DEVICE_LOST, AlarmKind.DEVICE_RESTORED], seen
    assert outage[0].detail["streams"] == 3  # Current, Flow, Pressure; the Boolean is never timed out
    # The outage is gaps in Flow's windows, nothing filled in.
    # (A restarted server's first value may be stamped up to the stamper's 2 s cap before it
    # arrives, as for every node: the windows compared end before that.)
    inside = p.windows(FLOW, killed_at, back_at - 2.5)
    assert inside
    assert all(sf.gap and not sf.count for _, sf in inside), inside


def test_a_plc_that_revises_otherwise_after_a_restart_keeps_one_stream_per_tag_and_is_restored() -> None:
    # The PLC samples every 100 ms, is killed, and comes back on the same port sampling every
    # 500 ms: each tag's stream is rebuilt at 2 Hz under the same key.
    port = free_port()
    sim = PlcSimProcess(port, "--rate-hz", "10")
    sim.start()
    lost_s = 2.0

    async def main() -> tuple[Pipeline, float, float]:
        driver = make_driver(sim.endpoint, nodes=NODES[:3])
        p = Pipeline(driver, window_s=2.0, hop_s=1.0, grace_s=0.3, lost_s=lost_s)
        async with p as run:
            await until(lambda: run.starts == 1 and bool(p.sink.of(FLOW)), 10, "data")
            sim.kill()
            await until(lambda: any(a.kind in LOSSES for a in p.alarms), 15, "the loss alarm")
            sim.args = ["--rate-hz", "2"]
            await asyncio.to_thread(sim.start)
            back_at = time.monotonic()
            await until(lambda: any(s.t_mono > back_at for s in p.sink.of(FLOW)), 10, "Flow again")
            await asyncio.sleep(lost_s + 4.0)  # past the loss timeout of the streams before the restart
            end = time.monotonic() - 1.0
        return p, back_at, end

    try:
        p, back_at, end = asyncio.run(main())
    finally:
        sim.stop()
    assert {s.stream.rate_hz for s in p.sink.of(FLOW)} == {10.0, 2.0}
    # One outage and one restore: the streams of the first revision never go silent on their own.
    outage = [(a.kind, a.stream.metric.name if a.stream else "") for a in p.alarms if a.kind in OUTAGE]
    assert [kind for kind, _ in outage] == [AlarmKind.DEVICE_LOST, AlarmKind.DEVICE_RESTORED], outage
    after = [r for r in p.records if back_at + 1.0 <= r.end_mono - r.length_s and r.end_mono <= end]
    assert len(after) >= 2
    for record in after:
        names = [sf.stream.metric.name for sf in record.streams]
        assert sorted(names) == sorted({CURRENT, FLOW, PRESSURE}), names  # each tag once
        assert all(sf.stream.rate_hz == 2.0 and sf.count for sf in record.streams), record.streams
    assert [s["status"] for s in p.windower.stream_states()] == ["ok"] * 3
