"""Gateway-side cost of the MCU link: bytes -> frames -> sample batches -> SampleBlocks.

Run: .venv/bin/python tests/benchmarks/bench_mcu.py

The baseline is ``bytes.split(b"\\x00")`` over the same stream: the least any Python framing can
cost. Each stage adds one layer (COBS + CRC check, body decoding, scaling and timestamping into
blocks). Figures are medians of 3 runs; a 115200-baud line carries about 11.5 kB/s, so anything
above ~0.1 MB/s keeps up with one node.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from drivers.mcu.protocol import SampleAssembler, metric_for
from firmware_bridge.framing import FrameDecoder, encode_frame
from firmware_bridge.messages import MAX_SAMPLES, Channel, MsgType, Samples
from firmware_bridge.timesync import ClockSync
from gateway.sample import Stream

FRAMES = 20_000
READ = 4096


def _stream() -> bytes:
    out = bytearray()
    for i in range(FRAMES):
        raw = tuple(
            round(5940 * math.sin(2 * math.pi * 50 * (i * MAX_SAMPLES + k) / 500)) for k in range(MAX_SAMPLES)
        )
        out += encode_frame(
            MsgType.SAMPLES, i & 0xFFFF, Samples(0, i * MAX_SAMPLES, (i * 230_000) % 2**32, raw).encode()
        )
    return bytes(out)


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + READ] for i in range(0, len(data), READ)]


def _time(fn: Callable[[], int]) -> tuple[float, int]:
    runs = []
    count = 0
    for _ in range(3):
        t0 = time.perf_counter()
        count = fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), count


def main() -> None:
    """Print the figures and a markdown table."""
    data = _stream()
    chunks = _chunks(data)
    ch = Channel(0, 0, 500_000, 0.001, 0.0, "motor_current", "A")
    stream = Stream("bench", "machine", "NODE", metric_for(ch, {}), kind="industrial", rate_hz=500.0)

    def baseline() -> int:
        pending = b""
        n = 0
        for c in chunks:
            parts = (pending + c).split(b"\x00")
            pending = parts.pop()
            n += len(parts)
        return n

    def framing() -> int:
        dec = FrameDecoder()
        return sum(len(dec.feed(c)) for c in chunks)

    def decoding() -> int:
        dec = FrameDecoder()
        n = 0
        for c in chunks:
            for f in dec.feed(c):
                n += len(Samples.decode(f.payload).raw)
        return n

    def blocks() -> int:
        dec = FrameDecoder()
        clock = ClockSync(1_000_000)
        clock.add(0.0, 0.0001, 0)
        asm = SampleAssembler({0: (ch, stream)}, clock)
        n = 0
        for c in chunks:
            for f in dec.feed(c):
                block, _ = asm.add(Samples.decode(f.payload), 0.0)
                n += len(block) if block is not None else 0
        return n

    mb = len(data) / 1e6
    t_base, n_base = _time(baseline)
    rows = [("split on 0x00 (baseline)", t_base, n_base, "delimited chunks")]
    for name, fn, unit in (
        ("+ COBS + CRC-16 (FrameDecoder)", framing, "frames"),
        ("+ SAMPLES decoding", decoding, "samples"),
        ("+ SampleBlocks (scale, time)", blocks, "samples"),
    ):
        t, n = _time(fn)
        rows.append((name, t, n, unit))
    print(
        f"stream: {FRAMES} SAMPLES frames of {MAX_SAMPLES} samples, {mb:.1f} MB, read in {READ}-byte chunks\n"
    )
    print("| stage | MB/s | frames/s | samples/s | x baseline time |")
    print("|---|---|---|---|---|")
    for name, t, _n, _unit in rows:
        print(
            f"| {name} | {mb / t:.1f} | {FRAMES / t:,.0f} | {FRAMES * MAX_SAMPLES / t:,.0f} | {t / t_base:.1f} |"
        )
    t_full = rows[-1][1]
    print(
        f"\nfull path: {FRAMES * MAX_SAMPLES / t_full / 1e6:.2f} M samples/s, "
        f"{t_full / FRAMES * 1e6:.1f} us per frame; a 115200-baud line carries ~48 such frames/s"
    )


if __name__ == "__main__":
    main()
