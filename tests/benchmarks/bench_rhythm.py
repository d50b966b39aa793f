"""Per-update compute of the RR rhythm-pattern monitor, with the single-beat ectopy monitor as baseline.

Run: ``python tests/benchmarks/bench_rhythm.py`` (one core: ``taskset -c 0 python ...``).
"""

from __future__ import annotations

import time

import numpy as np

from drivers.sim import rhythms
from drivers.sim.protocol import RR
from gateway.inference.ectopic import EctopyMonitor
from gateway.inference.rhythm import RhythmMonitor
from gateway.sample import MDC, Sample, Stream

STREAM = Stream("strap", "bed", "strap-1", MDC[RR])


def samples() -> list[Sample]:
    """An hour of beats: sinus rhythm with sinus arrhythmia, a bigeminy, a trigeminy, a couplet."""
    r = rhythms.sinus(5000, 1, hr_bpm=75.0, rsa=0.04)
    r = rhythms.with_pattern(r, "bigeminy", 1000, 1600, coupling=0.9)
    r = rhythms.with_pattern(r, "trigeminy", 2500, 3100, coupling=0.85, origin="S")
    r = rhythms.with_pattern(r, "couplet", 4000, 4010, coupling=0.7)
    t = np.cumsum(r.rr) / 1000.0
    return [Sample(STREAM, float(a), float(a), float(b)) for a, b in zip(t, r.rr, strict=True)]


def per_update_us(
    make: type[RhythmMonitor] | type[EctopyMonitor], data: list[Sample], rounds: int = 5
) -> float:
    """Best-of-rounds mean time of one ``update`` call, in microseconds."""
    best = float("inf")
    for _ in range(rounds):
        mon = make()
        t0 = time.perf_counter()
        for s in data:
            mon.update(s)
        best = min(best, time.perf_counter() - t0)
    return best / len(data) * 1e6


def main() -> None:
    """Print the per-update time of both monitors and their ratio."""
    data = samples()
    base = per_update_us(EctopyMonitor, data)
    new = per_update_us(RhythmMonitor, data)
    print(f"{len(data)} RR updates (~{sum(s.value for s in data) / 3.6e6:.2f} h of beats)")
    print(f"EctopyMonitor (single-beat rule, baseline): {base:.1f} us/update")
    print(f"RhythmMonitor (patterns): {new:.1f} us/update ({new / base:.1f}x baseline)")


if __name__ == "__main__":
    main()
