"""Per-window model cost (feature extraction + pre/post-processing + model), idle and under load.

Run: ``.venv/bin/python tests/benchmarks/bench_models.py [--windows 3000] [--load N] [--only-windows]``,
or ``--compare pump_skab --backends numpy,litert`` for one model's fp32 per-window cost on several
backends in alternating rounds over the same windows (idle, then under the load generator);
``--evict MB`` adds a phase between them in which the benchmark's own thread streams over ``MB``
megabytes before every window (outside the measured time): every window then starts with the cold
caches a busy neighbour leaves, without waiting for the scheduler to switch the thread out.
``--compare MODEL --anatomy`` prints, per phase, what the slowest 1 % of windows are made of: each
stage's thread CPU, collections, switches inside and before a window, page faults.
``--compare novelty --backends numpy`` runs the novelty detector at fusion_skab's setting on the
pump's streams (it has no backend; the name only labels the case); with ``--fusion-member`` as
that fusion's member.
``--compare MODEL --baseline REV`` runs the same cases on the ``gateway`` of git revision ``REV`` too
(imported in this process as ``gateway_base``, its compiled window paths built where it has
them), in the same alternating rounds: a same-run baseline that the machine's changing load hits
alike.
``--features-sizes 20,1200`` measures the one-pass features of 8 streams x N samples per window
with glibc's mmap threshold pinned as ``edgetwin run`` pins it (CPU and page faults per window).

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
import atexit
import functools
import gc
import importlib
import io
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from gateway.contracts import StreamFeatures, WindowRecord
from gateway.inference.backends import litert_interpreter_class
from gateway.inference.build import default_models_dir
from gateway.inference.card import CARD_SUFFIX, load_card
from gateway.inference.fusion import FUSION_SUFFIX, load_fusion
from gateway.inference.novelty import NoveltyModel, NoveltyUse
from gateway.inference.runner import AnomalyModel
from gateway.memory import fix_mmap_threshold
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
#: Windows the novelty detector commissions on (``--compare novelty``).
NOVELTY_COMMISSION = 60
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


#: What a case is built from: this checkout's gateway, or a revision's (:func:`baseline_modules`).
HERE = SimpleNamespace(
    AnomalyModel=AnomalyModel,
    NoveltyModel=NoveltyModel,
    NoveltyUse=NoveltyUse,
    load_card=load_card,
    Stream=Stream,
    MDC=MDC,
    industrial_metric=industrial_metric,
    StreamFeatures=StreamFeatures,
    WindowRecord=WindowRecord,
    basic_features_streams=basic_features_streams,
    basic_features_finite=basic_features_finite,
)


def _build_window_module(package: Path) -> None:
    """The revision's compiled window paths (``_window.c``), where it has them, built into its package.

    With the flags ``pyproject.toml`` gives the build; without it the revision's numpy paths serve,
    as they would on an install without a compiler.
    """
    source = package / "_window.c"
    if not source.exists():
        return
    target = package / f"_window{sysconfig.get_config_var('EXT_SUFFIX')}"
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    # As setuptools compiles it: the interpreter's flags, then the project's (which win).
    flags = [*(sysconfig.get_config_var("CFLAGS") or "").split(), "-shared", "-fPIC"]
    flags += ["-O2", "-ffp-contract=off", "-fno-fast-math"]
    include = f"-I{sysconfig.get_paths()['include']}"
    subprocess.run([*cc, *flags, include, str(source), "-o", str(target), "-lm"], check=True)


def baseline_modules(rev: str) -> SimpleNamespace:
    """The ``gateway`` of git revision ``rev``, imported beside this one as ``gateway_base``.

    Its files come from ``git archive`` into a temporary folder (removed at exit), with its own
    imports renamed; models are read from this checkout's ``models/`` folder.
    """
    repo = Path(__file__).resolve().parents[2]
    tar = subprocess.run(["git", "-C", str(repo), "archive", rev, "gateway"], capture_output=True, check=True)
    root = Path(tempfile.mkdtemp(prefix="bench-models-base-"))
    atexit.register(shutil.rmtree, root, True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as tf:
        tf.extractall(root, filter="data")
    (root / "gateway").rename(root / "gateway_base")
    own = re.compile(r"^(\s*)(from|import) gateway\b", re.MULTILINE)
    for f in (root / "gateway_base").rglob("*.py"):
        text = own.sub(r"\1\2 gateway_base", f.read_text())
        f.write_text(text.replace('"gateway._window"', '"gateway_base._window"'))
    _build_window_module(root / "gateway_base")
    sys.path.insert(0, str(root))
    mod = importlib.import_module
    contracts, sample = mod("gateway_base.contracts"), mod("gateway_base.sample")
    features = mod("gateway_base.pipeline.features")
    novelty = mod("gateway_base.inference.novelty")
    return SimpleNamespace(
        AnomalyModel=mod("gateway_base.inference.runner").AnomalyModel,
        NoveltyModel=novelty.NoveltyModel,
        NoveltyUse=novelty.NoveltyUse,
        load_card=mod("gateway_base.inference.card").load_card,
        Stream=sample.Stream,
        MDC=sample.MDC,
        industrial_metric=sample.industrial_metric,
        StreamFeatures=contracts.StreamFeatures,
        WindowRecord=contracts.WindowRecord,
        basic_features_streams=features.basic_features_streams,
        basic_features_finite=features.basic_features_finite,
    )


class Case:
    """One model on one backend and precision, with pre-generated raw windows."""

    def __init__(
        self, name: str, backend: str, precision: str, windows: int, seed: int, code: SimpleNamespace = HERE
    ) -> None:
        d = default_models_dir()
        self.code = code
        self.label = f"{name} {backend} {precision}"
        settle = 20
        if name == "novelty":
            # The detector at fusion_skab's setting on the pump's 8 streams (14 inputs), 5 s windows.
            fusion = load_fusion(d / f"fusion_skab{FUSION_SUFFIX}")
            member = next(m for m in fusion.members if m.model == "novelty")
            settings = {"commissioning_s": float(NOVELTY_COMMISSION), "window_s": member.window_s}
            use = code.NoveltyUse.model_validate({**settings, **member.settings}, strict=False)
            self.model: Any = code.NoveltyModel(use, hop_s=1.0)
            self.label = f"{name} ({backend} unused) {precision}"
            settle += NOVELTY_COMMISSION + 6  # commissioning, then the smoothing's settling windows
        else:
            card = code.load_card(d / f"{name}{CARD_SUFFIX}")
            # the baseline's AnomalyModel has this one's shape
            self.model = code.AnomalyModel(
                card, d, precision=precision, backend=backend, commissioning_windows=10
            )
        rng = np.random.default_rng(seed)
        if name in ("pump_skab", "novelty"):
            self.w = round(use.window_s) if name == "novelty" else round(card.window_s)
            self.kind = "industrial"
            self.streams = [
                code.Stream(
                    "plc", "pump-0", "SN-1", code.industrial_metric(f"Pump1/{n}", u), "industrial", 1.0
                )
                for n, u, _ in PUMP
            ]
            levels = [(lvl, 0.01 * lvl) for _, _, lvl in PUMP]
        else:
            self.w = 30
            self.kind = "medical"
            self.streams = [
                code.Stream("mon", "bed-0", "SN-2", code.MDC[m], "medical", 1.0) for m, _, _ in VITALS
            ]
            levels = [(lvl, noise) for _, lvl, noise in VITALS]
        self.t = np.arange(self.w, dtype=np.float64)
        self.raw = [
            [lvl + sd * rng.standard_normal(self.w) for lvl, sd in levels] for _ in range(windows + settle)
        ]
        self.k = 0
        for _ in range(settle):  # commissioning and warm-up
            self.window_batch(1)

    def state(self) -> str:
        """The model's health state (the novelty detector's: its subject's)."""
        if isinstance(self.model, self.code.NoveltyModel):
            return str(self.model.subject_states().get("s0", ""))
        return str(self.model.stats()["state"])

    def window_batch(self, batch: int, per_stream: bool = False) -> tuple[int, int]:
        """Features and scores of ``batch`` windows: (thread CPU ns, wall ns) per window.

        ``per_stream``: the features one stream at a time (the path before the one-pass features).
        """
        code = self.code
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        records = []
        for s in range(batch):
            raw = self.raw[(self.k + s) % len(self.raw)]
            if per_stream:
                feats = [code.basic_features_finite(self.t, v) for v in raw]
            else:
                feats = code.basic_features_streams([self.t] * len(raw), raw)
            sfs = tuple(
                code.StreamFeatures(st, self.w, 0.0, f) for st, f in zip(self.streams, feats, strict=True)
            )
            k = self.k
            records.append(code.WindowRecord(f"s{s}", self.kind, k, float(k), float(k), float(self.w), sfs))
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


def phases(load: int, evict_mb: int) -> Iterator[tuple[str, int, int, Callable[[], object] | None]]:
    """(name, busy processes, MB streamed, what runs before each window): idle, evicted, loaded."""
    yield "idle", 0, 0, None
    if evict_mb:
        # Streaming over more than the last-level cache, in place: what a busy neighbour's
        # time slice leaves behind, before every window.
        sweep = np.ones(evict_mb << 17)
        yield "evicted", 0, evict_mb, functools.partial(np.multiply, sweep, 1.0000001, out=sweep)
    if load:
        yield "loaded", load, 0, None


def compare_backends(
    model: str,
    backends: list[str],
    windows: int,
    load: int,
    evict_mb: int = 0,
    member: bool = False,
    baseline: str | None = None,
) -> None:
    """Per-window CPU of one model on several backends, alternating rounds over the same windows.

    ``member``: the model as a fusion member (``explain_all``), every served window explained.
    ``baseline``: each backend also on the ``gateway`` of that git revision (``<backend>@<rev>``).
    """
    cases = {b: Case(model, b, "fp32", windows, seed=1) for b in backends}
    if baseline:
        base = baseline_modules(baseline)
        cases = {
            key: case
            for b in backends
            for key, case in (
                (f"{b}@{baseline}", Case(model, b, "fp32", windows, seed=1, code=base)),
                (b, cases[b]),
            )
        }
    for c in cases.values():
        c.model.explain_all = member
    gc.collect()
    gc.freeze()
    head = (
        f"{'backend':34} {'p50 / p99 us':>15}   {'GC / switched / fault, % of windows':>35}"
        f" {'p99 of the others':>17} {'p99 of switched':>17}"
    )
    for phase, n, mb, before in phases(load, evict_mb):
        with load_generator(n) as pids:
            print(
                f"-- {model} fp32, batch 1, per window incl. features, thread CPU; {phase}"
                f" ({len(pids)} busy processes{f', {mb} MB streamed before each window' if mb else ''}),"
                f" load average {os.getloadavg()[0]:.1f}"
            )
            paths = Paths({b: (c, False) for b, c in cases.items()}, windows, before)
        print(head)
        for b in cases:
            cpu, _, ev = paths.arrays(b)
            print(tail_row(b, cpu, ev) + f"  {cases[b].state()}")
        for b, c in cases.items():
            if hasattr(c.model, "explained"):  # the novelty detector counts the windows it explained
                print(f"{b}: {c.model.explained} of {c.k} windows explained so far")
        if baseline:
            for b in backends:
                new, old = paths.arrays(b)[0], paths.arrays(f"{b}@{baseline}")[0]
                print(
                    f"{b}: p50 / p99 ratio, this checkout against {baseline}:"
                    f" {np.percentile(new, 50) / np.percentile(old, 50):.2f} / {np.percentile(new, 99) / np.percentile(old, 99):.2f}"
                )


class _TimedBackend:
    """The model's backend, with the thread CPU time at entry to and exit from each ``run``."""

    def __init__(self, inner: Any, marks: list[int]) -> None:
        self.name, self.precision = inner.name, inner.precision
        self._run, self._marks = inner.run, marks

    def run(self, x: Any) -> Any:
        """The inner backend's scores, between two time marks."""
        m = self._marks
        m[0] = time.thread_time_ns()
        y = self._run(x)
        m[1] = time.thread_time_ns()
        return y


#: Per-window columns of the anatomy (thread CPU ns, counts).
STAGES = ("features", "records", "scale", "model", "results")
ANATOMY_COLUMNS = (*STAGES, "total", "gc_gen", "gc_ns", "switched_in", "switched_before", "faults")


def anatomy(case: Case, windows: int, before: Callable[[], object] | None = None) -> np.ndarray:
    """Per window: thread CPU of each stage, the collector's generation and time, switches, faults.

    Stages: the one-pass features, building the records, ``score_batch`` up to the model call
    (inputs, plausibility, normalisation), the model call, and the rest of ``score_batch``
    (decisions, explanation, results, baseline).  ``switched_before``: the thread was switched
    out after the previous window ended and before this one began (it starts cold).  The marks
    cost about 1 µs of the total.
    """
    out = np.zeros((windows, len(ANATOMY_COLUMNS)), np.int64)
    marks = [0, 0]
    inner = case.model.backend
    case.model.backend = _TimedBackend(inner, marks)  # a Backend by shape (name, precision, run)
    gc_at = [-1, 0, 0]  # generation, start, total ns in this window

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_at[0], gc_at[1] = max(gc_at[0], info["generation"]), time.thread_time_ns()
        else:
            gc_at[2] += time.thread_time_ns() - gc_at[1]

    usage = functools.partial(resource.getrusage, resource.RUSAGE_THREAD)
    tt = time.thread_time_ns
    gc.callbacks.append(seen)
    last = usage()
    try:
        for i in range(windows):
            if before is not None:
                before()
            raw = case.raw[case.k % len(case.raw)]
            k = case.k
            gc_at[0], gc_at[2] = -1, 0
            r0 = usage()
            t0 = tt()
            feats = basic_features_streams([case.t] * len(raw), raw)
            t1 = tt()
            sfs = tuple(StreamFeatures(st, case.w, 0.0, f) for st, f in zip(case.streams, feats, strict=True))
            rec = WindowRecord("s0", case.kind, k, float(k), float(k), float(case.w), sfs)
            t2 = tt()
            marks[0] = marks[1] = t2
            case.model.score_batch([rec])
            t3 = tt()
            r1 = usage()
            case.k += 1
            row = out[i]
            row[0], row[1], row[2], row[3], row[4] = (
                t1 - t0,
                t2 - t1,
                marks[0] - t2,
                marks[1] - marks[0],
                t3 - marks[1],
            )
            row[5], row[6], row[7] = t3 - t0, gc_at[0], gc_at[2]
            row[8] = r1.ru_nvcsw + r1.ru_nivcsw - r0.ru_nvcsw - r0.ru_nivcsw
            row[9] = r0.ru_nvcsw + r0.ru_nivcsw - last.ru_nvcsw - last.ru_nivcsw
            row[10] = r1.ru_minflt + r1.ru_majflt - r0.ru_minflt - r0.ru_majflt
            last = r1
    finally:
        gc.callbacks.remove(seen)
        case.model.backend = inner
    return out


def anatomy_report(label: str, a: np.ndarray) -> None:
    """What the slowest 1 % of windows are made of, against the median band and by disturbance."""
    us = a[:, :6] / 1e3
    total = us[:, 5]
    p50, p99 = np.percentile(total, [50, 99])
    tail = total >= p99
    mid = (total >= np.percentile(total, 25)) & (total <= np.percentile(total, 75))
    gc_ran, sw_in, sw_before, fault = a[:, 6] >= 0, a[:, 8] > 0, a[:, 9] > 0, a[:, 10] > 0
    calm = ~(gc_ran | sw_in | sw_before | fault)
    print(f"{label}: p50 / p99 {p50:.1f} / {p99:.1f} us over {len(a)} windows")
    print(f"  {'windows':22} {'n':>6} " + " ".join(f"{s:>9}" for s in (*STAGES, "total")) + "  (mean us)")
    for name, sel in (("median band (p25-75)", mid), ("slowest 1 %", tail)):
        print(f"  {name:22} {int(sel.sum()):6d} " + " ".join(f"{v:9.1f}" for v in us[sel].mean(axis=0)))
    print(f"  {'kind of window':34} {'% of all':>8} {'% of slowest 1 %':>17} {'p50':>7} {'p99':>7}")
    kinds = (
        ("undisturbed", calm),
        ("switched out before it", sw_before & ~sw_in),
        ("switched out inside it", sw_in),
        ("collection inside it", gc_ran),
        ("page fault inside it", fault),
    )
    for name, sel in kinds:
        if sel.any():
            q50, q99 = np.percentile(total[sel], [50, 99])
            print(
                f"  {name:34} {100 * sel.mean():8.2f} {100 * (sel & tail).sum() / max(1, tail.sum()):17.1f}"
                f" {q50:7.1f} {q99:7.1f}"
            )
    if gc_ran.any():
        gens = np.bincount(a[gc_ran, 6], minlength=3)
        print(f"  collections by generation 0/1/2: {gens.tolist()}, mean {a[gc_ran, 7].mean() / 1e3:.1f} us")


def anatomy_phases(model: str, windows: int, load: int, evict_mb: int) -> None:
    """The anatomy of one model's windows idle, with evicted caches and under the load generator."""
    case = Case(model, "card", "fp32", windows, seed=1)
    gc.collect()
    gc.freeze()
    for phase, n, mb, before in phases(load, evict_mb):
        with load_generator(n) as pids:
            got = anatomy(case, windows, before)
            avg = os.getloadavg()[0]
        anatomy_report(
            f"-- {model} on {case.model.backend.name}, {phase} ({len(pids)} busy processes"
            f"{f', {mb} MB streamed before each window' if mb else ''}; load average {avg:.1f})",
            got,
        )


def features_sizes(sizes: list[int], streams: int = 8, windows: int = 3000) -> None:
    """One-pass features of ``streams`` x N samples per window: thread CPU and page faults per window.

    With the mmap threshold pinned as ``edgetwin`` pins it at start (``gateway.memory``), so
    temporaries above 128 KiB are mapped afresh in every window unless the features reuse memory.
    """
    print(f"mmap threshold pinned as the service does: {fix_mmap_threshold()}")
    print(f"{'window':>18} {'p50 / p99 us':>15} {'faults per window':>18}")
    rng = np.random.default_rng(1)
    usage = functools.partial(resource.getrusage, resource.RUSAGE_THREAD)
    for n in sizes:
        t = 1e5 + 0.025 * np.arange(n, dtype=np.float64)  # 40 Hz on a monotonic clock
        raws = [[rng.standard_normal(n) for _ in range(streams)] for _ in range(16)]
        cpu, faults = np.zeros(windows), np.zeros(windows)
        for i in range(windows):
            raw = raws[i % len(raws)]
            r0, c0 = usage(), time.thread_time_ns()
            basic_features_streams([t] * streams, raw)
            c1, r1 = time.thread_time_ns(), usage()
            cpu[i], faults[i] = (c1 - c0) / 1e3, r1.ru_minflt - r0.ru_minflt
        print(f"{f'{streams} x {n}':>18} {pct(cpu):>15} {faults.mean():18.1f}")


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
            sess: Any = backend._sess
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
    ap.add_argument(
        "--anatomy",
        action="store_true",
        help="--compare: per window, which stage the time went to and what disturbed the slowest",
    )
    ap.add_argument(
        "--features-sizes",
        metavar="N,N,...",
        help="only: one-pass features of 8 streams x N samples per window, CPU and page faults",
    )
    ap.add_argument(
        "--baseline",
        metavar="REV",
        help="--compare: the same cases on the gateway of git revision REV too, alternated in this process",
    )
    ap.add_argument(
        "--fusion-member",
        action="store_true",
        help="--compare: the model as a member of a fusion (explain_all)",
    )
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    print(
        f"pinned to CPU {args.cpu} of {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}; RSS {rss_mb():.1f} MB"
    )
    backends = ["numpy", "onnxruntime"] + (["litert"] if litert_interpreter_class() is not None else [])
    if args.features_sizes:
        features_sizes([int(n) for n in args.features_sizes.split(",")])
        return 0
    if args.compare and args.anatomy:
        anatomy_phases(args.compare, args.windows, 0 if args.no_load else args.load, args.evict)
        return 0
    if args.compare:
        compare_backends(
            args.compare,
            args.backends.split(","),
            args.windows,
            0 if args.no_load else args.load,
            args.evict,
            args.fusion_member,
            args.baseline,
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
