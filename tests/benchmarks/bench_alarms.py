"""Per-sample cost of the alarm stages on the hand-off path, against the windower's own hand-off.

The same 200,000 SpO2 samples (a stream with a plausibility rule and default limits, so both
checkers do their full work) go, one at a time and in blocks of 25, through: the windower
(baseline), the plausibility checker (with its verdict on each sample, as the pipeline asks it),
and the limit checker.

With ``--before REV`` the plausibility and limit checkers of REV (``git show``) and today's take
the same samples in alternating rounds of one process instead (the ratios hold under load): the
median per-sample cost of each, and the median of the rounds' after/before ratios, with no sample
flagged and with ``--flagged`` of them flagged as artifacts by the device.

Run: ``python tests/benchmarks/bench_alarms.py [--before REV --rounds 15 --flagged 0.05 --samples 40000]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from revisions import module_at

from gateway.alarms.config import AlarmsSection, limit_checker, merged_limits
from gateway.inference.plausibility import PlausibilityChecker
from gateway.pipeline.windows import Windower
from gateway.sample import MDC, Quality, Sample, SampleBlock, Stream

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


def flagged(samples: list[Sample], share: float) -> tuple[list[Sample], list[SampleBlock]]:
    """The same samples with ``share`` of them (at random) flagged as artifacts, and their blocks."""
    art = np.random.default_rng(2).random(len(samples)) < share
    q = np.where(art, np.uint8(Quality.ARTIFACT), np.uint8(0))
    out = [
        Sample(x.stream, x.t_mono, x.t_wall, x.value, Quality(int(f)))
        for x, f in zip(samples, q, strict=True)
    ]
    t = np.array([x.t_mono for x in samples])
    v = np.array([x.value for x in samples])
    sl = [slice(i, i + BLOCK) for i in range(0, len(samples), BLOCK)]
    return out, [SampleBlock(SPO2, t[s], t[s], v[s], q[s]) for s in sl]


def before_after(rev: str, rounds: int, share: float, n: int) -> None:
    """Print REV's and today's checkers' per-sample cost, alternated, and the after/before ratio."""
    old_plaus = module_at(rev, "gateway/inference/plausibility.py").PlausibilityChecker
    old_limits = module_at(rev, "gateway/alarms/limits.py").LimitChecker
    general, subjects = merged_limits(AlarmsSection())

    def rules(table: dict[str, Any]) -> dict[str, Any]:
        return {m: (s.rule() if s.enabled else None) for m, s in table.items()}

    def limits(cls: Any) -> Any:
        return cls(rules(general), {k: rules(t) for k, t in subjects.items()}, lost_after_s=15.0)

    ss, bb = data()
    ss, bb = ss[:n], bb[: n // BLOCK]
    sets = {"no flag": (ss, bb), f"{share:.0%} flagged": flagged(ss, share)}
    checkers: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "plausibility": (old_plaus, PlausibilityChecker),
        "limits": (lambda: limits(old_limits), lambda: limit_checker(AlarmsSection())),
    }

    def cost(c: Any, way: str, ss: list[Sample], bb: list[SampleBlock]) -> float:
        t0 = time.perf_counter()
        if way == "blocks of 25":
            for b in bb:
                c.check_block(b)
        elif isinstance(c, old_plaus | PlausibilityChecker):  # with its verdict, as the pipeline asks
            for x in ss:
                c.check_sample(x)
                _ = c.implausible(x.stream) and c.out_of_range(x.stream)
        else:
            for x in ss:
                c.check_sample(x)
        return (time.perf_counter() - t0) / len(ss) * 1e6

    print(f"before {rev}, after today's tree; {n} samples, median of {rounds} alternating rounds")
    print("| stage | samples | µs/sample before | µs/sample after | after/before |")
    print("|---|---|---:|---:|---:|")
    for name, (make_old, make_new) in checkers.items():
        for way in ("one at a time", "blocks of 25"):
            for label, (s_, b_) in sets.items():
                b: list[float] = []
                a: list[float] = []
                for _ in range(rounds):
                    b.append(cost(make_old(), way, s_, b_))
                    a.append(cost(make_new(), way, s_, b_))
                ratio = statistics.median(x / y for x, y in zip(a, b, strict=True))
                before, after = statistics.median(b), statistics.median(a)
                print(f"| {name}, {way} | {label} | {before:.2f} | {after:.2f} | {ratio:.2f}x |")


def main() -> None:
    """Print the table of BENCHMARKS.md's alarm-stage section (or, with --before, the ratios to a revision)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="revision whose plausibility and limit checkers to compare with today's")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--flagged", type=float, default=0.05, help="share of samples flagged, with --before")
    ap.add_argument("--samples", type=int, default=40_000, help="samples per round, with --before")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the checkers log every alarm they raise
    if args.before:
        before_after(args.before, args.rounds, args.flagged, args.samples)
        return
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
