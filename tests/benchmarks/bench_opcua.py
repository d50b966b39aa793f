"""OPC UA: data changes/s and CPU per change, driver + pipeline vs a bare asyncua subscription handler.

Run: .venv/bin/python tests/benchmarks/bench_opcua.py [--seconds 8]

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
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from asyncua import ua
from asyncua.client.client import Client

from drivers.opcua.config import OpcUaConfig
from drivers.opcua.driver import factory
from drivers.opcua.plcsim import PlcSimProcess
from drivers.opcua.uahelp import node_id
from gateway.contracts import Alarm, Diagnostic, SourceInfo
from gateway.pipeline.windows import Windower
from gateway.sample import SampleBlock


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

    def put_block(self, block: SampleBlock) -> None:
        raise AssertionError("unexpected")

    def alarm(self, alarm: Alarm) -> None:
        self.alarms += 1

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        pass


async def driver(endpoint: str, n: int, seconds: float) -> tuple[float, float]:
    cfg = OpcUaConfig.model_validate(
        {
            "endpoint": endpoint,
            "security_policy": "None",
            "security_mode": "None",
            "publishing_interval_ms": 50.0,
            "sampling_interval_ms": 0.0,
            "queue_size": 10,
            "namespace_uri": "urn:edgetwin:plcsim",
            "keepalive_timeout_s": 30.0,
            "verify_interval_s": 60.0,
            "nodes": [{"browse_path": f"Pump1/Bench/Item{i:04d}", "rate_hz": 20.0} for i in range(n)],
        }
    )
    drv = factory(SourceInfo("bench", "machine-1", "industrial"), cfg)
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
        c0, t0, p0 = drv.samples, time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)
        c1, t1, p1 = drv.samples, time.monotonic(), time.process_time()
    finally:
        ticker.cancel()
        task.cancel()
        await asyncio.gather(task, ticker, return_exceptions=True)
    assert windows > 0, "the pipeline closed no window"
    return (c1 - c0) / (t1 - t0), (p1 - p0) / max(1, c1 - c0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    rows = []
    for n, rate in ((100, 70.0), (1000, 5.0)):
        sim = PlcSimProcess(free_port(), "--rate-hz", str(rate), "--extra", str(n), "--control", "none")
        sim.start(timeout_s=60)
        try:
            b_rate, b_cpu = asyncio.run(bare(sim.endpoint, n, args.seconds))
            d_rate, d_cpu = asyncio.run(driver(sim.endpoint, n, args.seconds))
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
