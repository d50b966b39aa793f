"""The LiteRT (TFLite) backend on every shipped .tflite model (rul_cmapss's too), checked against their ONNX twins.

Runs the real ai-edge-litert interpreter; skipped with a reason only where its wheel does not
install on this platform.  The runtime's absence is shown by making its import fail.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from data_support import DATA
from model_support import MODELS, NEURAL, card_of, copy_model, needs_litert

from gateway.contracts import StreamFeatures, WindowRecord
from gateway.errors import ConfigError, CorruptDataError
from gateway.estimation.rul import RIDGE_TOLERANCE, load_rul_model
from gateway.inference.backends import LiteRtBackend, litert_interpreter_class, open_backend
from gateway.inference.build import ModelsSection, ModelUse, build_models
from gateway.inference.card import CARD_SUFFIX, file_sha256, load_card
from gateway.pipeline.features import basic_features_finite
from gateway.sample import MDC, Stream


def z_rows(n: int, width: int, seed: int) -> npt.NDArray[np.float32]:
    """Inputs in the range a window's clipped z-scores take: mostly calm, some far out."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([1.0, 4.0], (n, 1))
    rows: npt.NDArray[np.float32] = np.clip(rng.standard_normal((n, width)) * scale, -30, 30).astype(
        np.float32
    )
    return rows


@pytest.fixture
def no_litert(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make both LiteRT wheels fail to import, as on a platform without them."""
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, module, None)


def test_every_neural_card_ships_tflite_files_and_names_a_measured_backend() -> None:
    for name in NEURAL:
        card = card_of(name)
        assert set(card.tflite_files) == {"fp32", "int8"}, name
        for spec in card.tflite_files.values():
            assert spec.path.endswith(".tflite")
            assert file_sha256(MODELS / spec.path) == spec.sha256
        lite = card.evaluation["litert"]
        assert card.evaluation["backends"]["choice"].startswith(f"{card.backend}: ")
        assert set(card.evaluation["backends"]["measured"]) >= {"litert", "onnxruntime"}
        assert lite["fp32"]["max_abs_diff_vs_onnx_fp32"] < 1e-5


@needs_litert
@pytest.mark.parametrize("name", NEURAL)
def test_litert_scores_match_onnx_within_the_card_figures(name: str) -> None:
    card = card_of(name)
    rows = z_rows(2000, card.n_inputs, seed=7)
    for prec in ("fp32", "int8"):
        lite = open_backend(card, MODELS, precision=prec, backend="litert")
        onnx = open_backend(card, MODELS, precision=prec, backend="onnxruntime")
        assert (lite.name, onnx.name) == ("litert", "onnxruntime")
        got = lite.run(rows)
        assert got.shape == (len(rows),)
        assert np.isfinite(got).all()
        ref32 = open_backend(card, MODELS, precision="fp32", backend="onnxruntime").run(rows)
        if prec == "fp32":
            assert np.abs(got - onnx.run(rows)).max() < 1e-5
        else:
            # Quantized by another quantizer: no further from the exact scores than onnxruntime's
            # own int8 model is, and the same decision on nearly every row.
            onnx_err = np.abs(onnx.run(rows) - ref32)
            assert np.abs(got - ref32).max() <= max(1.5 * onnx_err.max(), 0.05)
            assert np.abs(got - ref32).mean() <= max(1.5 * onnx_err.mean(), 0.005)
            assert np.mean((got > card.threshold) == (ref32 > card.threshold)) > 0.97


@needs_litert
def test_litert_batch_changes_give_the_same_scores() -> None:
    card = card_of("vitals_mimic")
    backend = open_backend(card, MODELS, backend="tflite")
    rows = z_rows(64, card.n_inputs, seed=3)
    whole = backend.run(rows)
    one_by_one = np.array([backend.run(rows[i : i + 1])[0] for i in range(len(rows))])
    # Kernels for one row and for many may round differently in the last float32 bit.
    np.testing.assert_allclose(one_by_one, whole, rtol=1e-5, atol=1e-6)
    assert np.array_equal(backend.run(rows), whole)
    for n in range(2, 12):  # more shapes than it keeps: older ones are dropped, answers stay right
        np.testing.assert_allclose(backend.run(rows[:n]), whole[:n], rtol=1e-5, atol=1e-6)
    assert isinstance(backend, LiteRtBackend)
    kept = backend._by_batch  # the interpreter cache is what is under test
    assert len(kept) <= LiteRtBackend.MAX_SHAPES
    assert 1 in kept  # a window at a time is never the shape dropped
    np.testing.assert_allclose(backend.run(rows[:1]), whole[:1], rtol=1e-5, atol=1e-6)


@needs_litert
def test_anomaly_model_scores_windows_on_litert() -> None:
    (model,) = build_models(ModelsSection(backend="litert", use=[ModelUse(name="vitals_mimic")]), hop_s=10.0)
    assert model.backend.name == "litert"
    t = np.arange(30, dtype=np.float64)
    rng = np.random.default_rng(5)
    vitals = (
        ("MDC_ECG_HEART_RATE", 72.0),
        ("MDC_PULS_OXIM_SAT_O2", 97.0),
        ("MDC_RESP_RATE", 15.0),
        ("MDC_TEMP_BODY", 36.9),
    )

    def window(k: int, spo2: float) -> WindowRecord:
        sfs = tuple(
            StreamFeatures(
                Stream("b", "bed-1", "d", MDC[m], "medical", 1.0),
                30,
                0.0,
                basic_features_finite(
                    t, (spo2 if m == "MDC_PULS_OXIM_SAT_O2" else lvl) + 0.2 * rng.standard_normal(30)
                ),
            )
            for m, lvl in vitals
        )
        return WindowRecord("bed-1", "medical", k, 10.0 * k, 10.0 * k, 30.0, sfs)

    calm = model.score_batch([window(k, 97.0) for k in range(5)])
    low = model.score_batch([window(5 + k, 78.0) for k in range(5)])
    assert all(r.verdict == "normal" for r in calm)
    assert all(r.anomaly for r in low)
    # Explanations re-score each window with one input reset: a 12-row batch on the same backend.
    assert all(next(iter(r.contributions)).startswith("MDC_PULS_OXIM_SAT_O2.") for r in low)
    assert model.stats()["state"] == "healthy"


@needs_litert
def test_broken_tflite_file_is_refused_at_load(tmp_path: Path) -> None:
    d = copy_model(tmp_path, "pump_skab")
    card = load_card(d / f"pump_skab{CARD_SUFFIX}")
    path = d / card.tflite_files["fp32"].path
    path.write_bytes(path.read_bytes()[:100])  # truncated: the sha256 check refuses it
    with pytest.raises(CorruptDataError, match="sha256"):
        open_backend(card, d, backend="litert")
    # Bytes that match the card but are no TFLite model: the interpreter refuses them.
    raw = json.loads((d / f"pump_skab{CARD_SUFFIX}").read_text())
    path.write_bytes(b"not a flatbuffer" * 8)
    raw["tflite_files"]["fp32"].update(sha256=file_sha256(path), bytes=path.stat().st_size)
    (d / f"pump_skab{CARD_SUFFIX}").write_text(json.dumps(raw))
    with pytest.raises(CorruptDataError, match="LiteRT cannot load the model"):
        open_backend(
            load_card(d / f"pump_skab{CARD_SUFFIX}"),
            d,
            backend="card" if raw["backend"] == "litert" else "litert",
        )


def test_litert_asked_for_without_the_runtime_is_refused(no_litert: None) -> None:
    card = card_of("pump_skab")
    with pytest.raises(ConfigError, match=r"backend 'litert': neither ai-edge-litert .*: pip install"):
        open_backend(card, MODELS, backend="litert")


def test_card_preference_without_the_runtime_serves_onnx(
    no_litert: None, caplog: pytest.LogCaptureFixture
) -> None:
    card = card_of("vitals_mimic").model_copy(update={"backend": "litert"})
    with caplog.at_level(logging.INFO, logger="gateway.inference.backends"):
        backend = open_backend(card, MODELS)
    assert backend.name == "onnxruntime"
    assert "the card prefers LiteRT" in caplog.text


def test_litert_asked_for_a_card_without_tflite_files_is_refused() -> None:
    card = card_of("pump_skab").model_copy(update={"tflite_files": {}})
    with pytest.raises(ConfigError, match=r"ships no fp32 \.tflite file"):
        open_backend(card, MODELS, backend="litert")
    with pytest.raises(ConfigError, match="unknown"):
        open_backend(card, MODELS, backend="tensorrt")


def test_rul_card_ships_tflite_and_numpy_files_and_names_a_measured_backend() -> None:
    card = load_rul_model(MODELS, "rul_cmapss").card
    assert set(card.tflite_files) == {"fp32", "int8"}
    for spec in (*card.tflite_files.values(), *card.numpy_files.values(), *card.files.values()):
        assert file_sha256(MODELS / spec.path) == spec.sha256
        assert (MODELS / spec.path).stat().st_size == spec.bytes
    backends = card.evaluation["backends"]
    assert backends["choice"].startswith(f"{card.backend}: ")
    assert set(backends["measured"]) == {"litert", "onnxruntime", "numpy"}
    lite = card.evaluation["litert"]
    assert lite["fp32"]["max_abs_diff_vs_onnx_fp32"] < RIDGE_TOLERANCE
    assert backends["numpy"]["max_abs_diff_vs_onnx_fp32"] < RIDGE_TOLERANCE
    assert lite["int8_served"] is False  # its figures say why; the loader serves fp32 only


def engine_rows(n: int, seed: int) -> npt.NDArray[np.float32]:
    """RUL input rows an engine's cycles give (the card's fleet fit): recent means along a life, and slopes."""
    card = load_rul_model(MODELS, "rul_cmapss", backend="onnxruntime").card
    fit = card.training["degradation"]
    rng = np.random.default_rng(seed)
    life = rng.uniform(0.0, 1.0, (n, 1))
    g = fit["shape_g"]
    cols = [np.array([fit[k][s] for s in card.sensors]) for k in ("base", "delta", "noise")]
    base, delta, noise = cols
    means = (
        base + delta * (np.exp(g * life) - 1) / (np.exp(g) - 1) + noise * rng.standard_normal((n, len(base)))
    )
    slopes = delta * g * np.exp(g * life) / (np.exp(g) - 1) / fit["life_cycles"]["mean"]
    return np.hstack([means, slopes]).astype(np.float32)


def test_every_shipped_tflite_file_is_named_by_a_card() -> None:
    named = set()
    for path in MODELS.glob(f"*{CARD_SUFFIX}"):
        named |= {f["path"] for f in json.loads(path.read_text()).get("tflite_files", {}).values()}
    assert {p.name for p in MODELS.glob("*.tflite")} == named
    assert {"rul_cmapss.fp32.tflite", "rul_cmapss.int8.tflite"} <= named


@needs_litert
def test_rul_tflite_files_run_on_litert_against_onnx() -> None:
    """Both RUL .tflite files through the interpreter, on rows along an engine's life."""
    rows = engine_rows(2000, seed=4)
    onnx = load_rul_model(MODELS, "rul_cmapss", backend="onnxruntime")
    ref = onnx.backend.run(rows)
    # Rows along a whole life: young engines near the cap, worn ones near failure.
    assert float(np.percentile(ref, 10)) < 40.0
    assert float(np.percentile(ref, 90)) > 100.0
    lite = load_rul_model(MODELS, "rul_cmapss", backend="litert")
    assert lite.backend.name == "litert"
    assert np.abs(lite.backend.run(rows) - ref).max() < RIDGE_TOLERANCE
    card = onnx.card
    int8 = LiteRtBackend(
        card, (MODELS / card.tflite_files["int8"].path).read_bytes(), "int8", litert_interpreter_class()
    )
    got8 = int8.run(rows)
    assert got8.shape == ref.shape
    assert np.isfinite(got8).all()
    # As the card says: far off (one input scale for means and slopes), within the clip.
    assert ((got8 >= 0) & (got8 <= card.cap)).all()
    assert np.abs(got8 - ref).mean() > 5.0


@needs_litert
def test_rul_litert_estimates_match_onnx_on_the_test_engines() -> None:
    """Every test engine's cycles through LiteRT fp32 and int8 against ONNX, and the card's RMSE figures."""
    root = DATA / "industrial" / "cmapss_fd001"
    if not (root / "test_FD001.txt").is_file():
        pytest.skip(f"C-MAPSS FD001 not found under {DATA} (set EDGETWIN_DATA)")
    from models.recipes import rul_cmapss as recipe  # noqa: PLC0415 - the recipe's own feature rows

    test = recipe.load(root / "test_FD001.txt")
    rows = np.vstack([recipe.raw_features(test[u]) for u in sorted(test)]).astype(np.float32)
    last = np.vstack([recipe.raw_features(test[u])[-1] for u in sorted(test)]).astype(np.float32)
    truth = np.minimum(np.loadtxt(root / "RUL_FD001.txt"), recipe.CAP)
    onnx = load_rul_model(MODELS, "rul_cmapss", backend="onnxruntime")
    lite = load_rul_model(MODELS, "rul_cmapss", backend="litert")
    assert (onnx.backend.name, lite.backend.name) == ("onnxruntime", "litert")
    ref = onnx.backend.run(rows)
    assert np.abs(lite.backend.run(rows) - ref).max() < RIDGE_TOLERANCE
    assert (
        np.abs(load_rul_model(MODELS, "rul_cmapss", backend="numpy").backend.run(rows) - ref).max()
        < RIDGE_TOLERANCE
    )
    card = onnx.card
    int8 = LiteRtBackend(
        card, (MODELS / card.tflite_files["int8"].path).read_bytes(), "int8", litert_interpreter_class()
    )
    got8 = int8.run(rows)
    assert np.isfinite(got8).all()
    figures = card.evaluation["litert"]
    for prec, backend in (("fp32", lite.backend), ("int8", int8)):
        rmse = float(np.sqrt(np.mean((backend.run(last) - truth) ** 2)))
        assert rmse == pytest.approx(figures[prec]["test_rmse"], abs=1e-3), prec
    assert float(np.abs(got8 - ref).max()) == pytest.approx(
        figures["int8"]["max_abs_diff_vs_onnx_fp32"], abs=1e-3
    )


def test_rul_card_preference_without_the_runtime_serves_onnx(
    no_litert: None, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    raw = json.loads((MODELS / "rul_cmapss.card.json").read_text())
    (tmp_path / "rul_cmapss.card.json").write_text(json.dumps(raw | {"backend": "litert"}))
    shutil.copy(MODELS / raw["files"]["fp32"]["path"], tmp_path)
    with caplog.at_level(logging.INFO, logger="gateway.estimation.rul"):
        assert load_rul_model(tmp_path, "rul_cmapss").backend.name == "onnxruntime"
    assert "the card prefers litert but neither ai-edge-litert" in caplog.text
    with pytest.raises(ConfigError, match=r"backend 'litert': neither ai-edge-litert"):
        load_rul_model(tmp_path, "rul_cmapss", backend="litert")
