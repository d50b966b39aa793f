"""Inference runtime: card and sha256 checks, backends, fallback and self-healing, explanations.

Uses the committed model files under models/ and synthetic windows; no shared data needed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from gateway.contracts import Alarm, AlarmKind, Diagnostic, StreamFeatures, WindowRecord
from gateway.errors import ConfigError, CorruptDataError
from gateway.inference.backends import open_backend
from gateway.inference.build import ModelsSection, ModelUse, build_models, default_models_dir
from gateway.inference.card import CARD_SUFFIX, ModelCard, file_sha256, load_card
from gateway.inference.runner import AnomalyModel
from gateway.sample import Stream, industrial_metric
from models.recipes.pump_skab import SIGNALS, UNITS

MODELS = default_models_dir()
COMMISSION = 30
PUMP = "pump_skab"
LEVEL = {
    "Accelerometer1RMS": 0.03,
    "Accelerometer2RMS": 0.045,
    "Current": 1.3,
    "Pressure": 1.2,
    "Temperature": 72.0,
    "Thermocouple": 27.0,
    "Voltage": 231.0,
    "RateRMS": 32.0,
}
STREAMS = {
    s: Stream("plc", "pump-1", "SN-1", industrial_metric(f"Pump1/{s}", UNITS[s]), "industrial", 1.0)
    for s in SIGNALS
}


def pump_window(
    k: int, rng: np.random.Generator, *, subject: str = "pump-1", shift: dict[str, float] | None = None
) -> WindowRecord:
    """A window of the 8 pump signals: each mean near its level, noise relative to the level."""
    shift = shift or {}
    out = []
    for s in sorted(SIGNALS, key=lambda n: f"plc/SN-1/Pump1/{n}"):
        level = LEVEL[s] * (1.0 + shift.get(s, 0.0))
        mean = level * (1.0 + 0.002 * rng.standard_normal())
        std = abs(level) * (0.01 + 0.001 * rng.standard_normal())
        st = (
            STREAMS[s]
            if subject == "pump-1"
            else Stream("plc", subject, "SN-1", STREAMS[s].metric, "industrial", 1.0)
        )
        out.append(
            StreamFeatures(
                st, 20, 0.0, {"mean": mean, "std": std, "min": mean - 2 * std, "max": mean + 2 * std}
            )
        )
    return WindowRecord(subject, "industrial", k, 5.0 * k, 1.7e9 + 5.0 * k, 20.0, tuple(out))


def copy_models(tmp: Path) -> Path:
    dst = tmp / "models"
    dst.mkdir()
    card = load_card(MODELS / f"{PUMP}{CARD_SUFFIX}")
    shutil.copy(MODELS / f"{PUMP}{CARD_SUFFIX}", dst)
    for f in (*card.files.values(), *card.tflite_files.values()):
        shutil.copy(MODELS / f.path, dst)
    return dst


def pump_model(tmp: Path | None = None, **kw: object) -> AnomalyModel:
    card = load_card(MODELS / f"{PUMP}{CARD_SUFFIX}")
    return AnomalyModel(card, MODELS, commissioning_windows=COMMISSION, state_dir=tmp, **kw)  # type: ignore[arg-type]


def commission(model: AnomalyModel, rng: np.random.Generator, subject: str = "pump-1") -> int:
    for k in range(COMMISSION):
        (r,) = model.score_batch([pump_window(k, rng, subject=subject)])
        assert math.isnan(r.score)
        assert r.verdict == "indeterminate"
        assert r.reason == "commissioning"
        assert not r.anomaly
    return COMMISSION


# ---- cards, files, backends ------------------------------------------------------------


def test_shipped_card_lists_files_whose_sha256_match() -> None:
    card = load_card(MODELS / f"{PUMP}{CARD_SUFFIX}")
    assert card.n_inputs == 14
    for spec in card.files.values():
        path = MODELS / spec.path
        assert file_sha256(path) == spec.sha256
        assert path.stat().st_size == spec.bytes < 1_000_000
    for precision in ("fp32", "int8"):
        backend = open_backend(card, MODELS, precision=precision, backend="onnxruntime")
        out = backend.run(np.zeros((3, card.n_inputs), np.float32))
        assert out.shape == (3,)
        assert np.all((out >= 0) & (out <= 1))


def test_onnx_batch1_path_scores_as_a_batch_does() -> None:
    card = load_card(MODELS / f"{PUMP}{CARD_SUFFIX}")
    backend = open_backend(card, MODELS, precision="fp32", backend="onnxruntime")
    rows = np.random.default_rng(9).standard_normal((50, card.n_inputs)).astype(np.float32)
    whole = backend.run(rows)
    one_by_one = [backend.run(rows[i : i + 1]) for i in range(len(rows))]
    assert all(r.shape == (1,) for r in one_by_one)
    # Kept results stay right: each call returns its own array, not a view of the bound output.
    np.testing.assert_allclose(np.concatenate(one_by_one), whole, rtol=1e-6, atol=1e-7)


def test_corrupted_model_file_is_refused(tmp_path: Path) -> None:
    d = copy_models(tmp_path)
    card = load_card(d / f"{PUMP}{CARD_SUFFIX}")
    path = d / card.files["fp32"].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="sha256"):
        open_backend(card, d, precision="fp32", backend="onnxruntime")


def test_malformed_model_with_matching_sha_is_refused(tmp_path: Path) -> None:
    d = copy_models(tmp_path)
    card = load_card(d / f"{PUMP}{CARD_SUFFIX}")
    path = d / card.files["fp32"].path
    path.write_bytes(b"this is not an onnx graph at all")
    entry = {"path": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}
    card = card.model_copy(update={"files": {**card.files, "fp32": card.files["fp32"].model_validate(entry)}})
    with pytest.raises(CorruptDataError, match="cannot load"):
        open_backend(card, d, precision="fp32", backend="onnxruntime")


def test_wrong_shape_model_is_refused() -> None:
    card = load_card(MODELS / f"{PUMP}{CARD_SUFFIX}")
    narrower = card.model_copy(update={"inputs": card.inputs[:12]})
    with pytest.raises(CorruptDataError, match="input shape"):
        open_backend(narrower, MODELS, precision="fp32", backend="onnxruntime")
    renamed = card.model_copy(update={"output_name": "probability"})
    with pytest.raises(CorruptDataError, match="outputs"):
        open_backend(renamed, MODELS, precision="int8", backend="onnxruntime")


def test_malformed_card_is_refused(tmp_path: Path) -> None:
    d = copy_models(tmp_path)
    path = d / f"{PUMP}{CARD_SUFFIX}"
    raw = json.loads(path.read_text())
    raw["files"]["fp32"]["sha256"] = "xyz"
    path.write_text(json.dumps(raw))
    with pytest.raises(CorruptDataError, match="sha256"):
        load_card(path)
    path.write_text("{not json")
    with pytest.raises(CorruptDataError, match="not valid JSON"):
        load_card(path)


def test_build_models_from_config_and_unknown_name(tmp_path: Path) -> None:
    section = ModelsSection(use=[ModelUse(name=PUMP, precision="int8", commissioning_s=100.0)])
    (model,) = build_models(section, hop_s=5.0, state_dir=tmp_path)
    assert model.backend.precision == "int8"
    rng = np.random.default_rng(1)
    results = [model.score_batch([pump_window(k, rng)])[0] for k in range(21)]
    assert all(math.isnan(r.score) for r in results[:20])  # 100 s / 5 s hop = 20 windows
    assert math.isfinite(results[20].score)
    with pytest.raises(ConfigError, match="no card"):
        build_models(ModelsSection(use=[ModelUse(name="nope")]), hop_s=5.0)


# ---- scoring, explanations, commissioning --------------------------------------------


def test_anomaly_carries_top_contributions_and_normal_windows_do_not_alarm() -> None:
    model = pump_model()
    rng = np.random.default_rng(2)
    k = commission(model, rng)
    normal = model.score_batch([pump_window(k + i, rng) for i in range(40)])
    # Independent noise windows: the model's false-alarm rate on SKAB is ~12 %, allow 10 % here.
    assert sum(r.anomaly for r in normal) <= 4
    # A throttled valve: flow and pressure drop, current falls.
    (bad,) = model.score_batch(
        [pump_window(99, rng, shift={"RateRMS": -0.3, "Pressure": -0.4, "Current": -0.1})]
    )
    assert bad.anomaly
    assert not bad.fallback
    assert bad.score > model.threshold
    assert 0 < len(bad.contributions) <= 5
    assert all(key.split(".")[-1] in ("mean", "std") for key in bad.contributions)
    assert 0.99 <= sum(bad.contributions.values()) <= 1.0001 or sum(bad.contributions.values()) < 1.0
    assert max(bad.contributions, key=bad.contributions.__getitem__) in ("RateRMS.mean", "Current.mean")


def test_subjects_commission_separately_and_persist(tmp_path: Path) -> None:
    model = pump_model(tmp_path)
    rng = np.random.default_rng(3)
    commission(model, rng, "pump-1")
    (other,) = model.score_batch([pump_window(50, rng, subject="pump-2")])
    assert math.isnan(other.score)  # pump-2 has not been commissioned
    again = pump_model(tmp_path)
    (r,) = again.score_batch([pump_window(60, rng)])
    assert math.isfinite(r.score)  # statistics came back from the state dir
    again.recommission("pump-1")
    (r2,) = again.score_batch([pump_window(61, rng)])
    assert math.isnan(r2.score)


def test_int8_and_fp32_agree_on_fixed_windows() -> None:
    rng = np.random.default_rng(4)
    fp32 = pump_model(precision="fp32")
    int8 = pump_model(precision="int8")
    windows = [pump_window(k, rng) for k in range(COMMISSION)]
    shifts = [
        {"RateRMS": -0.004 * i, "Thermocouple": 0.004 * (i % 5), "Current": 0.01 * (i % 3)} for i in range(60)
    ]
    tests = [pump_window(10 + i, rng, shift=s) for i, s in enumerate(shifts)]
    for m in (fp32, int8):
        m.score_batch(windows)
    a = fp32.score_batch(tests)
    b = int8.score_batch(tests)
    sa = np.array([r.score for r in a])
    sb = np.array([r.score for r in b])
    assert np.abs(sa - sb).max() < 0.05  # uint8 output steps are 1/255
    agree = np.mean([x.anomaly == y.anomaly for x, y in zip(a, b, strict=True)])
    assert agree >= 0.95
    assert any(r.anomaly for r in a)
    assert not all(r.anomaly for r in a)


# ---- self-healing ----------------------------------------------------------------------


def nan_model(tmp: Path) -> Path:
    """A card plus an ONNX graph of the right shape whose output is 0/0 = NaN."""
    onnx = pytest.importorskip("onnx", reason="onnx builds the NaN-returning test graph")
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    zero = numpy_helper.from_array(np.zeros((14, 1), np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["z", "W"], ["m"]),
        helper.make_node("Div", ["m", "m"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 14])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        [zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    d = tmp / "nanmodels"
    d.mkdir()
    (d / "nan.onnx").write_bytes(model.SerializeToString())
    raw = json.loads((MODELS / f"{PUMP}{CARD_SUFFIX}").read_text())
    entry = {
        "path": "nan.onnx",
        "sha256": file_sha256(d / "nan.onnx"),
        "bytes": (d / "nan.onnx").stat().st_size,
    }
    raw.update(
        name="nan_model", files={"fp32": entry}, tflite_files={}, dense_files={}, default_precision="fp32"
    )
    (d / f"nan_model{CARD_SUFFIX}").write_text(json.dumps(raw))
    _ = onnx
    return d


def health_events(model: AnomalyModel) -> list[Diagnostic]:
    return [e for e in model.drain_events() if isinstance(e, Diagnostic) and e.kind == "model_health"]


def test_nan_output_demotes_to_fallback_with_an_event(tmp_path: Path) -> None:
    d = nan_model(tmp_path)
    model = AnomalyModel(load_card(d / f"nan_model{CARD_SUFFIX}"), d, commissioning_windows=COMMISSION)
    rng = np.random.default_rng(5)
    commission(model, rng)
    (r,) = model.score_batch([pump_window(20, rng)])
    assert r.fallback
    assert math.isfinite(r.score)
    assert not r.anomaly
    assert model.demoted
    (ev,) = health_events(model)
    assert ev.detail["state"] == "demoted"
    assert ev.detail["reason"] == "non_finite_output"
    (bad,) = model.score_batch([pump_window(21, rng, shift={"RateRMS": -0.3})])
    assert bad.fallback
    assert bad.anomaly
    assert next(iter(bad.contributions)) == "RateRMS.mean"
    for k in range(10):
        model.score_batch([pump_window(30 + k, rng)])
    assert model.demoted  # NaN never heals
    assert model.stats()["fallback_windows"] == 12


def test_out_of_range_inputs_demote_one_subject_only_then_promote_it() -> None:
    model = pump_model()
    rng = np.random.default_rng(6)
    commission(model, rng)
    commission(model, rng, subject="pump-2")
    idle = pump_window(20, rng, shift={"Accelerometer1RMS": 3.0})
    (r, other) = model.score_batch([idle, pump_window(20, rng, subject="pump-2")])
    assert r.fallback
    assert r.anomaly
    assert model.demoted_for("pump-1")
    assert not model.demoted  # the model itself is healthy
    assert not model.demoted_for("pump-2")
    assert not other.fallback  # the other pump keeps its model verdict
    (ev,) = health_events(model)
    assert (ev.subject, ev.detail["state"], ev.detail["reason"]) == (
        "pump-1",
        "demoted",
        "input_out_of_range",
    )
    assert ev.detail["input"] == "Accelerometer1RMS.mean"
    for k in range(4):
        (r,) = model.score_batch([pump_window(21 + k, rng)])
        assert r.fallback
        assert r.verdict == "indeterminate"  # a fallback "normal" cannot end an episode
        assert r.reason == "demoted"
    (r,) = model.score_batch([pump_window(25, rng)])
    assert not model.demoted_for("pump-1")
    (ev,) = health_events(model)
    assert (ev.subject, ev.detail["state"]) == ("pump-1", "promoted")
    (r,) = model.score_batch([pump_window(26, rng)])
    assert not r.fallback
    assert math.isfinite(r.score)
    assert r.verdict == "normal"


def test_latency_overrun_is_over_budget_not_demoted_and_recovers() -> None:
    model = pump_model()
    rng = np.random.default_rng(7)
    commission(model, rng)
    tight = model.card.model_copy(
        update={"health": model.card.health.model_copy(update={"latency_budget_us": 1e-3})}
    )
    model.card = tight
    for k in range(3):
        model.score_batch([pump_window(20 + k, rng)])
    assert not model.demoted  # the fallback does not score it: "demoted" would be untrue
    assert model.over_budget
    assert model.stats()["state"] == "over_budget"
    (ev,) = health_events(model)
    assert (ev.detail["state"], ev.detail["reason"]) == ("over_budget", "latency_budget")
    assert float(ev.detail["latency_p99_us"]) > float(ev.detail["latency_budget_us"]) == 1e-3
    # Reported, but the model's own verdict still serves (the fallback would not save the time).
    (r,) = model.score_batch([pump_window(30, rng)])
    assert not r.fallback
    assert r.verdict == "normal"
    assert not model.demoted_for("pump-1")
    model.card = tight.model_copy(
        update={"health": tight.health.model_copy(update={"latency_budget_us": 1e6})}
    )
    for k in range(5):
        model.score_batch([pump_window(31 + k, rng)])
    assert model.stats()["state"] == "healthy"
    assert [e.detail["state"] for e in health_events(model)] == ["within_budget"]
    stats = model.stats()
    assert stats["budget_overruns"] == 1
    assert stats["demotions"] == 0
    assert stats["promotions"] == 0
    assert float(stats["latency_p99_us"]) > 0


def _implausible(rec: WindowRecord) -> tuple[WindowRecord, Stream]:
    """``rec`` with its flow rate's window out of its range (a negative minimum), and that stream."""
    streams = list(rec.streams)
    i = next(i for i, sf in enumerate(streams) if sf.stream.metric.name.endswith("RateRMS"))
    streams[i] = StreamFeatures(
        streams[i].stream, 20, 0.0, {"mean": 10.0, "std": 20.0, "min": -40.0, "max": 35.0}
    )
    bad = WindowRecord(
        rec.subject, rec.kind, rec.index, rec.end_mono, rec.end_wall, rec.length_s, tuple(streams)
    )
    return bad, streams[i].stream


def test_implausible_window_is_a_sensor_fault_not_an_anomaly() -> None:
    model = pump_model()
    rng = np.random.default_rng(8)
    commission(model, rng)
    bad, _ = _implausible(pump_window(20, rng))
    (r,) = model.score_batch([bad])
    assert not r.anomaly
    assert math.isnan(r.score)
    (alarm,) = model.drain_events()
    assert alarm.kind == AlarmKind.SENSOR_FAULT
    assert alarm.detail["rule"] == "range"
    assert alarm.detail["limit"] == 0.0
    model.score_batch([bad])
    assert model.drain_events() == []  # state changes only
    model.score_batch([pump_window(21, rng)])
    (restored,) = model.drain_events()
    assert restored.kind == AlarmKind.SENSOR_RESTORED


def test_an_input_fault_is_restored_only_by_a_window_that_holds_its_stream() -> None:
    model = pump_model()
    rng = np.random.default_rng(8)
    commission(model, rng)
    bad, faulty = _implausible(pump_window(20, rng))
    model.score_batch([bad])
    (fault,) = model.drain_events()
    assert fault.kind == AlarmKind.SENSOR_FAULT
    # Its source retired (the runtime ends its alarms as source_removed), or not back yet after a
    # restart: windows without the stream say nothing about it, so no restore is sent.
    for k in range(21, 24):
        rest = pump_window(k, rng)
        without = tuple(sf for sf in rest.streams if sf.stream.key != faulty.key)
        model.score_batch([WindowRecord(rest.subject, rest.kind, k, 5.0 * k, 1.7e9 + 5.0 * k, 20.0, without)])
    assert model.drain_events() == []
    model.score_batch([pump_window(24, rng)])  # back, and in range
    (restored,) = model.drain_events()
    assert isinstance(restored, Alarm)
    assert (restored.kind, restored.stream) == (AlarmKind.SENSOR_RESTORED, faulty)


def test_applies_to_kind_and_subjects() -> None:
    rng = np.random.default_rng(9)
    rec = pump_window(1, rng)
    assert pump_model().applies_to(rec)
    assert not pump_model(subjects=("pump-9",)).applies_to(rec)
    medical = WindowRecord("bed", "medical", 1, 1.0, 1.0, 20.0, rec.streams)
    assert not pump_model().applies_to(medical)


def test_card_type_roundtrip() -> None:
    card = load_card(MODELS / f"{PUMP}{CARD_SUFFIX}")
    assert ModelCard.model_validate(card.model_dump()) == card
    assert card.feature_keys()[0] == "Accelerometer1RMS.mean"
