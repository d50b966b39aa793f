"""OPC UA: data changes/s and CPU per change, driver + pipeline vs a bare asyncua subscription handler.

Run: .venv/bin/python tests/benchmarks/bench_opcua.py [--seconds 8] [--before REV [--rounds 3]] [--quiet 1000]

(With ``--before``, give ``--seconds`` as a multiple of the 5 s hop: every run then closes the
same number of windows, which for 1,000 streams is a good part of the CPU.)

``--before REV`` alternates the driver of ``REV`` (``git show REV:drivers/opcua/driver.py``) and
today's in rounds against the same server, so the CPU ratio holds under load.  ``--quiet N``
measures a plant of N tags that never change (sampled at 10 Hz): the CPU a second that holding
their values costs, against the same subscription with the driver of ``REV`` (which hands over
nothing for them).

One PLC simulator process (asyncua server) updates N benchmark variables as fast as it can
offer; in this process, first a bare asyncua client counts the notifications with the handler
API, then the OPC UA driver feeds the same notifications into the real windower (the pipeline's
hand-off) with windows closed on a timer. The Python server saturates near 20 k changes/s, so
it cannot load a client to its limit: the honest comparison is CPU time per notification, which
is reported next to the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from asyncua import ua
from asyncua.client.client import Client
from revisions import module_at

from drivers.opcua.config import OpcUaConfig
from drivers.opcua.driver import OpcUaDriver, factory
from drivers.opcua.plcsim import PlcSimProcess
from drivers.opcua.uahelp import node_id
from gateway.contracts import Alarm, Diagnostic, SourceInfo
from gateway.pipeline.windows import Windower

Factory = Callable[[SourceInfo, OpcUaConfig], Any]


def factory_of(rev: str) -> Factory:
    """The OPC UA driver factory of ``rev``'s drivers/opcua/driver.py (its siblings are today's)."""
    made: Factory = module_at(rev, "drivers/opcua/driver.py").factory
    return made


def held_by(drv: Any) -> int:
    """Samples the driver held so far (a driver from before held values holds none)."""
    return sum(drv.held.values()) if isinstance(drv, OpcUaDriver) else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Counter:
    """The bare baseline: asyncua's handler API, counting."""

    def __init__(self) -> None:
        self.count = 0

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.count += 1


async def bare(endpoint: str, n: int, seconds: float) -> tuple[float, float]:
    client = Client(endpoint, timeout=10)
    await client.connect()
    try:
        idx = await client.get_namespace_index("urn:edgetwin:plcsim")
        handler = _Counter()
        sub = await client.create_subscription(50, handler)
        nodes = [client.get_node(node_id(f"Pump1.Bench.Item{i:04d}", idx)) for i in range(n)]
        await sub.subscribe_data_change(nodes, queuesize=10, sampling_interval=ua.Double(0.0))
        await asyncio.sleep(1.0)  # initial values out of the way
        c0, t0, p0 = handler.count, time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)
        c1, t1, p1 = handler.count, time.monotonic(), time.process_time()
        await sub.delete()
    finally:
        await client.disconnect()
    return (c1 - c0) / (t1 - t0), (p1 - p0) / max(1, c1 - c0)


class _PipelineSink:
    def __init__(self, windower: Windower) -> None:
        self.put = windower.put
        self.alarms = 0

        self.put_block = windower.put_block

    def alarm(self, alarm: Alarm) -> None:
        self.alarms += 1

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        pass


async def driver(
    endpoint: str, n: int, seconds: float, rate: float, make: Factory = factory
) -> tuple[float, float, float, int]:
    """Changes/s, CPU s per change, CPU s per s and held samples of the driver + windower."""
    cfg = OpcUaConfig.model_validate(
        {
            "endpoint": endpoint,
            "security_policy": "None",
            "security_mode": "None",
            "publishing_interval_ms": 50.0,
            # The simulator's tick, asked and revised alike: the old and the new driver expect
            # the same nominal rate (the old one from the interval asked).
            "sampling_interval_ms": 1000.0 / rate,
            "queue_size": 10,
            "namespace_uri": "urn:edgetwin:plcsim",
            "keepalive_timeout_s": 30.0,
            "verify_interval_s": 60.0,
            "nodes": [{"browse_path": f"Pump1/Bench/Item{i:04d}"} for i in range(n)],
        }
    )
    drv = make(SourceInfo("bench", "machine-1", "industrial"), cfg)
    windower = Windower(window_s=10.0, hop_s=5.0, grace_s=1.0, lost_after_s=15.0, on_alarm=lambda a: None)
    sink = _PipelineSink(windower)
    started = asyncio.Event()
    task = asyncio.create_task(drv.run(sink, started=started.set), name="bench:opcua")
    windows = 0

    async def tick() -> None:
        nonlocal windows
        while True:
            windows += len(windower.close_due(time.monotonic(), time.time()))
            await asyncio.sleep(0.5)

    ticker = asyncio.create_task(tick(), name="bench:windows")
    try:
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.sleep(1.0)
        c0, h0, t0, p0 = drv.samples, held_by(drv), time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)
        c1, h1, t1, p1 = drv.samples, held_by(drv), time.monotonic(), time.process_time()
    finally:
        ticker.cancel()
        task.cancel()
        await asyncio.gather(task, ticker, return_exceptions=True)
    assert windows > 0, "the pipeline closed no window"
    return (c1 - c0) / (t1 - t0), (p1 - p0) / max(1, c1 - c0), (p1 - p0) / (t1 - t0), h1 - h0


def compare(args: argparse.Namespace, before: Factory) -> int:
    """Old and new driver in alternating rounds, every value changing each tick; then quiet tags."""
    print(
        "| monitored items | changes/s before | changes/s now | CPU/change before | CPU/change now | ratio | held now |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, rate in args.steps:
        sim = PlcSimProcess(free_port(), "--rate-hz", str(rate), "--extra", str(n), "--control", "none")
        sim.start(timeout_s=60)
        old: list[tuple[float, float, float, int]] = []
        new: list[tuple[float, float, float, int]] = []
        try:
            for k in range(args.rounds):
                # Which goes first alternates too: a server slowing down over the rounds (sessions
                # of earlier runs expiring) would otherwise always favour the same side.
                for side in (0, 1) if k % 2 == 0 else (1, 0):
                    make, out = (before, old) if side == 0 else (factory, new)
                    out.append(asyncio.run(driver(sim.endpoint, n, args.seconds, rate, make)))
        finally:
            sim.stop()
        ratios = [b[1] / a[1] for a, b in zip(old, new, strict=True)]
        print(
            f"| {n} | {statistics.median(r[0] for r in old):,.0f}/s | {statistics.median(r[0] for r in new):,.0f}/s "
            f"| {statistics.median(r[1] for r in old) * 1e6:.1f} us | {statistics.median(r[1] for r in new) * 1e6:.1f} us "
            f"| {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | {sum(r[3] for r in new)} |",
            flush=True,
        )
    if args.quiet:
        n = args.quiet
        sim = PlcSimProcess(
            free_port(), "--rate-hz", "10", "--extra", str(n), "--extra-every", "0", "--control", "none"
        )
        sim.start(timeout_s=60)
        old, new = [], []
        try:
            for _ in range(args.rounds):
                old.append(asyncio.run(driver(sim.endpoint, n, args.seconds, 10.0, before)))
                new.append(asyncio.run(driver(sim.endpoint, n, args.seconds, 10.0)))
        finally:
            sim.stop()
        cpu_old = statistics.median(r[2] for r in old)
        cpu_new = statistics.median(r[2] for r in new)
        held_s = statistics.median(r[3] for r in new) / args.seconds
        print()
        print(
            f"{n} quiet tags at 10 Hz: CPU {cpu_old * 100:.1f} % before (nothing delivered), "
            f"{cpu_new * 100:.1f} % now holding {held_s:,.0f} samples/s: "
            f"{(cpu_new - cpu_old) / max(held_s, 1) * 1e6:.2f} us per held sample",
            flush=True,
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--before", default=None, help="alternate with the driver of this git revision")
    parser.add_argument("--rounds", type=int, default=3, help="with --before: rounds of old and new")
    parser.add_argument("--quiet", type=int, default=0, help="with --before: this many quiet tags too")
    parser.add_argument(
        "--steps",
        type=lambda text: [(int(n), float(hz)) for n, hz in (step.split("x") for step in text.split(","))],
        default=[(100, 70.0), (1000, 5.0)],
        help='with --before: items x Hz per step, e.g. "100x20,1000x2" (default "100x70,1000x5")',
    )
    args = parser.parse_args()
    if args.before:
        return compare(args, factory_of(args.before))
    rows = []
    for n, rate in ((100, 70.0), (1000, 5.0)):
        sim = PlcSimProcess(free_port(), "--rate-hz", str(rate), "--extra", str(n), "--control", "none")
        sim.start(timeout_s=60)
        try:
            b_rate, b_cpu = asyncio.run(bare(sim.endpoint, n, args.seconds))
            d_rate, d_cpu, _, _ = asyncio.run(driver(sim.endpoint, n, args.seconds, rate))
        finally:
            sim.stop()
        rows.append((n, b_rate, b_cpu, d_rate, d_cpu))
        print(
            f"{n:5d} items: bare {b_rate:8.0f}/s {b_cpu * 1e6:5.1f} us/change | "
            f"driver+pipeline {d_rate:8.0f}/s {d_cpu * 1e6:5.1f} us/change | "
            f"rate ratio {d_rate / b_rate:.3f}, CPU ratio {d_cpu / b_cpu:.3f}",
            flush=True,
        )
    print()
    print(
        "| monitored items | bare asyncua handler | driver + windower | rate ratio | CPU/change bare | CPU/change driver | CPU ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, b_rate, b_cpu, d_rate, d_cpu in rows:
        print(
            f"| {n} | {b_rate:,.0f}/s | {d_rate:,.0f}/s | {d_rate / b_rate:.2f} | "
            f"{b_cpu * 1e6:.1f} us | {d_cpu * 1e6:.1f} us | {d_cpu / b_cpu:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
