"""Per-sample cost of the alarm stages on the hand-off path, against the windower's own hand-off.

The same 200,000 SpO2 samples (a stream with a plausibility rule and default limits, so both
checkers do their full work) go, one at a time and in blocks of 25, through: the windower
(baseline), the plausibility checker (with its verdict on each sample, as the pipeline asks it),
and the limit checker.

Run: ``python tests/benchmarks/bench_alarms.py``
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gateway.alarms.config import AlarmsSection, limit_checker
from gateway.inference.plausibility import PlausibilityChecker
from gateway.pipeline.windows import Windower
from gateway.sample import MDC, Sample, SampleBlock, Stream

N = 200_000
BLOCK = 25
SPO2 = Stream("ox", "bed-1", "OX-1", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)


def data() -> tuple[list[Sample], list[SampleBlock]]:
    """Whole-percent SpO2 around 96 % with a desaturation below 90 % every 1000 s."""
    rng = np.random.default_rng(1)
    t = np.arange(N, dtype=np.float64)
    phase = t % 1000  # a 9-point desaturation every 1000 s, falling and recovering over 10 s
    dip = np.clip(np.minimum(phase, 70.0 - phase) / 10.0, 0.0, 1.0)
    v = np.round(96.0 + 0.6 * rng.standard_normal(N) - 9.0 * dip)
    q = np.zeros(N, np.uint8)
    samples = [Sample(SPO2, float(a), float(a), float(b)) for a, b in zip(t, v, strict=True)]
    blocks = [
        SampleBlock(SPO2, t[i : i + BLOCK], t[i : i + BLOCK], v[i : i + BLOCK], q[i : i + BLOCK])
        for i in range(0, N, BLOCK)
    ]
    return samples, blocks


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call takes (best of three); ``fn`` builds its own fresh stage each time."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    """Print the table of BENCHMARKS.md's alarm-stage section."""
    logging.disable(logging.WARNING)  # the checkers log every alarm they raise
    samples, blocks = data()

    def windower() -> Windower:
        return Windower(window_s=30.0, hop_s=10.0, grace_s=2.0, lost_after_s=15.0, on_alarm=lambda a: None)

    stages: list[tuple[str, Callable[[], Any]]] = [
        ("windower hand-off (baseline)", windower),
        ("plausibility checker", PlausibilityChecker),
        ("limit checker", lambda: limit_checker(AlarmsSection())),
    ]
    one_at_a_time: dict[str, Callable[[Any], object]] = {
        "windower hand-off (baseline)": lambda w: [w.put(x) for x in samples],
        # As the pipeline calls it: the check, then whether the sample may reach the judgements.
        "plausibility checker": lambda c: [
            (c.check_sample(x), c.implausible(x.stream) and c.out_of_range(x.stream)) for x in samples
        ],
        "limit checker": lambda c: [c.check_sample(x) for x in samples],
    }
    in_blocks: dict[str, Callable[[Any], object]] = {
        "windower hand-off (baseline)": lambda w: [w.put_block(b) for b in blocks],
        "plausibility checker": lambda c: [c.judge_block(b) for b in blocks],
        "limit checker": lambda c: [c.check_block(b) for b in blocks],
    }
    base_s = base_b = 0.0
    print("| stage | µs/sample, one at a time | vs windower | µs/sample, blocks of 25 | vs windower |")
    print("|---|---|---|---|---|")
    for name, make in stages:

        def one(name: str = name, make: Callable[[], Any] = make) -> object:
            return one_at_a_time[name](make())

        def block(name: str = name, make: Callable[[], Any] = make) -> object:
            return in_blocks[name](make())

        s, b = timed(one) / N * 1e6, timed(block) / N * 1e6
        if not base_s:
            base_s, base_b = s, b
        print(f"| {name} | {s:.2f} | {s / base_s:.2f}x | {b:.2f} | {b / base_b:.2f}x |")


if __name__ == "__main__":
    main()
