"""Per-sample CPU cost of the estimation stage, against the windower's on the same samples.

Two HR streams of one subject (1 Hz ECG heart rate, 1 Hz oximeter pulse rate) feed one
``[[estimators.fusion]]`` estimator; a third subject's stream feeds none (its cost is the
routing check alone).  The same samples go through ``Windower.put`` (the pipeline's existing
per-sample path) in the same run, as the baseline.  Estimate records are built (the stage's
emit callback collects them) but not encoded; a battery estimator is timed the same way on
voltage/current pairs, and a remaining-useful-life estimator (``[[estimators.rul]]``, the shipped
C-MAPSS model) on a simulated engine's fourteen sensors, one sample each per cycle (so a cycle,
with its model call, costs fourteen samples' worth).

``--rul-backends`` times the RUL model alone on each runtime its card lists (numpy, LiteRT,
onnxruntime; one cycle's row a call, the runtimes taking turns in rounds so they share the load)
and measures each one's process growth in a fresh interpreter.

Run: ``.venv/bin/python tests/benchmarks/bench_estimation.py [--n 200000] [--rul-backends]``
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from drivers.sim.protocol import make_generator
from gateway.contracts import Estimate
from gateway.estimation import Estimation, EstimatorsSection
from gateway.pipeline.windows import Windower
from gateway.sample import MDC, Sample, Stream, industrial_metric

WALL = 1.7e9


def samples(n: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(fused HR samples, samples of an unconfigured subject, battery samples), ``n`` each."""
    rng = np.random.default_rng(1)
    ecg = Stream("strap", "bed1", "dev1", MDC["MDC_ECG_HEART_RATE"], rate_hz=1.0)
    oxi = Stream("oxi", "bed1", "dev2", MDC["MDC_PULS_OXIM_PULS_RATE"], rate_hz=1.0)
    other = Stream("oxi", "bed2", "dev3", MDC["MDC_PULS_OXIM_PULS_RATE"], rate_hz=1.0)
    volt = Stream("plc", "m1", "plc1", industrial_metric("Pack/V", "V"), "industrial", rate_hz=1.0)
    amps = Stream("plc", "m1", "plc1", industrial_metric("Pack/I", "A"), "industrial", rate_hz=1.0)
    hr = 70.0 + rng.normal(0.0, 2.0, n)
    fused = [Sample(ecg if i % 2 == 0 else oxi, i / 2, WALL + i / 2, float(hr[i])) for i in range(n)]
    rest = [Sample(other, i / 2, WALL + i / 2, float(hr[i])) for i in range(n)]
    battery = [
        Sample(amps, i / 2, WALL + i / 2, 2.0)
        if i % 2 == 0
        else Sample(volt, i / 2, WALL + i / 2, 3.7 - 1e-5 * i)
        for i in range(n)
    ]
    return fused, rest, battery


def engine(n: int) -> list[Sample]:
    """``n`` samples of a simulated engine, one per sensor per cycle (1 s), in time order."""
    gen = make_generator("engine", seed=5, rate_hz=1.0)
    cycles = n // len(gen.signals) + 1
    chunk = gen.generate(0.0, float(cycles))
    streams = {
        sig.metric.name: Stream("sim", "e1", "fadec", sig.metric, "industrial", 1.0) for sig in gen.signals
    }
    out = [
        Sample(streams[name], float(t), WALL + float(t), float(v))
        for name, series in chunk.series.items()
        for t, v in zip(series.t, series.value, strict=True)
    ]
    out.sort(key=lambda s: s.t_mono)
    return out[:n]


def timed(put: Callable[[Sample], None], data: list[Sample]) -> float:
    """Seconds of CPU to hand every sample to ``put``."""
    start = time.process_time()
    for s in data:
        put(s)
    return time.process_time() - start


def main() -> int:
    """Print the per-sample costs and their ratio to the windower's."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rul-backends", action="store_true", help="the RUL model per call on each runtime")
    args = ap.parse_args()
    if args.rul_backends:
        return rul_backends()
    fused, rest, battery = samples(args.n)
    section = EstimatorsSection.model_validate(
        {
            "fusion": [
                {
                    "subject": "bed1",
                    "sources": [{"metric": "MDC_ECG_HEART_RATE"}, {"metric": "MDC_PULS_OXIM_PULS_RATE"}],
                }
            ],
            "battery": [{"subject": "m1", "voltage": "Pack/V", "current": "Pack/I"}],
            "rul": [{"subject": "e1", "prefix": "Engine/", "cycle_s": 1.0, "grace_s": 0.0}],
        }
    )
    turbofan = engine(args.n)
    rows: dict[str, list[float]] = {"windower": [], "fusion": [], "unrouted": [], "battery": [], "rul": []}
    emitted = 0
    for _ in range(args.runs):
        out: list[Estimate] = []
        stage = Estimation(section, {}, out.append, lambda a: None)
        win = Windower(window_s=30.0, hop_s=10.0, grace_s=2.0, lost_after_s=15.0, on_alarm=lambda a: None)
        rows["windower"].append(timed(win.put, fused))
        rows["fusion"].append(timed(stage.put, fused))
        rows["unrouted"].append(timed(stage.put, rest))
        rows["battery"].append(timed(stage.put, battery))
        rows["rul"].append(timed(stage.put, turbofan))
        emitted = len(out)
    base = statistics.median(rows["windower"])
    print(f"{args.n} samples per case, median of {args.runs} runs; {emitted} estimate records built per run")
    print("| case | µs per sample | vs windower |")
    print("|---|---|---|")
    for name, secs in rows.items():
        med = statistics.median(secs)
        print(f"| {name} | {1e6 * med / args.n:.2f} | {med / base:.2f}x |")
    rul = statistics.median(rows["rul"])
    print(
        f"rul: {1e6 * rul / args.n * 14:.1f} µs per engine cycle (14 samples, features, one model call on the card's backend)"
    )
    return 0


def rul_backends() -> int:
    """Per call and process growth of the shipped RUL model on each runtime, same run."""
    from gateway.estimation.rul import load_rul_model  # noqa: PLC0415
    from models.recipes.rul_cmapss import STEM, process_growth_mb  # noqa: PLC0415
    from models.recipes.tflite import alternated_us  # noqa: PLC0415

    models_dir = Path(__file__).resolve().parents[2] / "models"
    kinds = ("onnxruntime", "litert", "numpy")
    loaded = {k: load_rul_model(models_dir, STEM, backend=k) for k in kinds}
    card = loaded["numpy"].card
    base = card.training["degradation"]["base"]
    row = np.concatenate([[base[s] for s in card.sensors], np.zeros(len(card.sensors))])
    calls = {k: functools.partial(m.predict, row) for k, m in loaded.items()}
    times = alternated_us(calls, rounds=20, per_round=500)
    print(
        f"rul_cmapss, card backend {card.backend}: one cycle's row a call, median of 10,000 calls each, alternated"
    )
    print("| runtime | µs per call | vs onnxruntime | process growth |")
    print("|---|---:|---:|---:|")
    for k in kinds:
        print(
            f"| {k} | {times[k]:.2f} | {times[k] / times['onnxruntime']:.2f}x | "
            f"{process_growth_mb(models_dir, k):.1f} MB |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
