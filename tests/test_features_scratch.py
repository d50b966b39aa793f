"""A window's features in numpy reuse per-thread work arrays: no fresh pages per window, the same bits.

(The numpy pass serves where the compiled pass was not built or declines a window; the compiled
pass keeps no temporaries: tests/test_features_compiled.py.)

Above the mmap threshold the service pins (``gateway.memory``) every temporary array is mapped and
faulted in afresh; the one-pass features keep three work arrays per thread instead.  The results
must be those of the fresh-array formula to the bit, whatever an earlier (larger or smaller)
window left in the work arrays, and threads must not share them.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import threading

import numpy as np
import numpy.typing as npt

from gateway.pipeline import features

F8 = npt.NDArray[np.float64]


def _fresh(ts: list[F8], vs: list[F8]) -> list[tuple[float, ...]]:
    """The previous formula, with a fresh array for every step: mean, std, min, max, slope sums."""
    counts = tuple(map(len, vs))
    s = len(counts)
    starts, seg, n = features._layout(counts)
    starts = starts[: 2 * s]  # values' and times' segments (a third block is the cross products')
    x = np.concatenate((*vs, *ts))
    nv = x.size // 2
    xv = x[:nv]
    mean = np.add.reduceat(x, starts)
    mean /= n
    x -= mean[seg]
    sq = np.add.reduceat(x * x, starts)
    cross = np.add.reduceat(xv * x[nv:], starts[:s])
    return [
        (m, ss, den, num)
        for m, ss, den, num in zip(
            mean[:s].tolist(), sq[:s].tolist(), sq[s:].tolist(), cross.tolist(), strict=True
        )
    ]


def _window(rng: np.random.Generator, streams: int, n: int) -> tuple[list[F8], list[F8]]:
    ts = [1e5 + np.sort(rng.uniform(0.0, n / 40.0, n + int(rng.integers(0, 3)))) for _ in range(streams)]
    vs = [rng.uniform(-1e3, 1e3) + 10.0 ** rng.uniform(-4, 2) * rng.standard_normal(t.size) for t in ts]
    return ts, vs


def _bits(ts: list[F8], vs: list[F8]) -> list[tuple[float, ...]]:
    """Mean, std, min, max and slope of each stream, as the numpy pass gives them (the work arrays')."""
    got = features._numpy_pass(ts, vs, tuple(map(len, vs)))
    return [(f["mean"], f["std"], f["min"], f["max"], f.get("slope", 0.0)) for f in got]


def _expected(ts: list[F8], vs: list[F8]) -> list[tuple[float, ...]]:
    out: list[tuple[float, ...]] = []
    for (m, ss, den, num), v in zip(_fresh(ts, vs), vs, strict=True):
        lo, hi = float(v.min()), float(v.max())
        sd, slope = (0.0, 0.0) if lo == hi else (math.sqrt(ss / v.size), num / den)
        out.append((m, sd, lo, hi, slope))
    return out


def test_work_arrays_give_the_fresh_formula_to_the_bit_whatever_came_before() -> None:
    rng = np.random.default_rng(20261204)
    # Sizes up and down: a smaller window after a larger one reads a prefix of stale contents.
    for n in (20, 4000, 30, 1200, 7, 5000, 300, 2, 2000):
        for streams in (2, 3, 8):
            ts, vs = _window(rng, streams, n)
            assert _bits(ts, vs) == _expected(ts, vs), (streams, n)


def test_threads_keep_their_own_work_arrays() -> None:
    rng = np.random.default_rng(7)
    windows = [_window(rng, 8, int(n)) for n in rng.integers(10, 3000, 24)]
    want = [_expected(ts, vs) for ts, vs in windows]
    wrong: list[int] = []

    def work(offset: int) -> None:
        for r in range(200):
            k = (offset + r) % len(windows)
            if _bits(*windows[k]) != want[k]:
                wrong.append(k)

    threads = [threading.Thread(target=work, args=(i * 5,), name=f"features-{i}") for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads)
    assert wrong == []


def test_windows_above_the_mmap_threshold_fault_no_fresh_pages() -> None:
    # A process of its own: the threshold is pinned for the whole process, as the service does.
    script = textwrap.dedent(
        """
        import resource
        import numpy as np
        from gateway.memory import fix_mmap_threshold
        from gateway.pipeline.features import _numpy_pass
        assert fix_mmap_threshold()
        t = 1e5 + 0.025 * np.arange(2000.0)
        vs = [np.sin(t * k) for k in range(1, 9)]  # 8 streams x 2,000: 256 KB concatenated
        _numpy_pass([t] * 8, vs, (2000,) * 8)  # the first window grows the work arrays
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(20):
            _numpy_pass([t] * 8, vs, (2000,) * 8)
        print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    faults = int(done.stdout.strip())
    # Before: every window mapped its temporaries afresh, about 300 faults per window here.
    assert faults < 20, f"{faults} page faults in 20 windows"
