"""The vital-signs model: served on the simulated patient's gateway windows, and on MIMIC numerics.

The simulator tests run the real generator through the real Windower (30 s windows every 10 s
at 1 Hz) and the model as the pipeline builds it from config; the MIMIC test (skipped without
the shared data) checks that the runtime computes what the recipe evaluated.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest
from data_support import DATA

from drivers.sim.protocol import HR, RESP, SPO2, TEMP, Label
from gateway.contracts import StreamFeatures, WindowRecord
from gateway.inference.build import ModelsSection, ModelUse, build_models, default_models_dir
from gateway.inference.card import CARD_SUFFIX, load_card
from gateway.inference.runner import AnomalyModel
from gateway.sample import MDC, Metric, Stream
from models.recipes.common import run, session
from models.recipes.vitals_mimic import (
    FEATURES,
    NAME,
    SEED,
    TRAIN_MINUTES,
    TRAIN_RECORD,
    VITALS,
    Norm,
    build_scenarios,
    load_vitals,
    sim_windows,
    synthetic_temperature,
)

MODELS = default_models_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "physio" / "mimic_numerics").is_dir(),
    reason=f"MIMIC numerics not found under {DATA} (set EDGETWIN_DATA to the shared data folder)",
)
DESAT = Label("desaturation", 1200.0, 1380.0)
BRADY = Label("bradycardia", 2400.0, 2520.0)


def served(precision: Literal["fp32", "int8"]) -> AnomalyModel:
    """The model as the gateway builds it from ``[[models.use]] name = "vitals_mimic"``."""
    (model,) = build_models(ModelsSection(use=[ModelUse(name=NAME, precision=precision)]), hop_s=10.0)
    return model


def test_card_is_population_normalised_over_the_four_vitals() -> None:
    card = load_card(MODELS / f"{NAME}{CARD_SUFFIX}")
    assert card.subject_kind == "medical"
    assert card.normalisation.kind == "fixed"  # no per-patient commissioning
    assert {i.metric for i in card.inputs} == set(VITALS) == {HR, SPO2, RESP, TEMP}
    assert {i.feature for i in card.inputs} == set(FEATURES)
    assert len(card.normalisation.mean) == len(card.normalisation.std) == card.n_inputs
    ev = card.evaluation
    assert abs(ev["f1_delta_int8_minus_fp32"]) <= 0.01
    assert ev["fp32"]["all"]["events"] >= 80


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_sim_desaturation_and_bradycardia_are_flagged_calm_span_is_not(
    precision: Literal["fp32", "int8"],
) -> None:
    records, _ = sim_windows(7, 3600.0, events=(DESAT, BRADY))
    model = served(precision)
    assert all(model.applies_to(r) for r in records)
    results = model.score_batch(records)
    end = np.array([r.end_mono - 100.0 for r in records])
    flag = np.array([r.anomaly for r in results])
    scored = np.array([not math.isnan(r.score) for r in results])
    # Population statistics, nothing to commission: scored from the first window that holds 0.8 of
    # its 30 s; the two before it hold 10 and 20 s since the start and are not judged.
    starting = end < 0.8 * 30.0
    assert starting.sum() == 2
    assert [r.reason for r, s in zip(results, starting, strict=True) if s] == ["partial", "partial"]
    assert (scored == ~starting).all()
    for lb in (DESAT, BRADY):
        # Windows wholly inside the event, past its ramp-in (up to 40 s for a desaturation).
        deep = (end - 30.0 >= lb.start_s + 40.0) & (end <= lb.end_s - 20.0)
        assert deep.sum() >= 3
        assert flag[deep].mean() >= 0.8, lb
    desat_hits = [results[int(i)] for i in np.flatnonzero(flag & (end > DESAT.start_s) & (end < DESAT.end_s))]
    top = {max(r.contributions, key=lambda k: r.contributions[k]) for r in desat_hits}
    assert top <= {f"{SPO2}.{f}" for f in FEATURES}  # explained by the oximeter
    calm = (end < DESAT.start_s - 60.0) | ((end > DESAT.end_s + 120.0) & (end < BRADY.start_s - 60.0))
    calm |= end > BRADY.end_s + 120.0
    assert calm.sum() > 250
    assert flag[calm].mean() <= 0.01


def test_model_matches_suffixed_metric_names_and_tolerates_a_missing_thermometer() -> None:
    # A monitor that names its metrics "<device path>/MDC_..." and has no thermometer.
    streams = [
        Stream("mon", "bed-9", "d", Metric(f"icu3/{m}", MDC[m].unit, MDC[m].mdc), "medical", 1.0)
        for m in (HR, SPO2, RESP)
    ]
    model = AnomalyModel(load_card(MODELS / f"{NAME}{CARD_SUFFIX}"), MODELS)

    def window(hr: float, spo2: float) -> WindowRecord:
        sfs = tuple(
            StreamFeatures(st, 30, 0.0, {"mean": v, "min": v - 1.0, "max": v + 1.0, "slope": 0.0})
            for st, v in zip(streams, (hr, spo2, 15.0), strict=True)
        )
        return WindowRecord("bed-9", "medical", 1, 10.0, 1.7e9, 30.0, sfs)

    calm, desat = model.score_batch([window(72.0, 97.0), window(80.0, 82.0)])
    assert not math.isnan(calm.score)  # 9 of 12 inputs present: scored, temperature at its normal
    assert not calm.anomaly
    assert desat.anomaly
    industrial = WindowRecord("bed-9", "industrial", 1, 10.0, 1.7e9, 30.0, window(72.0, 97.0).streams)
    assert not model.applies_to(industrial)


@needs_data
def test_runtime_matches_recipe_on_mimic_with_injected_events() -> None:
    card = load_card(MODELS / f"{NAME}{CARD_SUFFIX}")
    vit, hour = load_vitals(DATA, TRAIN_RECORD)
    temp = synthetic_temperature(len(vit), hour, np.random.default_rng((SEED, 9)))
    base = np.column_stack([vit, temp])[TRAIN_MINUTES:]  # the span held apart from training
    (sc,) = build_scenarios(base, "s00001 held apart", 1, 99, shift_first=False)
    assert len(sc.events) >= 3
    streams = [Stream("mimic", "p", "m", MDC[m], "medical", 1.0 / 60.0) for m in VITALS]
    records = []
    for i, row in enumerate(sc.x):
        sfs = []
        for s, st in enumerate(streams):
            vals = row[s * len(FEATURES) : (s + 1) * len(FEATURES)]
            feats = {f: float(v) for f, v in zip(FEATURES, vals, strict=True) if np.isfinite(v)}
            sfs.append(StreamFeatures(st, 5 if feats else 0, 0.0, feats))
        records.append(WindowRecord("p", "medical", i, 60.0 * i, 60.0 * i, 300.0, tuple(sfs)))
    model = AnomalyModel(card, MODELS)
    results = model.score_batch(records)
    norm = Norm(np.asarray(card.normalisation.mean), np.asarray(card.normalisation.std))
    z, scored = norm.z(sc)
    served_scores = np.array([r.score for r in results])
    assert np.array_equal(np.isfinite(served_scores), scored)  # same windows left unscored
    offline = run(session(MODELS / card.files["fp32"].path), z[scored])
    assert np.abs(served_scores[scored] - offline).max() < 1e-5
    flag = np.array([r.anomaly for r in results])
    for ev in sc.events:
        a, b = max(math.ceil(ev.start) - 4, 0), min(math.ceil(ev.end), len(flag))
        assert flag[a:b].any(), ev
