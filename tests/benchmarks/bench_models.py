"""Per-window model cost (feature extraction + pre/post-processing + model), idle and under load.

Run: ``.venv/bin/python tests/benchmarks/bench_models.py [--windows 3000] [--load N] [--only-windows]``,
or ``--compare pump_skab --backends numpy,litert`` for one model's fp32 per-window cost on several
backends in alternating rounds over the same windows (idle, then under the load generator);
``--evict MB`` adds a phase between them in which the benchmark's own thread streams over ``MB``
megabytes before every window (outside the measured time): every window then starts with the cold
caches a busy neighbour leaves, without waiting for the scheduler to switch the thread out.

The benchmark pins itself to one CPU and measures every window at batch 1, as the pipeline scores
a subject's window when it closes, for each shipped neural model on each backend (numpy fp32,
onnxruntime, LiteRT) and precision: its own thread's CPU time (what the runtime's latency budget judges, so a
busy machine does not demote a model) and wall time.  First on an idle machine, then while a load
generator it starts itself runs ``N`` busy processes (default: one per CPU, so one of them shares
the benchmark's core), stopped by PID afterwards; the ratio loaded/idle is printed per case.  Then
batch 64, and each runtime's memory in a fresh process.

Features are computed as the windower computes them, one numpy pass over all streams of the window
(``basic_features_streams``); the same-run baseline is the per-stream function it replaced
(``basic_features_finite`` once per stream), in alternating rounds over the same windows.  As the
service does before it runs, everything built at start is frozen out of the collector's sight
(``gc.freeze``); windows during which a collection ran are counted, and the p99 without them
printed, so the tail can be told apart from the collector's share of it.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from gateway.contracts import StreamFeatures, WindowRecord
from gateway.inference.backends import litert_interpreter_class
from gateway.inference.build import default_models_dir
from gateway.inference.card import CARD_SUFFIX, load_card
from gateway.inference.runner import AnomalyModel
from gateway.pipeline.features import basic_features_finite, basic_features_streams
from gateway.sample import MDC, Stream, industrial_metric

#: The pump model's SKAB signals (SI-style units the plausibility rules know) and their levels.
PUMP = (
    ("Accelerometer1RMS", "g", 0.03),
    ("Accelerometer2RMS", "g", 0.045),
    ("Current", "A", 1.3),
    ("Pressure", "bar", 1.2),
    ("Temperature", "Cel", 72.0),
    ("Thermocouple", "Cel", 27.0),
    ("Voltage", "V", 231.0),
    ("RateRMS", "l/min", 32.0),
)
#: Vital signs of the vitals_mimic model: metric, level, 1 Hz noise (30 s gateway windows).
VITALS = (
    ("MDC_ECG_HEART_RATE", 72.0, 1.0),
    ("MDC_PULS_OXIM_SAT_O2", 97.0, 0.4),
    ("MDC_RESP_RATE", 15.0, 0.6),
    ("MDC_TEMP_BODY", 36.9, 0.02),
)
LOAD = "import numpy as np\na = np.ones(1 << 21)\nwhile True:\n    a = a * 1.0000001 + 1e-9\n"


def rss_mb() -> float:
    """Resident set size of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


@contextmanager
def load_generator(n: int) -> Iterator[list[int]]:
    """``n`` processes each streaming over a 16 MB array (CPU and memory bandwidth), stopped by PID."""
    procs = [subprocess.Popen([sys.executable, "-c", LOAD]) for _ in range(n)]
    try:
        time.sleep(1.0)  # let them reach their loops
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=10)


class Case:
    """One model on one backend and precision, with pre-generated raw windows."""

    def __init__(self, name: str, backend: str, precision: str, windows: int, seed: int) -> None:
        d = default_models_dir()
        card = load_card(d / f"{name}{CARD_SUFFIX}")
        self.label = f"{name} {backend} {precision}"
        self.model = AnomalyModel(card, d, precision=precision, backend=backend, commissioning_windows=10)
        rng = np.random.default_rng(seed)
        if name == "pump_skab":
            self.w = round(card.window_s)
            self.kind = "industrial"
            self.streams = [
                Stream("plc", "pump-0", "SN-1", industrial_metric(f"Pump1/{n}", u), "industrial", 1.0)
                for n, u, _ in PUMP
            ]
            levels = [(lvl, 0.01 * lvl) for _, _, lvl in PUMP]
        else:
            self.w = 30
            self.kind = "medical"
            self.streams = [Stream("mon", "bed-0", "SN-2", MDC[m], "medical", 1.0) for m, _, _ in VITALS]
            levels = [(lvl, noise) for _, lvl, noise in VITALS]
        self.t = np.arange(self.w, dtype=np.float64)
        self.raw = [
            [lvl + sd * rng.standard_normal(self.w) for lvl, sd in levels] for _ in range(windows + 20)
        ]
        self.k = 0
        for _ in range(20):  # commissioning (pump_skab) and warm-up
            self.window_batch(1)

    def window_batch(self, batch: int, per_stream: bool = False) -> tuple[int, int]:
        """Features and scores of ``batch`` windows: (thread CPU ns, wall ns) per window.

        ``per_stream``: the features one stream at a time (the path before the one-pass features).
        """
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        records = []
        for s in range(batch):
            raw = self.raw[(self.k + s) % len(self.raw)]
            if per_stream:
                feats = [basic_features_finite(self.t, v) for v in raw]
            else:
                feats = basic_features_streams([self.t] * len(raw), raw)
            sfs = tuple(StreamFeatures(st, self.w, 0.0, f) for st, f in zip(self.streams, feats, strict=True))
            k = self.k
            records.append(WindowRecord(f"s{s}", self.kind, k, float(k), float(k), float(self.w), sfs))
        self.model.score_batch(records)
        self.k += batch
        return (time.thread_time_ns() - c0) // batch, (time.perf_counter_ns() - w0) // batch

    def measure(
        self, windows: int, batch: int = 1, per_stream: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-window CPU and wall microseconds over ``windows`` windows."""
        got = np.array(
            [self.window_batch(batch, per_stream) for _ in range(max(1, windows // batch))], np.float64
        )
        return got[:, 0] / 1e3, got[:, 1] / 1e3


class Paths:
    """Several paths (a case, one-pass or per-stream features) in alternating rounds, and what else
    happened in each window.

    Per window: whether a collection ran, whether the thread was switched out (the scheduler gave
    the core to other work: caches come back cold, and that costs CPU time too) and whether it
    took a page fault, so the tail can be told apart from what caused it.
    """

    ROUNDS = 6

    def __init__(
        self, paths: dict[str, tuple[Case, bool]], windows: int, before: Callable[[], object] | None = None
    ) -> None:
        per = max(1, windows // self.ROUNDS)
        n = per * self.ROUNDS
        # Preallocated: per-window Python objects kept here would fill fresh memory pages that the
        # next window's own allocations then fault in, and the benchmark would measure itself.
        self.cpu = {k: np.zeros(n) for k in paths}
        self.wall = {k: np.zeros(n) for k in paths}
        self.events = {k: np.zeros((n, 3), bool) for k in paths}
        ran = [0]

        def seen(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                ran[0] += 1

        usage = functools.partial(resource.getrusage, resource.RUSAGE_THREAD)
        gc.callbacks.append(seen)
        try:
            for r in range(self.ROUNDS):
                for key, (case, per_stream) in paths.items():
                    cpu, wall, ev = self.cpu[key], self.wall[key], self.events[key]
                    for i in range(r * per, (r + 1) * per):
                        if before is not None:
                            before()
                        collections, r0 = ran[0], usage()
                        cpu[i], wall[i] = case.window_batch(1, per_stream)
                        r1 = usage()
                        ev[i, 0] = ran[0] != collections
                        ev[i, 1] = r1.ru_nvcsw + r1.ru_nivcsw != r0.ru_nvcsw + r0.ru_nivcsw
                        ev[i, 2] = r1.ru_minflt + r1.ru_majflt != r0.ru_minflt + r0.ru_majflt
        finally:
            gc.callbacks.remove(seen)

    @classmethod
    def features(cls, case: Case, windows: int) -> Paths:
        """One case with the one-pass features (key "one") and per-stream features ("per")."""
        return cls({"one": (case, False), "per": (case, True)}, windows)

    def arrays(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CPU µs, wall µs and (collected, switched out, faulted) flags per window of one path."""
        return self.cpu[key] / 1e3, self.wall[key] / 1e3, self.events[key]


def tail_row(label: str, cpu: np.ndarray, ev: np.ndarray) -> str:
    """p50 / p99, the share of windows with a collection / switch / fault, and the p99 without them."""
    quiet = ~ev.any(axis=1)
    share = " / ".join(f"{100 * ev[:, k].mean():.1f}" for k in range(3))
    rest = np.percentile(cpu[quiet] if quiet.any() else cpu, 99)
    switched = ev[:, 1]
    sw = np.percentile(cpu[switched], 99) if switched.any() else float("nan")
    return f"{label:34} {pct(cpu):>15}   {share:>35} {rest:17.1f} {sw:17.1f}"


def compare_backends(model: str, backends: list[str], windows: int, load: int, evict_mb: int = 0) -> None:
    """Per-window CPU of one model on several backends, alternating rounds over the same windows."""
    cases = {b: Case(model, b, "fp32", windows, seed=1) for b in backends}
    gc.collect()
    gc.freeze()
    head = (
        f"{'backend':34} {'p50 / p99 us':>15}   {'GC / switched / fault, % of windows':>35}"
        f" {'p99 of the others':>17} {'p99 of switched':>17}"
    )
    phases = [("idle", 0, 0)] + ([("evicted", 0, evict_mb)] if evict_mb else [])
    phases += [("loaded", load, 0)] if load else []
    for phase, n, mb in phases:
        # Streaming over more than the last-level cache, in place: what a busy neighbour's
        # time slice leaves behind, before every window.
        sweep = np.ones(mb << 17) if mb else None
        before = None if sweep is None else functools.partial(np.multiply, sweep, 1.0000001, out=sweep)
        with load_generator(n) as pids:
            print(
                f"-- {model} fp32, batch 1, per window incl. features, thread CPU; {phase}"
                f" ({len(pids)} busy processes{f', {mb} MB streamed before each window' if mb else ''}),"
                f" load average {os.getloadavg()[0]:.1f}"
            )
            paths = Paths({b: (c, False) for b, c in cases.items()}, windows, before)
        print(head)
        for b in backends:
            cpu, _, ev = paths.arrays(b)
            print(tail_row(b, cpu, ev) + f"  {cases[b].model.stats()['state']}")


def pct(a: np.ndarray) -> str:
    """``p50 / p99`` of an array in microseconds."""
    return f"{np.percentile(a, 50):6.1f} / {np.percentile(a, 99):6.1f}"


def call_only(cases: list[Case], n: int = 20_000) -> None:
    """The model call alone at batch 1, thread CPU: onnxruntime's feed-dict ``run`` (the path
    before input/output binding) against the backend's bound path, and LiteRT; interleaved."""
    print("model call alone, batch 1, p50 / p99 us (thread CPU; the same row each time)")
    for c in cases:
        backend = c.model.backend
        x = np.zeros((1, c.model.card.n_inputs), np.float32)
        paths: dict[str, Callable[[], object]] = {"backend.run": functools.partial(backend.run, x)}
        if backend.name == "onnxruntime":
            # The unbound path, for comparison: the backend's own session, a feed dict per call.
            sess: Any = backend._sess  # type: ignore[attr-defined]
            feed, out = {c.model.card.input_name: x}, [c.model.card.output_name]
            paths["session.run(feed dict)"] = functools.partial(sess.run, out, feed)
        got: dict[str, list[int]] = {k: [] for k in paths}
        for _ in range(4):
            for k, f in paths.items():
                for _ in range(n // 4):
                    t = time.thread_time_ns()
                    f()
                    got[k].append(time.thread_time_ns() - t)
        print(f"{c.label:34} " + " | ".join(f"{k} {pct(np.array(v) / 1e3)}" for k, v in got.items()))


def runtime_growth(backends: list[str]) -> dict[str, float]:
    """MB a fresh process grows by opening vitals_mimic fp32 on each backend and running it once."""
    from models.recipes.dense import process_growth_mb  # noqa: PLC0415 - the training extra's helper

    card = default_models_dir() / f"vitals_mimic{CARD_SUFFIX}"
    return {b: process_growth_mb(card, b) for b in backends}


def main(argv: list[str] | None = None) -> int:
    """Print the idle/loaded table, batch-64 figures and memory."""
    ap = argparse.ArgumentParser(prog="bench_models", description=__doc__)
    ap.add_argument("--windows", type=int, default=3000, help="windows per case and phase")
    ap.add_argument(
        "--load", type=int, default=os.cpu_count() or 2, help="busy processes in the loaded phase"
    )
    ap.add_argument("--cpu", type=int, default=0, help="the CPU to pin the benchmark to")
    ap.add_argument("--no-load", action="store_true", help="skip the loaded phase")
    ap.add_argument(
        "--only-windows", action="store_true", help="the per-window table only (no call, batch-64, memory)"
    )
    ap.add_argument(
        "--compare",
        metavar="MODEL",
        help="only: MODEL fp32 on --backends in alternating rounds (idle, then under --load)",
    )
    ap.add_argument(
        "--backends", default="numpy,litert", help="backends for --compare (default numpy,litert)"
    )
    ap.add_argument(
        "--evict",
        type=int,
        default=0,
        metavar="MB",
        help="--compare: a phase streaming over MB megabytes before every window (cold caches)",
    )
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    print(
        f"pinned to CPU {args.cpu} of {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}; RSS {rss_mb():.1f} MB"
    )
    backends = ["numpy", "onnxruntime"] + (["litert"] if litert_interpreter_class() is not None else [])
    if args.compare:
        compare_backends(
            args.compare, args.backends.split(","), args.windows, 0 if args.no_load else args.load, args.evict
        )
        return 0
    cases = [
        Case(name, b, p, args.windows, seed=i)
        for i, (name, b, p) in enumerate(
            (n, b, p)
            for n in ("pump_skab", "vitals_mimic")
            for b in backends
            for p in ("fp32", "int8")
            if b != "numpy" or p == "fp32"  # numpy serves fp32 only
        )
    ]
    print(f"RSS with {len(cases)} models loaded: {rss_mb():.1f} MB")
    gc.collect()
    gc.freeze()  # as gateway.runtime does once everything is built
    phases = {"idle": {c.label: Paths.features(c, args.windows) for c in cases}}
    if not args.no_load:
        with load_generator(args.load) as pids:
            print(f"load generator: {len(pids)} busy processes (PIDs {', '.join(map(str, pids))})")
            phases["loaded"] = {c.label: Paths.features(c, args.windows) for c in cases}
        print(f"load generator stopped; load average {os.getloadavg()[0]:.1f}")
    print()
    print(
        "batch 1, per window incl. features, thread CPU p50 / p99 us: one pass (the windower's path now) "
        "against per stream (before), alternating rounds; p99 ratio = per stream / one pass"
    )
    for phase, paths in phases.items():
        print(f"-- {phase}")
        print(
            f"{'case':34} {'one pass':>15} {'per stream':>15} {'p99 ratio':>9}   {'wall, one pass':>15}"
            f"   {'GC / switched / fault, % of windows':>35} {'p99 of the others':>17}"
        )
        for c in cases:
            cpu, wall, ev = paths[c.label].arrays("one")
            ref, _, _ = paths[c.label].arrays("per")
            ratio = np.percentile(ref, 99) / np.percentile(cpu, 99)
            quiet = ~ev.any(axis=1)
            share = " / ".join(f"{100 * ev[:, k].mean():.1f}" for k in range(3))
            print(
                f"{c.label:34} {pct(cpu):>15} {pct(ref):>15} {ratio:9.2f}   {pct(wall):>15}"
                f"   {share:>35} {np.percentile(cpu[quiet] if quiet.any() else cpu, 99):17.1f}"
                f"  {c.model.stats()['state']}"
            )
    if args.only_windows:
        return 0
    print()
    call_only(cases)
    print()
    print("batch 64 (idle), per window, p50 / p99 us (CPU)")
    for c in cases:
        cpu, _ = c.measure(64 * 100, batch=64)
        print(f"{c.label:34} {pct(cpu):>15}")
    growth = runtime_growth(backends)
    print()
    print(
        "process growth loading the runtime + vitals_mimic fp32 and running it once (fresh process): "
        + ", ".join(f"{k} {v:.1f} MB" for k, v in growth.items())
    )
    print(f"RSS at end: {rss_mb():.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
