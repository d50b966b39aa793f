"""Per-window model latency (feature extraction + pre/post-processing + model) and RSS with models loaded.

Run: ``python tests/benchmarks/bench_models.py`` (one core: ``taskset -c 0 python ...``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from gateway.contracts import StreamFeatures, WindowRecord
from gateway.inference.build import default_models_dir
from gateway.inference.card import CARD_SUFFIX, load_card
from gateway.inference.runner import AnomalyModel
from gateway.pipeline.features import basic_features_finite
from gateway.sample import MDC, Stream, industrial_metric

SIGNALS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "RateRMS",
)
LEVEL = (0.03, 0.045, 1.3, 1.2, 72.0, 27.0, 231.0, 32.0)
#: Vital signs of the vitals_mimic model: metric, level, 1 Hz noise (30 s gateway windows).
VITALS = (
    ("MDC_ECG_HEART_RATE", 72.0, 1.0),
    ("MDC_PULS_OXIM_SAT_O2", 97.0, 0.4),
    ("MDC_RESP_RATE", 15.0, 0.6),
    ("MDC_TEMP_BODY", 36.9, 0.02),
)


def rss_mb() -> float:
    """Resident set size of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> None:
    """Print latency percentiles per precision and batch size, and RSS."""
    print(f"RSS before models: {rss_mb():.1f} MB")
    models_dir = default_models_dir()
    card = load_card(models_dir / f"pump_skab{CARD_SUFFIX}")
    models = {
        p: AnomalyModel(card, models_dir, precision=p, commissioning_windows=10) for p in ("fp32", "int8")
    }
    print(f"RSS with pump_skab fp32 + int8 loaded: {rss_mb():.1f} MB")
    rng = np.random.default_rng(0)
    w = round(card.window_s)
    t = np.arange(w, dtype=np.float64)
    for batch in (1, 64):
        streams = [
            [
                Stream("b", f"pump-{s}", "d", industrial_metric(f"P/{n}", "u"), "industrial", 1.0)
                for n in SIGNALS
            ]
            for s in range(batch)
        ]
        for prec, model in models.items():
            lat = []
            for k in range(400):
                t0 = time.perf_counter()
                records = []
                for s in range(batch):
                    sfs = []
                    for j, st in enumerate(streams[s]):
                        v = LEVEL[j] * (1.0 + 0.01 * rng.standard_normal(w))
                        sfs.append(StreamFeatures(st, w, 0.0, basic_features_finite(t, v)))
                    records.append(
                        WindowRecord(f"pump-{s}", "industrial", k, float(k), float(k), float(w), tuple(sfs))
                    )
                model.score_batch(records)
                if k >= 20:  # past commissioning
                    lat.append((time.perf_counter() - t0) * 1e6 / batch)
            a = np.asarray(lat)
            print(
                f"pump_skab {prec} batch {batch:3d}: per window incl. features p50 {np.percentile(a, 50):.1f} us, "
                f"p99 {np.percentile(a, 99):.1f} us; model state {model.stats()['state']}"
            )
    bench_vitals(rng)
    print(f"RSS at end: {rss_mb():.1f} MB")


def bench_vitals(rng: np.random.Generator) -> None:
    """Per-window latency of vitals_mimic on 30 s windows of 1 Hz vitals, incl. feature extraction."""
    models_dir = default_models_dir()
    card = load_card(models_dir / f"vitals_mimic{CARD_SUFFIX}")
    models = {p: AnomalyModel(card, models_dir, precision=p) for p in ("fp32", "int8")}
    print(f"RSS with vitals_mimic fp32 + int8 also loaded: {rss_mb():.1f} MB")
    w = 30
    t = np.arange(w, dtype=np.float64)
    for batch in (1, 64):
        streams = [
            [Stream("b", f"bed-{s}", "d", MDC[m], "medical", 1.0) for m, _, _ in VITALS] for s in range(batch)
        ]
        for prec, model in models.items():
            lat = []
            flagged = 0
            for k in range(400):
                t0 = time.perf_counter()
                records = []
                for s in range(batch):
                    sfs = [
                        StreamFeatures(
                            st, w, 0.0, basic_features_finite(t, level + noise * rng.standard_normal(w))
                        )
                        for st, (_, level, noise) in zip(streams[s], VITALS, strict=True)
                    ]
                    records.append(
                        WindowRecord(f"bed-{s}", "medical", k, float(k), float(k), float(w), tuple(sfs))
                    )
                flagged += sum(r.anomaly for r in model.score_batch(records))
                if k >= 20:
                    lat.append((time.perf_counter() - t0) * 1e6 / batch)
            a = np.asarray(lat)
            print(
                f"vitals_mimic {prec} batch {batch:3d}: per window incl. features p50 "
                f"{np.percentile(a, 50):.1f} us, p99 {np.percentile(a, 99):.1f} us; "
                f"model state {model.stats()['state']}, calm windows flagged {flagged} of {400 * batch}"
            )


if __name__ == "__main__":
    main()
