"""Serial oximeter parsing speed against each protocol's line rate, on one core.

For every protocol: a clean recording of simulated output is fed to the parser in 1 KiB reads
(what the port transport hands over) and the whole frames per second are measured.  The baseline
is the line rate - the most frames the serial line can carry at the protocol's speed and framing,
back to back - so the ratio says how much faster than any monitor could ever send the gateway
parses.  A damaged recording (0.2 % bit flips, dropped and inserted bytes) is timed too: hunting
for frames is the slow path.  Last, the whole driver is timed through a real pty, fed as fast as
the writer can go: pty, transport, parser, samples into a sink.

Run: ``.venv/bin/python tests/benchmarks/bench_serial.py``
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import threading
import time
import tty
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from drivers.serial.config import SerialConfig
from drivers.serial.driver import factory
from drivers.serial.formats import PARSERS, make_parser
from drivers.serial.sim import Corruption, Corruptor, FrameSource, VitalsModel
from gateway.contracts import Alarm, Diagnostic, SourceInfo
from gateway.sample import Sample, SampleBlock

READ = 1024
RUNS = 5
AIM = 100.0


def recording(protocol: str, seconds: float) -> bytes:
    """Simulated output of one monitor, played faster than real time (spot checks every second)."""
    src = FrameSource(protocol, VitalsModel(1), spot_every_s=1.0)
    return b"".join(src.between(t, t + 1.0) for t in range(int(seconds)))


def parse_rate(protocol: str, data: bytes) -> float:
    """Whole frames per second, median of RUNS."""
    rates = []
    for _ in range(RUNS):
        parser = make_parser(protocol)
        t0 = time.perf_counter()
        for i in range(0, len(data), READ):
            parser.feed(data[i : i + READ])
        elapsed = time.perf_counter() - t0
        rates.append(parser.frames / elapsed)
    return statistics.median(rates)


class CountingSink:
    def __init__(self) -> None:
        self.samples = 0

    def put(self, sample: Sample) -> None:
        self.samples += 1

    def put_block(self, block: SampleBlock) -> None:
        self.samples += len(block)

    def alarm(self, alarm: Alarm) -> None:
        pass

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        pass


def through_pty(protocol: str, data: bytes) -> tuple[float, int]:
    """Frames per second through a pty into the driver, writer going flat out."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    drv = factory(
        SourceInfo("bench", "bench-bed", "medical"),
        SerialConfig.model_validate({"port": path, "protocol": protocol}),
    )
    sink = CountingSink()
    done = threading.Event()

    def writer() -> None:
        view = memoryview(data)
        while view and not done.is_set():
            try:
                n = os.write(master, view[:4096])
            except BlockingIOError:
                time.sleep(0.0005)
                continue
            view = view[n:]

    async def main() -> float:
        started = asyncio.Event()
        task = asyncio.create_task(drv.run(sink, started=started.set), name="bench:serial")
        await asyncio.sleep(0.3)  # the port is open and flushed before the writer starts
        thread = threading.Thread(target=writer, name="bench:pty-writer")
        t0 = time.perf_counter()
        thread.start()
        await asyncio.to_thread(thread.join)
        # Wait for the reader to drain what is still queued in the pty.
        last, still = -1, 0
        while still < 3:
            await asyncio.sleep(0.05)
            now = sink.samples
            still = still + 1 if now == last else 0
            last = now
        elapsed = time.perf_counter() - t0 - 0.15
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return elapsed

    try:
        elapsed = asyncio.run(main())
    finally:
        done.set()
        os.close(master)
        os.close(slave)
    frames = drv.totals.get("frames", 0)
    return frames / elapsed, sink.samples


def main() -> int:
    rows = []
    worst = float("inf")
    for name, cls in PARSERS.items():
        seconds = 1200 if cls.frame_period_s < 0.1 else 20000
        data = recording(name, seconds)
        clean = parse_rate(name, data)
        damaged_data = Corruptor(Corruption(bit_flip=0.002, drop=0.002, insert=0.002), cls.settings, 5).apply(
            data
        )
        damaged = parse_rate(name, damaged_data)
        line = cls.line_frame_rate()
        ratio = clean / line
        worst = min(worst, damaged / line)
        rows.append(
            (name, str(cls.settings), line, 1 / cls.frame_period_s, clean, damaged, ratio, damaged / line)
        )
        print(
            f"{name}: {clean:,.0f} frames/s clean, {damaged:,.0f} damaged, line rate {line:,.0f}/s",
            flush=True,
        )
    pty_rate, samples = through_pty("nonin2", recording("nonin2", 2400))
    pty_line = PARSERS["nonin2"].line_frame_rate()
    print()
    print(
        "| protocol | line | line rate (frames/s) | device rate | parsed clean (frames/s) | parsed damaged | clean / line | damaged / line |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, settings, line, device, clean, damaged, ratio, dratio in rows:
        print(
            f"| {name} | {settings} | {line:,.0f} | {device:,.1f} | {clean:,.0f} | {damaged:,.0f} | "
            f"{ratio:,.0f}x | {dratio:,.0f}x |"
        )
    print(
        f"| nonin2 through a pty into the driver | 9600 8N1 | {pty_line:,.0f} | 75.0 | {pty_rate:,.0f} | - | "
        f"{pty_rate / pty_line:,.0f}x | - |"
    )
    print(f"\n({samples:,} samples handed to the sink in the pty run; aim: every ratio >= {AIM:.0f}x)")
    ok = worst >= AIM and pty_rate / pty_line >= AIM
    print("OK" if ok else "BELOW AIM")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
