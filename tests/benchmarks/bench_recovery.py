"""Time to first data after a device comes back, against the same driver's cold start.

For each device kind the baseline is a cold start in the same run: a fresh driver against a device
that is already there, from the driver's start to its first value.  The recovery figures are from
the device coming back (server listening again, node streaming again, wearable in range again,
firmware push ended) to the first value delivered after it; the ratio is recovery / cold start.
The recovery runs go through the real supervisor, as the runtime adds a source (its ``pulse``, the
device backoff), with WATCHDOG pings to a socket this benchmark owns (``WatchdogSec=2s``, pings
every 0.5 s): the longest gap between two pings in each run is printed with its rows.

* OPC UA: the PLC simulator SIGKILLed and restarted, 7 nodes by browse path and NodeId, one of them
  recreated under a new NodeId; default reconnect settings; until every healthy node delivered.
* MCU: the simulated node reset with its boot HELLO (SIGUSR1) and with it lost (SIGUSR2); a firmware
  push by ``edgetwin firmware push`` while the driver reads the node (from the push's end).
* BLE (emulated radio): a wearable out of range and back with a slot free; and with three wearables
  on two slots, where it waits for its turn (``slot_turn_s``).

Run: ``.venv/bin/python tests/benchmarks/bench_recovery.py [--rounds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers import RecordingSink, free_port, running_driver
from test_opcua_driver import until

from drivers.ble.config import BleConfig
from drivers.ble.driver import factory as ble_factory
from drivers.ble.testbed.harness import Testbed
from drivers.mcu.config import McuConfig, SimNodeConfig
from drivers.mcu.driver import factory as mcu_factory
from drivers.mcu.simnode import run_sim_node
from drivers.opcua.config import OpcUaConfig
from drivers.opcua.driver import factory as opcua_factory
from drivers.opcua.plcsim import NAMESPACE_URI, PlcSimProcess
from firmware_bridge.manifest import (
    SIM_TARGET,
    generate_key,
    load_private_key,
    make_sim_image,
    manifest_path_for,
    sign_image,
)
from firmware_bridge.messages import parse_version
from gateway.contracts import Diagnostic, SampleSink, SourceInfo
from gateway.notify import Notifier
from gateway.sample import Sample
from gateway.supervisor import DEVICE_BACKOFF, Group, Supervisor, Unit, UnitState

Row = tuple[str, list[float], float, float | None]  # name, seconds, baseline, longest WATCHDOG gap
WATCHDOG_USEC = 2_000_000


class Pings:
    """A NOTIFY_SOCKET this benchmark owns: WATCHDOG=1 arrival times, read on the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.at: list[float] = []

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            if b"WATCHDOG=1" in data:
                self.at.append(time.monotonic())

    def longest_gap(self) -> float:
        """The longest time between two pings (or since the last one, if that is longer)."""
        times = [*self.at, time.monotonic()]
        return max(b - a for a, b in itertools.pairwise(times))


async def _no_drain(deadline: float) -> None:
    return None


@contextlib.asynccontextmanager
async def supervised(driver: Any, sink: SampleSink, tmp: Path) -> AsyncIterator[Pings]:
    """``driver`` as a source unit under the real supervisor and its watchdog; entered once running."""
    pings = Pings(tmp / f"notify-{os.getpid()}-{time.monotonic_ns()}.sock")
    loop = asyncio.get_running_loop()
    loop.add_reader(pings.sock.fileno(), pings._read)
    notifier = Notifier(str(pings.path), watchdog_usec=WATCHDOG_USEC)

    async def run_source(started: Callable[[], None]) -> None:
        await driver.run(sink, started=started)

    sup = Supervisor(notifier, start_timeout_s=30.0)
    unit = Unit("source:bench", Group.SOURCES, run_source, pulse=driver.pulse, backoff=DEVICE_BACKOFF)
    sup.add(unit)
    task = asyncio.create_task(sup.run(_no_drain, 1.0), name="bench:supervisor")
    try:
        await until(lambda: unit.state == UnitState.RUNNING, 30, "the source running")
        yield pings
    finally:
        sup.request_stop()
        await asyncio.wait_for(task, 30)
        loop.remove_reader(pings.sock.fileno())
        notifier.close()
        pings.sock.close()
        pings.path.unlink(missing_ok=True)


class Arrivals(RecordingSink):
    """Notes when each stream (by metric and device) last delivered, on the monotonic clock."""

    def __init__(self) -> None:
        super().__init__()
        self.at: dict[tuple[str, str], float] = {}
        self.sessions: list[float] = []  # MCU handshakes completed (monotonic)

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        if diagnostic.kind == "mcu_node":
            self.sessions.append(time.monotonic())

    def put(self, sample: Sample) -> None:
        self.at[(sample.stream.device, sample.stream.metric.name)] = time.monotonic()

    def put_block(self, block: Any) -> None:
        self.at[(block.stream.device, block.stream.metric.name)] = time.monotonic()

    def fresh(self, since: float) -> set[tuple[str, str]]:
        return {k for k, t in self.at.items() if t > since}


def fresh_count(sink: Arrivals, since: float, n: int) -> Callable[[], bool]:
    """True once ``n`` streams delivered after ``since``."""
    return lambda: len(sink.fresh(since)) >= n


def new_session_data(sink: Arrivals, since: float) -> Callable[[], bool]:
    """True once a session begun after ``since`` delivered (an old one's last batches may trail)."""

    def check() -> bool:
        begun = next((t for t in sink.sessions if t > since), None)
        return begun is not None and bool(sink.fresh(begun))

    return check


def fresh_from(sink: Arrivals, since: float, device: str | None = None) -> Callable[[], bool]:
    """True once a stream (of ``device``, if given) delivered after ``since``."""
    return lambda: any(device is None or d == device for d, _ in sink.fresh(since))


# -- OPC UA ---------------------------------------------------------------------------------------

OPCUA_NODES: list[dict[str, str]] = [
    {"browse_path": "Pump1/Motor/Current"},
    {"browse_path": "Pump1/Motor/Temperature"},
    {"node_id": f"nsu={NAMESPACE_URI};s=Pump1.Hydraulics.Pressure", "name": "Pressure"},
    {"browse_path": "Pump1/Hydraulics/Flow"},
    {"node_id": f"nsu={NAMESPACE_URI};s=Pump1.Vibration.Accelerometer1RMS", "name": "Vibration"},
    {"browse_path": "Pump1/Hydraulics/FluidTemperature"},
    {"node_id": f"nsu={NAMESPACE_URI};s=Pump1.Motor.Voltage", "name": "Voltage"},
]


async def bench_opcua(rounds: int, tmp: Path) -> list[Row]:
    sim = PlcSimProcess(free_port(), "--rate-hz", "20")
    cfg = OpcUaConfig.model_validate(
        {
            "endpoint": sim.endpoint,
            "security_policy": "None",
            "security_mode": "None",
            "namespace_uri": NAMESPACE_URI,
            "publishing_interval_ms": 100.0,
            "nodes": OPCUA_NODES,
        }
    )
    info = SourceInfo("pump", "plant/pump", "industrial")
    await asyncio.to_thread(sim.start)
    cold: list[float] = []
    back: list[float] = []
    try:
        for _ in range(rounds):
            sink = Arrivals()
            driver = opcua_factory(info, cfg)
            t0 = time.monotonic()
            async with running_driver(driver, sink):
                await until(fresh_count(sink, 0, len(OPCUA_NODES)), 10, "first data")
                cold.append(time.monotonic() - t0)
        sink = Arrivals()
        driver = opcua_factory(info, cfg)
        async with supervised(driver, sink, tmp) as pings:
            await until(fresh_count(sink, 0, len(OPCUA_NODES)), 10, "first data")
            for _ in range(rounds):
                sim.kill()
                await asyncio.sleep(1.0)
                sim.args = ["--rate-hz", "20", "--start-with", "recreate Pressure"]
                await asyncio.to_thread(sim.start)
                ready = time.monotonic()
                back.append(await until(fresh_count(sink, ready, len(OPCUA_NODES) - 1), 10, "first data"))
            gap = pings.longest_gap()
    finally:
        sim.stop()
    base = statistics.median(cold)
    return [
        ("OPC UA: cold start, 7 nodes (baseline)", cold, base, None),
        ("OPC UA: PLC restarted", back, base, gap),
    ]


# -- MCU ------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def mcu_node(tmp: Path, pubkey: Path | None = None) -> AsyncIterator[Any]:
    cfg = SimNodeConfig(node_id="MOTOR-7731", seed=3, flash=tmp / "flash.bin", pubkey_file=pubkey)
    async with run_sim_node(cfg, "bench node") as node:
        yield node


async def bench_mcu(rounds: int, tmp: Path) -> list[Row]:
    info = SourceInfo("motor", "plant/motor", "industrial")
    cold: list[float] = []
    reset: list[float] = []
    lost_hello: list[float] = []
    pushed: list[float] = []
    key, pub = tmp / "rel.key", tmp / "rel.pub"
    generate_key(key, pub)
    async with mcu_node(tmp, pub) as node:
        for _ in range(rounds):
            sink = Arrivals()
            t0 = time.monotonic()
            async with running_driver(mcu_factory(info, McuConfig(port=node.path)), sink):
                cold.append(min(sink.at.values()) - t0)
        sink = Arrivals()
        async with supervised(mcu_factory(info, McuConfig(port=node.path)), sink, tmp) as pings:
            for k in range(2 * rounds):
                t0 = time.monotonic()
                os.kill(node.process.pid, signal.SIGUSR2 if k % 2 else signal.SIGUSR1)
                took = await until(new_session_data(sink, t0), 5, "first data")
                (lost_hello if k % 2 else reset).append(took)
                await asyncio.sleep(0.5)
            for r in range(rounds):
                version = f"1.{r + 1}.0"
                image = tmp / f"fw{r}.bin"
                image.write_bytes(make_sim_image(parse_version(version), 24_576))
                signed = sign_image(
                    image.read_bytes(),
                    target=SIM_TARGET,
                    version=parse_version(version),
                    key=load_private_key(key),
                )
                manifest_path_for(image).write_text(signed.to_json(), encoding="utf-8")
                proc = await asyncio.create_subprocess_exec(
                    *[sys.executable, "-m", "gateway.cli", "firmware", "push", str(image)],
                    *["--port", str(node.path), "--pubkey", str(pub)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                _, err = await proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(f"firmware push failed: {err.decode()}")
                t_end = time.monotonic()
                pushed.append(await until(fresh_from(sink, t_end), 5, "first data"))
            gap = pings.longest_gap()
    base = statistics.median(cold)
    return [
        ("MCU: cold start (baseline)", cold, base, None),
        ("MCU: node reset, boot HELLO seen", reset, base, gap),
        ("MCU: node reset, boot HELLO lost", lost_hello, base, gap),
        ("MCU: firmware push while the driver runs (from its end)", pushed, base, gap),
    ]


# -- BLE ------------------------------------------------------------------------------------------


async def bench_ble(rounds: int, tmp: Path) -> list[Row]:
    base_cfg: dict[str, Any] = {"lost_after_s": 1.0, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0}
    info = SourceInfo("ble", "bed", "medical")
    addrs = ["C2:00:00:00:0E:01", "C2:00:00:00:0E:02", "C2:00:00:00:0E:03"]
    cold: list[float] = []
    free: list[float] = []
    turn: list[float] = []
    gaps: list[float] = []
    turn_s = 2.0
    with Testbed(scan_interval_s=0.05, page_timeout_s=0.2) as tb:
        ws = [tb.wearable(p, a, rate=10) for p, a in zip(("hr", "plx", "thermo"), addrs, strict=True)]
        try:
            devices = [
                {"address": a, "profile": p} for p, a in zip(("hr", "plx", "thermo"), addrs, strict=True)
            ]
            for _ in range(rounds):
                sink = Arrivals()
                t0 = time.monotonic()
                drv = ble_factory(info, BleConfig.model_validate({**base_cfg, "devices": devices[:1]}))
                async with running_driver(drv, sink):
                    await until(fresh_from(sink, 0), 10, "first data")
                    cold.append(min(sink.at.values()) - t0)
            for slots, out in ((3, free), (2, turn)):
                sink = Arrivals()
                cfg = BleConfig.model_validate(
                    {**base_cfg, "devices": devices, "slots": slots, "slot_turn_s": turn_s}
                )
                drv = ble_factory(info, cfg)
                async with supervised(drv, sink, tmp) as pings:
                    await until(fresh_count(sink, 0, slots), 10, "first data")
                    for _ in range(rounds):
                        leaver = next(a for a in addrs if drv.status()[a].state == "connected")
                        await asyncio.to_thread(tb.set_in_range, leaver, False)
                        await asyncio.sleep(1.5)
                        t_in = time.monotonic()
                        await asyncio.to_thread(tb.set_in_range, leaver, True)
                        out.append(await until(fresh_from(sink, t_in, leaver), turn_s + 10, "first data"))
                    gaps.append(pings.longest_gap())
        finally:
            for w in ws:
                w.stop()
    base = statistics.median(cold)
    return [
        ("BLE: cold start, one wearable (baseline)", cold, base, None),
        ("BLE: wearable back in range, slot free", free, base, gaps[0]),
        (f"BLE: back in range, 3 wearables on 2 slots, slot_turn_s {turn_s:g}", turn, base, gaps[1]),
    ]


def main() -> int:
    """Run every scenario and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    t0 = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        rows += asyncio.run(bench_opcua(args.rounds, Path(tmp)))
        rows += asyncio.run(bench_mcu(args.rounds, Path(tmp)))
        rows += asyncio.run(bench_ble(args.rounds, Path(tmp)))
    print(f"time to first data, {args.rounds} rounds each, {time.monotonic() - t0:.0f} s in all\n")
    print(
        f"| scenario | median s | max s | vs cold start | longest WATCHDOG gap ({WATCHDOG_USEC / 1e6:g} s) |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, values, base, gap in rows:
        med = statistics.median(values)
        shown = "-" if gap is None else f"{gap:.2f} s"
        print(f"| {name} | {med:.2f} | {max(values):.2f} | {med / base:.2f}x | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
