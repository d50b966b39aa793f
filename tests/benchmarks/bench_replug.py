"""Time to first data after a serial oximeter is replugged: device backoff against the old one.

The oximeter is the project's simulator on a pseudo-terminal behind a by-id style link; the real
serial driver runs under the real supervisor.  The same unplug/replug plan (long and short
absences, glitches within seconds of a replug, two replugs within 60 s) runs once with the backoff
device units had before (the supervisor's default: 1 s doubling to 60 s, reset after 60 s of
health) and once with :data:`gateway.supervisor.DEVICE_BACKOFF`.  Time to first data is from the
replug to the first sample the driver hands over.  The MCU part does the same with the C node
simulator behind a link: a reset stops the node process and starts it again on the same flash and
link; time to first data is from the new node's start to its first block.

Run: ``.venv/bin/python tests/benchmarks/bench_replug.py [serial] [mcu]``
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from drivers.mcu.config import McuConfig, SimNodeConfig
from drivers.mcu.driver import factory as factory_mcu
from drivers.mcu.simnode import run_sim_node
from drivers.serial.config import SerialConfig
from drivers.serial.driver import factory
from drivers.serial.sim import PtyOximeter, VitalsModel
from gateway.contracts import Alarm, Diagnostic, SourceInfo
from gateway.notify import Notifier
from gateway.sample import Sample, SampleBlock
from gateway.supervisor import DEVICE_BACKOFF, Backoff, Group, Supervisor, Unit

# (unplugged for, then healthy for) in seconds: replugs 1-3 and 3-5 fall within 60 s of each other.
PLAN = [(10.0, 8.0), (3.0, 6.0), (1.0, 2.0), (15.0, 5.0), (0.5, 10.0), (5.0, 3.0)]
# (node off for, then running for): resets in quick succession, and a 10 s outage 20 s after one.
MCU_PLAN = [(0.2, 20.0), (10.0, 3.0), (0.2, 3.0), (0.2, 20.0), (10.0, 5.0)]


class FirstSample:
    """A sink that notes when samples arrive."""

    def __init__(self) -> None:
        self.last = 0.0

    def put(self, sample: Sample) -> None:
        self.last = time.monotonic()

    def put_block(self, block: SampleBlock) -> None:
        self.last = time.monotonic()

    def alarm(self, alarm: Alarm) -> None:
        pass

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        pass


async def run_plan(backoff: Backoff, tmp: Path) -> list[float]:
    vitals = VitalsModel(3, desat_every_s=0, sensor_off_every_s=0)
    sim = PtyOximeter("nonin2", link=tmp / "usb-Nonin_OEM_III-if00", vitals=vitals).start()
    info = SourceInfo(name="bed7-spo2", subject="bed-7", kind="medical")
    drv = factory(info, SerialConfig.model_validate({"port": sim.path, "protocol": "nonin2"}))
    sink = FirstSample()
    sup = Supervisor(Notifier(None), start_timeout_s=5)

    async def unit(started: Callable[[], None]) -> None:
        await drv.run(sink, started=started)

    sup.add(Unit("source:bed7-spo2", Group.SOURCES, unit, backoff=backoff))

    async def drain(_deadline: float) -> None:
        return None

    task = asyncio.create_task(sup.run(drain, 1.0), name="bench:supervisor")
    latencies: list[float] = []
    try:
        while sink.last == 0.0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(2.0)
        for away_s, healthy_s in PLAN:
            sim.unplug()
            await asyncio.sleep(away_s)
            t_replug = time.monotonic()
            sim.replug()
            while sink.last < t_replug:
                await asyncio.sleep(0.01)
            latencies.append(sink.last - t_replug)
            await asyncio.sleep(healthy_s)
    finally:
        sup.request_stop()
        await task
        sim.stop()
    return latencies


async def run_mcu_plan(backoff: Backoff, tmp: Path) -> list[float]:
    link = tmp / "usb-motor7-if00"
    node_cfg = SimNodeConfig(node_id="MOTOR-7731", seed=5, flash=tmp / "flash.bin")
    info = SourceInfo(name="motor7-adc", subject="plant-A/motor-7", kind="industrial")
    drv = factory_mcu(info, McuConfig(port=link, silence_s=1.0))
    sink = FirstSample()
    sup = Supervisor(Notifier(None), start_timeout_s=10)

    async def unit(started: Callable[[], None]) -> None:
        await drv.run(sink, started=started)

    sup.add(Unit("source:motor7-adc", Group.SOURCES, unit, backoff=backoff))

    async def drain(_deadline: float) -> None:
        return None

    latencies: list[float] = []
    extra = ("--link", str(link))
    task: asyncio.Task[int] | None = None
    try:
        async with run_sim_node(node_cfg, "bench node", extra):
            task = asyncio.create_task(sup.run(drain, 1.0), name="bench:supervisor")
            while sink.last == 0.0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(2.0)
        for off_s, running_s in MCU_PLAN:
            await asyncio.sleep(off_s)
            async with run_sim_node(node_cfg, "bench node", extra):
                t_boot = time.monotonic()  # the node has printed its pty: it is sending
                while sink.last < t_boot:
                    await asyncio.sleep(0.01)
                latencies.append(sink.last - t_boot)
                await asyncio.sleep(running_s)
    finally:
        sup.request_stop()
        if task is not None:
            await task
    return latencies


POLICIES = (("before (1 s .. 60 s, reset after 60 s)", Backoff()), ("device backoff", DEVICE_BACKOFF))


def report(results: dict[str, list[float]]) -> None:
    for name, lat in results.items():
        print(
            f"{name:40s} per replug {[round(x, 2) for x in lat]}  median {statistics.median(lat):.2f} s  "
            f"max {max(lat):.2f} s"
        )
    before, after = results.values()
    print(
        f"ratio before/after: max {max(before) / max(after):.1f}x, "
        f"median {statistics.median(before) / statistics.median(after):.1f}x"
    )


def main() -> None:
    which = sys.argv[1:] or ["serial", "mcu"]
    if "serial" in which:
        print(f"serial oximeter plan (away s, healthy s): {PLAN}")
        results = {}
        for name, backoff in POLICIES:
            with tempfile.TemporaryDirectory(prefix="bench-replug-") as tmp:
                results[name] = asyncio.run(run_plan(backoff, Path(tmp)))
        report(results)
    if "mcu" in which:
        print(f"MCU node plan (off s, running s): {MCU_PLAN}")
        results = {}
        for name, backoff in POLICIES:
            with tempfile.TemporaryDirectory(prefix="bench-replug-") as tmp:
                results[name] = asyncio.run(run_mcu_plan(backoff, Path(tmp)))
        report(results)


if __name__ == "__main__":
    main()
