"""Per-window compute of the gateway-learned detectors against the carded pump model in the same run.

Run: ``python tests/benchmarks/bench_novelty.py`` (one core: ``taskset -c 0 python ...``).

Each detector scores the same committed 8-signal pump windows one at a time (batch 1, the worst
case) after commissioning; the figure is worker-thread CPU time per window, as the runtime's
latency budget counts it.  Baseline: ``pump_skab`` fp32 (onnxruntime) on the same windows, itself
against the same model with its baseline frozen at commissioning (what following slow wander costs).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from gateway.contracts import StreamFeatures, WindowModel, WindowRecord
from gateway.inference.build import default_models_dir
from gateway.inference.card import CARD_SUFFIX, ModelCard, load_card
from gateway.inference.fusion import FUSION_SUFFIX, FusionModel, load_fusion
from gateway.inference.novelty import CusumSums, NoveltyModel, NoveltyUse, prepare, score_rows
from gateway.inference.runner import AnomalyModel
from gateway.inference.streams import StreamChange, StreamUse
from gateway.sample import Stream, industrial_metric

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
UNITS = ("g", "g", "A", "bar", "Cel", "Cel", "V", "l/min")
N_COMMISSION = 400
N_SCORE = 3000


def windows(n: int, rng: np.random.Generator) -> list[WindowRecord]:
    """Pump windows with mean and std per signal."""
    streams = [
        Stream("plc", "pump-1", "SN-1", industrial_metric(s, u), "industrial", 1.0)
        for s, u in zip(SIGNALS, UNITS, strict=True)
    ]
    out = []
    for k in range(n):
        sfs = tuple(
            StreamFeatures(st, 20, 0.0, {"mean": lv * (1 + 0.01 * rng.standard_normal()), "std": 0.01 * lv})
            for st, lv in zip(streams, LEVEL, strict=True)
        )
        out.append(WindowRecord("pump-1", "industrial", k, float(k), 1e9 + k, 20.0, sfs))
    return out


def per_window_us(score: WindowModel, recs: list[WindowRecord]) -> float:
    """Median thread CPU time per window, scoring one window at a time."""
    fn = score.score_batch
    lat = []
    for r in recs:
        t0 = time.thread_time()
        fn([r])
        lat.append((time.thread_time() - t0) * 1e6)
    return float(np.median(lat))


def main() -> None:
    """Print per-window CPU time of each detector and its ratio to the carded model."""
    rng = np.random.default_rng(0)
    warm = windows(N_COMMISSION, rng)
    test = windows(N_SCORE, rng)
    models_dir = default_models_dir()
    card = load_card(models_dir / f"pump_skab{CARD_SUFFIX}")
    base = AnomalyModel(card, models_dir, precision="fp32", commissioning_windows=50)
    # The same model with its baseline frozen at commissioning (pump_skab 1.0.0): what following costs.
    still = card.normalisation.model_copy(update={"track_s": None, "track_flagged_s": None})
    frozen = AnomalyModel(
        card.model_copy(update={"normalisation": still}),
        models_dir,
        precision="fp32",
        commissioning_windows=50,
    )
    frozen.score_batch(warm)
    nov = NoveltyModel(NoveltyUse(commissioning_s=float(N_COMMISSION), features=["mean", "std"]), hop_s=1.0)
    # With the slower EWMA block the TEP protocol chose (1.1.0): a third of the row again.
    slow = NoveltyModel(
        NoveltyUse(commissioning_s=float(N_COMMISSION), features=["mean", "std"], ewma=0.5, ewma_slow=0.1),
        hop_s=1.0,
    )
    # With the residual CUSUM (1.2.0, cusum_k = 1.0): its sums step once per window.
    cusum = NoveltyModel(
        NoveltyUse(commissioning_s=float(N_COMMISSION), features=["mean", "std"], cusum_k=1.0), hop_s=1.0
    )
    per = StreamChange(StreamUse(commissioning_s=float(N_COMMISSION)), hop_s=1.0)
    for m in (base, nov, slow, cusum, per):
        m.score_batch(warm)
    b = per_window_us(base, test)
    print(f"pump_skab fp32 (baseline): {b:.1f} us/window")
    f = per_window_us(frozen, test)
    print(f"pump_skab fp32, baseline frozen (1.0.0): {f:.1f} us/window; following costs {b / f:.2f}x")
    for name, m in (
        ("novelty (16 inputs)", nov),
        ("novelty, slower EWMA block (16 inputs)", slow),
        ("novelty, residual CUSUM (16 inputs)", cusum),
        ("stream_change (8 streams)", per),
    ):
        us = per_window_us(m, test)
        print(f"{name}: {us:.1f} us/window, {us / b:.2f}x the baseline")
    fused_members(card, models_dir, warm, test, b)
    cusum_cap_cost(cusum, test)


def cusum_cap_cost(cusum: NoveltyModel, test: list[WindowRecord], rounds: int = 6) -> None:
    """The CUSUM's clearing rule (1.3.0, its sums capped) against the same fit uncapped, alternating."""
    fit = cusum.fit_of(test[0].subject)
    assert fit is not None
    uncapped = dataclasses.replace(fit, spec=dataclasses.replace(fit.spec, cusum_clear=10**9))
    keys = sorted(f"{sf.stream.metric.name}.{f}" for sf in test[0].streams for f in ("mean", "std"))
    x = np.array(
        [
            [
                {f"{sf.stream.metric.name}.{k}": v for sf in r.streams for k, v in sf.features.items()}[key]
                for key in keys
            ]
            for r in test
        ]
    )
    rows = prepare(x, fit.mean, fit.std, fit.spec)
    got: dict[str, list[float]] = {"capped": [], "uncapped": []}
    for i in range(rounds):
        order = (("capped", fit), ("uncapped", uncapped))
        for name, f in order if i % 2 == 0 else order[::-1]:
            sums = CusumSums.zeros(rows.shape[1])
            t0 = time.thread_time()
            for j in range(rows.shape[0]):
                score_rows(f, rows[j : j + 1], sums)
            got[name].append((time.thread_time() - t0) * 1e6 / rows.shape[0])
    c, u = (float(np.median(got[k])) for k in ("capped", "uncapped"))
    print(
        f"residual CUSUM scoring (16 inputs), capped {c:.1f} against uncapped {u:.1f} us/window ({c / u:.3f}x)"
    )


def fused_members(
    card: ModelCard, models_dir: Path, warm: list[WindowRecord], test: list[WindowRecord], b: float
) -> None:
    """The shipped fusion's cost: its members as members (``explain_all``: a window they do not flag is
    explained only when its contributions are read, which this does not), and the fused verdict itself."""
    fusion = FusionModel(load_fusion(models_dir / f"fusion_skab{FUSION_SUFFIX}"))
    pump = AnomalyModel(card, models_dir, precision="fp32", commissioning_windows=50)
    pump.explain_all = True
    nov = next(m for m in fusion.members if m.model == "novelty")
    settings = {"commissioning_s": float(N_COMMISSION), "window_s": nov.window_s, **nov.settings}
    use = NoveltyUse.model_validate(settings, strict=False)  # the card's numbers are floats
    plain = NoveltyModel(use, hop_s=1.0)
    explained = NoveltyModel(use, hop_s=1.0)
    explained.explain_all = True
    for m in (pump, plain, explained):
        m.score_batch(warm)
    us = per_window_us(pump, test)
    print(f"pump_skab fp32 as a fusion member: {us:.1f} us/window, {us / b:.2f}x the baseline")
    p = per_window_us(plain, test)
    e = per_window_us(explained, test)
    print(f"novelty alone: {p:.1f} us/window; as fusion_skab's member {e:.1f} ({e / p:.2f}x)")
    results = {"pump_skab": pump.score_batch(test[:1])[0], "novelty": explained.score_batch(test[:1])[0]}
    t0 = time.thread_time()
    for _ in range(N_SCORE):
        fusion.fuse(results)
    print(f"fusion_skab fuse(): {(time.thread_time() - t0) * 1e6 / N_SCORE:.1f} us/window")


if __name__ == "__main__":
    main()
