"""Throughput of the sample pipeline, from driver hand-off through windows and features, on one core.

Three designs run on the same synthetic data in the same process, so the ratios hold even where
absolute figures drift between machines:

(a) ours, one ``Sample`` at a time into ``Windower.put``;
(b) ours, ``SampleBlock`` chunks of 25 into ``Windower.put_block``;
(c) a naive asyncio design: driver -> windowing -> features stages joined by ``asyncio.Queue``,
    one queue item per sample per hop, with the same feature functions.

Data time is synthetic (``close_due`` runs once per hop of data time), building the input
objects is not timed, and the timed part is everything from the hand-off to the window records.

Run: ``.venv/bin/python tests/benchmarks/bench_pipeline.py [--n 2000000]``
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from gateway.contracts import Alarm, WindowRecord
from gateway.pipeline.features import basic_features, basic_features_finite
from gateway.pipeline.windows import Windower
from gateway.sample import MDC, UNUSABLE_FLAGS, Quality, Sample, SampleBlock, Stream

T0 = 10_000.0  # monotonic seconds at the first sample
WALL0 = 1.7e9
WINDOW_S = 1.0
HOP_S = 1.0
GRACE_S = 0.5


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory of this process in MB, from /proc/self/status."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else math.nan


class Source:
    """Synthetic sine + noise for several streams of one subject, one hop of data time at a time."""

    def __init__(self, n: int, streams: int, rate_hz: float, seed: int = 1) -> None:
        self.rate = rate_hz
        self.per_hop = round(rate_hz * HOP_S)
        self.hops = max(1, n // (streams * self.per_hop))
        self.streams = [
            Stream("bench", "bed1", f"dev{i}", MDC["MDC_PULS_OXIM_PULS_RATE"], rate_hz=rate_hz)
            for i in range(streams)
        ]
        self.rng = np.random.default_rng(seed)

    @property
    def samples(self) -> int:
        return self.hops * self.per_hop * len(self.streams)

    def hop(self, h: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Times and one value column per stream for hop ``h``."""
        t = T0 + (h * self.per_hop + np.arange(self.per_hop)) / self.rate
        values = [
            70.0 + 5.0 * np.sin(2 * np.pi * (0.1 + 0.05 * i) * t) + self.rng.normal(0.0, 0.5, t.size)
            for i in range(len(self.streams))
        ]
        return t, values

    def sample_hops(self) -> Iterator[tuple[float, list[Sample]]]:
        """Per hop: (end of the hop's data time, samples of all streams interleaved in time order)."""
        good = Quality.GOOD
        for h in range(self.hops):
            t, values = self.hop(h)
            tl = t.tolist()
            wl = (t + (WALL0 - T0)).tolist()
            cols = [v.tolist() for v in values]
            batch = [
                Sample(s, tl[j], wl[j], col[j], good)
                for j in range(len(tl))
                for s, col in zip(self.streams, cols, strict=True)
            ]
            yield T0 + (h + 1) * HOP_S, batch

    def block_hops(self, chunk: int) -> Iterator[tuple[float, list[SampleBlock]]]:
        """Per hop: (end of the hop's data time, blocks of ``chunk`` rows, streams interleaved)."""
        q = np.zeros(self.per_hop, np.uint8)
        for h in range(self.hops):
            t, values = self.hop(h)
            wall = t + (WALL0 - T0)
            blocks = [
                SampleBlock(s, t[i : i + chunk], wall[i : i + chunk], v[i : i + chunk], q[i : i + chunk])
                for i in range(0, t.size, chunk)
                for s, v in zip(self.streams, values, strict=True)
            ]
            yield T0 + (h + 1) * HOP_S, blocks


def new_windower(alarms: list[Alarm]) -> Windower:
    return Windower(window_s=WINDOW_S, hop_s=HOP_S, grace_s=GRACE_S, lost_after_s=5.0, on_alarm=alarms.append)


def run_samples(src: Source) -> tuple[float, float, list[WindowRecord]]:
    """(a): returns (seconds in put, seconds in close_due, records)."""
    alarms: list[Alarm] = []
    sink = new_windower(alarms)
    records: list[WindowRecord] = []
    put_s = close_s = 0.0
    clock = time.perf_counter
    for end, batch in src.sample_hops():
        t0 = clock()
        for sample in batch:
            sink.put(sample)
        t1 = clock()
        records += sink.close_due(end, WALL0 - T0 + end)
        close_s += clock() - t1
        put_s += t1 - t0
    records += sink.close_due(end + GRACE_S, 0.0)
    assert not alarms, alarms
    return put_s, close_s, records


def run_blocks(src: Source, chunk: int) -> tuple[float, float, list[WindowRecord]]:
    """(b): returns (seconds in put_block, seconds in close_due, records)."""
    alarms: list[Alarm] = []
    sink = new_windower(alarms)
    records: list[WindowRecord] = []
    put_s = close_s = 0.0
    clock = time.perf_counter
    for end, blocks in src.block_hops(chunk):
        t0 = clock()
        for block in blocks:
            sink.put_block(block)
        t1 = clock()
        records += sink.close_due(end, WALL0 - T0 + end)
        close_s += clock() - t1
        put_s += t1 - t0
    records += sink.close_due(end + GRACE_S, 0.0)
    assert not alarms, alarms
    return put_s, close_s, records


def naive_features(samples: list[Sample]) -> dict[str, float]:
    """The same usable-sample filter and features as the windower, from a list of samples."""
    t = np.array([s.t_mono for s in samples])
    v = np.array([s.value for s in samples])
    q = np.array([int(s.quality) for s in samples], np.uint8)
    ok = ((q & UNUSABLE_FLAGS) == 0) & np.isfinite(v)
    return basic_features(t[ok], v[ok])


async def naive_pipeline(src: Source) -> tuple[float, list[tuple[int, list[dict[str, float]]]]]:
    """(c): returns (seconds, excluding building the input, and per-window features)."""
    q_window: asyncio.Queue[Sample | None] = asyncio.Queue()
    q_features: asyncio.Queue[tuple[int, Sample] | None] = asyncio.Queue()
    out: list[tuple[int, list[dict[str, float]]]] = []
    build_s = 0.0

    async def driver() -> None:
        nonlocal build_s
        hops = src.sample_hops()
        while True:
            t0 = time.perf_counter()
            item = next(hops, None)
            build_s += time.perf_counter() - t0
            if item is None:
                break
            for sample in item[1]:
                q_window.put_nowait(sample)
            await asyncio.sleep(0)  # a driver yields between reads from its device
        q_window.put_nowait(None)

    async def windowing() -> None:
        while (sample := await q_window.get()) is not None:
            k = math.floor(sample.t_mono / HOP_S) + 1
            q_features.put_nowait((k, sample))
        q_features.put_nowait(None)

    async def features() -> None:
        open_k: int | None = None
        buffers: dict[Stream, list[Sample]] = {}

        def flush() -> None:
            if open_k is not None:
                out.append((open_k, [naive_features(buffers[s]) for s in src.streams]))
            for buf in buffers.values():
                buf.clear()

        while (item := await q_features.get()) is not None:
            k, sample = item
            if k != open_k:
                flush()
                open_k = k
            buffers.setdefault(sample.stream, []).append(sample)
        flush()

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(driver(), name="bench-driver")
        tg.create_task(windowing(), name="bench-windowing")
        tg.create_task(features(), name="bench-features")
    return time.perf_counter() - t0 - build_s, out


def feature_cost_us(rate_hz: float, reps: int = 5000) -> tuple[float, float]:
    """µs per 256-sample window: basic features alone, and with the NaN/flag checks of the windower."""
    rng = np.random.default_rng(2)
    n = round(rate_hz * WINDOW_S)
    t = T0 + np.arange(n) / rate_hz
    v = 70.0 + rng.normal(0.0, 1.0, n)
    start = time.perf_counter()
    for _ in range(reps):
        basic_features_finite(t, v)
    finite = (time.perf_counter() - start) / reps * 1e6
    start = time.perf_counter()
    for _ in range(reps):
        basic_features(t, v)
    checked = (time.perf_counter() - start) / reps * 1e6
    return finite, checked


def _median_pair(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The (hand-off, close) pair of the run with the median total."""
    ordered = sorted(runs, key=sum)
    return ordered[len(ordered) // 2]


def main() -> None:
    """Run the three designs and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2_000_000, help="samples per design (default 2 M)")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rate", type=float, default=256.0, help="Hz per stream")
    parser.add_argument("--chunk", type=int, default=25, help="rows per SampleBlock in (b)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are shown")
    args = parser.parse_args()

    src = Source(args.n, args.streams, args.rate)
    new_windower([])
    rss_start = rss_mb()
    n = src.samples
    print(
        f"{n:,} samples per design: {args.streams} streams x {args.rate:g} Hz x {src.hops} s of data time; "
        f"window {WINDOW_S:g} s, hop {HOP_S:g} s, grace {GRACE_S:g} s; median of {args.repeat} interleaved "
        f"rounds; Python {sys.version.split()[0]}, numpy {np.__version__}"
    )

    def fresh() -> Source:
        return Source(args.n, args.streams, args.rate)

    runs_a: list[tuple[float, float]] = []
    runs_b: list[tuple[float, float]] = []
    runs_c: list[float] = []
    for _ in range(args.repeat):
        put_a, close_a, rec_a = run_samples(fresh())
        put_b, close_b, rec_b = run_blocks(fresh(), args.chunk)
        naive_s, rec_c = asyncio.run(naive_pipeline(fresh()))
        runs_a.append((put_a, close_a))
        runs_b.append((put_b, close_b))
        runs_c.append(naive_s)
    put_a, close_a = _median_pair(runs_a)
    put_b, close_b = _median_pair(runs_b)
    naive_s = statistics.median(runs_c)

    # The designs must agree, or the comparison means nothing.
    assert len(rec_a) == len(rec_b) == len(rec_c) == src.hops, (len(rec_a), len(rec_b), len(rec_c))
    for ra, rb, (kc, fc) in zip(rec_a, rec_b, rec_c, strict=True):
        assert ra.index == rb.index == kc
        for sa, sb, fcs in zip(ra.streams, rb.streams, fc, strict=True):
            assert sa.count == sb.count == round(args.rate * WINDOW_S)
            assert sa.features == sb.features
            assert all(math.isclose(sa.features[key], fcs[key], rel_tol=1e-9, abs_tol=1e-12) for key in fcs)

    stream_windows = len(rec_a) * args.streams
    rows = [
        ("(a) ours, Sample -> put", put_a + close_a, put_a, close_a),
        (f"(b) ours, SampleBlock({args.chunk}) -> put_block", put_b + close_b, put_b, close_b),
        ("(c) naive: asyncio.Queue per sample per stage", naive_s, math.nan, math.nan),
    ]
    print()
    print("| design | seconds | M samples/s | hand-off s | windows+features s | vs (c) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, secs, hand, close in rows:
        hand_txt = "" if math.isnan(hand) else f"{hand:.3f}"
        close_txt = "" if math.isnan(close) else f"{close:.3f}"
        print(
            f"| {name} | {secs:.3f} | {n / secs / 1e6:.2f} | {hand_txt} | {close_txt} "
            f"| {naive_s / secs:.2f}x |"
        )
    finite_us, checked_us = feature_cost_us(args.rate)
    print()
    ratio_a = naive_s / (put_a + close_a)
    ratio_b = naive_s / (put_b + close_b)
    print(f"- (a)/(c) = {ratio_a:.2f}x, (b)/(c) = {ratio_b:.2f}x (aim >= 2x)")
    print(
        f"- features of one {round(args.rate * WINDOW_S)}-sample window: {finite_us:.1f} µs "
        f"(mean, std, min, max, slope); {checked_us:.1f} µs with the NaN checks of the public function"
    )
    print(
        f"- close_due per stream-window (ring read, usable mask, features, record): "
        f"{close_a / stream_windows * 1e6:.1f} µs in (a), {close_b / stream_windows * 1e6:.1f} µs in (b)"
    )
    print(f"- hand-off per sample: {put_a / n * 1e9:.0f} ns in (a), {put_b / n * 1e9:.0f} ns in (b)")
    print(
        f"- RSS after imports and start: {rss_start:.1f} MB; at the end: {rss_mb():.1f} MB; "
        f"peak: {rss_mb('VmHWM'):.1f} MB (input of one hop is built at a time)"
    )


if __name__ == "__main__":
    main()
