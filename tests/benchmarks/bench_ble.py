"""BLE notifications per second through the driver and the pipeline, against bleak alone.

Both sides receive the same bursts of Heart Rate Measurement notifications from a simulated strap
on the emulated radio (private dbus-daemon + emulated BlueZ + the strap, all separate processes):

(a) baseline: a bare ``BleakClient.start_notify`` callback that only counts;
(b) ours: the BLE driver (connection manager, parser, one ``Sample`` per HR value and per RR
    interval) handing samples to the pipeline's ``Windower``; a thin sink counts HR samples.

Each side gets the same burst size, alternately, several times; the figures are medians. Rates are
end to end (the emulator relays every notification, so it usually sets the pace); CPU time per
notification is the gateway process's own cost, where the two differ by what the driver adds.

Run: ``.venv/bin/python tests/benchmarks/bench_ble.py [--n 3000] [--runs 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bleak import BleakClient, BleakScanner

from drivers.ble.config import BleConfig
from drivers.ble.driver import BleDriver, factory
from drivers.ble.protocol import HEART_RATE_MEASUREMENT, HR
from drivers.ble.testbed.harness import Testbed, WearableProcess
from gateway.contracts import Alarm, Diagnostic, SourceInfo
from gateway.pipeline.windows import Windower
from gateway.sample import Sample, SampleBlock

ADDRESS = "C2:00:00:00:0B:01"
Runner = Callable[[int, WearableProcess, float], Coroutine[Any, Any, tuple[float, float]]]


class Counter:
    """Counts arrivals and notes the time of the first and of the n-th."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count == 1:
            self.first = time.perf_counter()
        if self.count == self.n:
            self.last = time.perf_counter()
            self.done.set()


class PipelineSink:
    """The driver's sink: the pipeline's windower, counting HR samples on the way."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.windower = Windower(
            window_s=10.0, hop_s=5.0, grace_s=1.0, lost_after_s=30.0, on_alarm=lambda a: None
        )
        self._put = self.windower.put

    def put(self, sample: Sample) -> None:
        self._put(sample)
        if sample.stream.metric.name == HR:
            self.counter.hit()

    def put_block(self, block: SampleBlock) -> None:
        self.windower.put_block(block)

    def alarm(self, alarm: Alarm) -> None:
        pass

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        pass


async def burst(strap: WearableProcess, counter: Counter, timeout_s: float) -> tuple[float, float]:
    """Send a burst; (notifications/s, gateway CPU seconds per notification)."""
    cpu0 = time.process_time()
    await asyncio.to_thread(strap.command, f"burst {counter.n}", timeout_s)
    async with asyncio.timeout(timeout_s):
        await counter.done.wait()
    cpu = time.process_time() - cpu0
    return (counter.n - 1) / (counter.last - counter.first), cpu / counter.n


async def baseline_run(n: int, strap: WearableProcess, timeout_s: float) -> tuple[float, float]:
    """Bare bleak: a callback that counts."""
    device = await BleakScanner.find_device_by_address(ADDRESS, timeout=5.0, bluez={"adapter": "hci0"})
    assert device is not None, "the strap is not advertising"
    counter = Counter(n)
    async with BleakClient(device, bluez={"adapter": "hci0"}) as client:
        await client.start_notify(HEART_RATE_MEASUREMENT, lambda _c, _d: counter.hit())
        return await burst(strap, counter, timeout_s)


async def ours_run(n: int, strap: WearableProcess, timeout_s: float) -> tuple[float, float]:
    """The driver and the pipeline."""
    counter = Counter(n)
    sink = PipelineSink(counter)
    cfg = BleConfig.model_validate(
        {"devices": [{"address": ADDRESS, "profile": "hr"}], "battery_poll_s": 3600.0}
    )
    drv: BleDriver = factory(SourceInfo("bench", "bed1", "medical"), cfg)
    started = asyncio.Event()
    task = asyncio.create_task(drv.run(sink, started=started.set), name="bench-ble-driver")
    try:
        async with asyncio.timeout(10):
            while drv.status()[ADDRESS].state != "connected":
                await asyncio.sleep(0.01)
        # Subscriptions follow the connection by a few round trips.
        await asyncio.sleep(0.2)
        return await burst(strap, counter, timeout_s)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def median(runs: list[tuple[float, float]], i: int) -> float:
    """Median of one column."""
    return statistics.median(r[i] for r in runs)


def main() -> int:
    """Run the benchmark and print figures and a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="notifications per burst")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    timeout_s = max(30.0, args.n / 100)
    base: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    with Testbed(scan_interval_s=0.1) as tb:
        strap = tb.wearable("hr", ADDRESS, rate=0)
        sides: list[tuple[list[tuple[float, float]], Runner]] = [(base, baseline_run), (ours, ours_run)]
        for i in range(args.runs):
            for results, fn in sides:
                r = asyncio.run(fn(args.n, strap, timeout_s))
                results.append(r)
                print(
                    f"run {i + 1} {fn.__name__:<12} {r[0]:9.0f} notifications/s  {r[1] * 1e6:7.1f} us CPU each"
                )
    b_rate, o_rate = median(base, 0), median(ours, 0)
    b_cpu, o_cpu = median(base, 1), median(ours, 1)
    print()
    print(f"BLE notifications, {args.n} per burst, median of {args.runs}:")
    print("| path | notifications/s | gateway CPU per notification |")
    print("|---|---|---|")
    print(f"| bleak callback only (baseline) | {b_rate:,.0f} | {b_cpu * 1e6:.1f} us |")
    print(f"| driver + pipeline (ours) | {o_rate:,.0f} | {o_cpu * 1e6:.1f} us |")
    print(f"| ratio ours / baseline | {o_rate / b_rate:.2f} | {o_cpu / b_cpu:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
