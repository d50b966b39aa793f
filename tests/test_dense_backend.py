"""The numpy backend for dense-layer models, checked against onnxruntime and LiteRT on the shipped models.

Its weights file is written by the recipes from the ONNX graph, with reference rows and their
onnxruntime scores; the backend must reproduce those at load or refuse the file.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
from model_support import MODELS, NEURAL, card_of, copy_model

from gateway.errors import ConfigError, CorruptDataError
from gateway.inference.backends import (
    DENSE_ACTIVATIONS,
    DENSE_BATCH1_TOLERANCE,
    DENSE_TOLERANCE,
    DenseBackend,
    dense_forward,
    litert_interpreter_class,
    open_backend,
)
from gateway.inference.build import ModelsSection, ModelUse, build_models
from gateway.inference.card import CARD_SUFFIX, ModelCard, file_sha256


def recorded_rows(card: ModelCard) -> np.ndarray:
    """The evaluation windows (z-scores) the recipe kept in the weights file."""
    with np.load(MODELS / card.dense_files["fp32"].path, allow_pickle=False) as npz:
        return np.asarray(npz["ref_x"], np.float32)


def rewrite_npz(path: Path, **changes: np.ndarray) -> None:
    """Replace arrays of a weights file (the card's sha256 is then fixed by the caller)."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def rehash(d: Path, name: str) -> ModelCard:
    raw = json.loads((d / f"{name}{CARD_SUFFIX}").read_text())
    path = d / raw["dense_files"]["fp32"]["path"]
    raw["dense_files"]["fp32"].update(sha256=file_sha256(path), bytes=path.stat().st_size)
    (d / f"{name}{CARD_SUFFIX}").write_text(json.dumps(raw))
    return card_of(name, d)


@pytest.mark.parametrize("name", NEURAL)
def test_card_ships_numpy_weights_and_serves_on_the_measured_choice(name: str) -> None:
    card = card_of(name)
    assert set(card.dense_files) == {"fp32"}
    spec = card.dense_files["fp32"]
    assert file_sha256(MODELS / spec.path) == spec.sha256
    ev = card.evaluation["backends"]
    assert set(ev["measured"]) == {"numpy", "litert", "onnxruntime"}
    assert ev["choice"].startswith(f"{card.backend}: ")
    assert ev["numpy"]["fp32"]["max_abs_diff_vs_onnx_fp32"] <= DENSE_TOLERANCE
    # The card says which call its numpy batch-1 figure timed.
    assert "row" in ev["numpy"]["fp32"]["batch1_path"]
    backend = open_backend(card, MODELS)
    assert (backend.name, backend.precision) == (card.backend, "fp32")


@pytest.mark.parametrize("name", NEURAL)
def test_numpy_agrees_with_onnxruntime_and_litert_on_recorded_windows(name: str) -> None:
    card = card_of(name)
    rows = recorded_rows(card)
    assert len(rows) >= 100
    rng = np.random.default_rng(11)
    far = np.clip(rng.standard_normal((500, card.n_inputs)) * 8, -30, 30).astype(np.float32)
    mine = open_backend(card, MODELS, backend="numpy")
    assert isinstance(mine, DenseBackend)
    others = [open_backend(card, MODELS, backend="onnxruntime")]
    if litert_interpreter_class() is not None:
        others.append(open_backend(card, MODELS, backend="litert"))
    for x in (rows, far):
        got = mine.run(x)
        assert got.shape == (len(x),)
        assert got.dtype == np.float64
        for other in others:
            assert np.abs(got - other.run(x)).max() < 1e-5, other.name
    one_by_one = np.array([mine.run(rows[i : i + 1])[0] for i in range(20)])
    np.testing.assert_allclose(one_by_one, mine.run(rows[:20]), rtol=0, atol=1e-12)


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    d = copy_model(tmp_path, "vitals_mimic")
    card = card_of("vitals_mimic", d)
    path = d / card.dense_files["fp32"].path
    with np.load(path, allow_pickle=False) as npz:
        w0 = npz["w0"].copy()
    w0[3, 5] += 0.05  # a changed weight, file bytes no longer the card's
    rewrite_npz(path, w0=w0)
    with pytest.raises(CorruptDataError, match="sha256"):
        open_backend(card, d, backend="numpy")
    # The same weights with a card rewritten to their sha256: the recorded scores refuse them.
    with pytest.raises(CorruptDataError, match="do not reproduce the recorded onnxruntime scores"):
        open_backend(rehash(d, "vitals_mimic"), d, backend="numpy")


def test_malformed_weights_files_are_refused(tmp_path: Path) -> None:
    d = copy_model(tmp_path, "pump_skab")
    path = d / card_of("pump_skab", d).dense_files["fp32"].path
    original = path.read_bytes()
    cases: dict[str, dict[str, np.ndarray] | None] = {
        "not a numpy archive": None,
        "activations": {"act": np.array(["swish"])},
        "layer 0": {"w0": np.zeros((3, 1), np.float32)},
        "no reference rows": {"ref_x": np.zeros((4, 2), np.float32)},
        "not floating point": {"b0": np.array(["1.0"])},
    }
    for message, changes in cases.items():
        path.write_bytes(original)
        if changes is None:
            path.write_bytes(b"PK\x03\x04 no zip" * 4)
        else:
            rewrite_npz(path, **changes)
        with pytest.raises(CorruptDataError, match=message):
            open_backend(rehash(d, "pump_skab"), d, backend="numpy")
    # An archive holding a pickled object is refused, never unpickled.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, zf.open("act.npy", "w") as f:
        np.lib.format.write_array(f, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    path.write_bytes(buf.getvalue())
    with pytest.raises(CorruptDataError, match="numpy weights file"):
        open_backend(rehash(d, "pump_skab"), d, backend="numpy")


def test_numpy_for_a_precision_without_weights(caplog: pytest.LogCaptureFixture) -> None:
    card = card_of("pump_skab").model_copy(update={"backend": "numpy"})
    with pytest.raises(ConfigError, match=r"backend 'numpy': the card ships no int8 numpy weights"):
        open_backend(card, MODELS, precision="int8", backend="numpy")
    with caplog.at_level(logging.INFO, logger="gateway.inference.backends"):
        backend = open_backend(card, MODELS, precision="int8")
    assert (backend.name, backend.precision) == ("onnxruntime", "int8")
    assert "the card prefers numpy" in caplog.text


def test_models_built_from_config_serve_on_numpy_and_litert_when_asked() -> None:
    use = [ModelUse(name="pump_skab"), ModelUse(name="vitals_mimic", backend="onnxruntime")]
    pump, vitals = build_models(ModelsSection(use=use), hop_s=10.0)
    assert pump.backend.name == card_of("pump_skab").backend
    assert vitals.backend.name == "onnxruntime"
    (forced,) = build_models(ModelsSection(backend="numpy", use=[ModelUse(name="vitals_mimic")]), hop_s=10.0)
    assert forced.backend.name == "numpy"


@pytest.mark.parametrize("name", NEURAL)
def test_numpy_window_at_a_time_scores_as_the_layers_compute_it(name: str) -> None:
    # A window at a time takes a shorter path (the last layer a dot product in Python floats): its
    # scores must be those of the layers in numpy at batch 1 within the stated tolerance (the sum
    # runs in another order), and so fall on the same side of the threshold.
    card = card_of(name)
    with np.load(MODELS / card.dense_files["fp32"].path, allow_pickle=False) as npz:
        acts = [str(a) for a in npz["act"].reshape(-1)]
        layers = [
            (npz[f"w{i}"].astype(np.float64), npz[f"b{i}"].astype(np.float64), act)
            for i, act in enumerate(acts)
        ]
    rng = np.random.default_rng(5)
    far = np.clip(rng.standard_normal((300, card.n_inputs)) * 8, -30, 30).astype(np.float32)
    mine = open_backend(card, MODELS, backend="numpy")
    for x in (recorded_rows(card)[:300], far):
        one = np.concatenate([mine.run(x[i : i + 1]) for i in range(len(x))])
        assert one.dtype == np.float64
        layered = np.array([dense_forward(x[i : i + 1], layers)[0] for i in range(len(x))])
        np.testing.assert_allclose(one, layered, rtol=0.0, atol=DENSE_BATCH1_TOLERANCE)
        assert ((one > card.threshold) == (layered > card.threshold)).all()
    # every activation a last layer may have, on weights written as a recipe writes them
    for act in DENSE_ACTIVATIONS:
        w0, w1 = rng.standard_normal((card.n_inputs, 4)), rng.standard_normal((4, 1))
        b0, b1 = rng.standard_normal(4), rng.standard_normal(1)
        layers = [(w0, b0, "relu"), (w1, b1, act)]
        x = far[:50]
        buf = io.BytesIO()
        np.savez(
            buf,
            w0=w0,
            b0=b0,
            w1=w1,
            b1=b1,
            act=np.array(["relu", act]),
            ref_x=x,
            ref_y=dense_forward(x, layers),
        )
        crafted = DenseBackend(card, buf.getvalue(), "fp32")
        one = np.concatenate([crafted.run(x[i : i + 1]) for i in range(len(x))])
        layered = np.array([dense_forward(x[i : i + 1], layers)[0] for i in range(len(x))])
        np.testing.assert_allclose(one, layered, rtol=0.0, atol=DENSE_BATCH1_TOLERANCE)
