"""Real ONNX models and cards for the model-bundle tests: a plain scorer, an alarm storm, one that turns NaN."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gateway.inference.build import default_models_dir

MODELS = default_models_dir()
PUMP = "pump_skab"
N_INPUTS = 14
# A pump scored by the shipped pump model, commissioned over its first 5 one-second hops.
# Time is compressed and the machine shared: the CPU budget is out of scope here (bench_downlink).
PUMP_SITE = f"""
[models]
use = [{{ name = "{PUMP}", commissioning_s = 5.0, latency_budget_us = 1e9 }}]
[models.streams]
enabled = false

[[sources]]
name = "pump3-sim"
driver = "sim"
subject = "pump3-subject"
kind = "industrial"
profile = "pump"
device = "SN-PLC-1"
rate_hz = 4.0
"""
LOOSE_HEALTH = {"latency_budget_us": 1e9, "overruns_to_demote": 3, "ood_z": 1000.0, "healthy_to_promote": 5}


def onnx_model(
    *, constant: float | None = None, nan_above: float | None = None, alarm_above: float | None = None,
    pad_bytes: int = 0, pad_seed: int = 1,
) -> bytes:  # fmt: skip
    """A pump model over the card's 14 inputs ``z``: ``sigmoid(0.01 * sum(z) - 4)`` (low on normal data).

    ``constant``: every score is this (above the threshold: an alarm storm).  ``nan_above``: the score
    is NaN once any ``|z|`` exceeds it (``sqrt`` of a negative number), finite below.  ``pad_bytes``:
    a weight of that size the graph reads (to make a large file).  ``alarm_above``: the score is
    ``sigmoid(10 * (max |z| - alarm_above))`` instead, an anomaly on every window far from normal.
    """
    nodes = [
        helper.make_node("ReduceSum", ["z", "axis"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "k"], ["ks"]),
        helper.make_node("Add", ["ks", "b"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["y0"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
        numpy_helper.from_array(np.array(0.0 if constant is not None else 0.01, np.float32), "k"),
        numpy_helper.from_array(
            np.array(np.log(constant / (1 - constant)) if constant is not None else -4.0, np.float32), "b"
        ),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    last = "y0"
    if alarm_above is not None:
        nodes += [
            helper.make_node("Abs", ["z"], ["az2"]),
            helper.make_node("ReduceMax", ["az2"], ["m2"], axes=[1], keepdims=0),
            helper.make_node("Sub", ["m2", "alarm_at"], ["over"]),
            helper.make_node("Mul", ["over", "ten"], ["over10"]),
            helper.make_node("Sigmoid", ["over10"], ["ya"]),
        ]
        inits += [
            numpy_helper.from_array(np.array(alarm_above, np.float32), "alarm_at"),
            numpy_helper.from_array(np.array(10.0, np.float32), "ten"),
        ]
        last = "ya"
    if nan_above is not None:
        nodes += [
            helper.make_node("Abs", ["z"], ["az"]),
            helper.make_node("ReduceMax", ["az"], ["m"], axes=[1], keepdims=0),
            helper.make_node("Sub", ["limit", "m"], ["room"]),
            helper.make_node("Sqrt", ["room"], ["root"]),  # NaN once room < 0
            helper.make_node("Mul", ["root", "zero"], ["nan_or_zero"]),
            helper.make_node("Add", [last, "nan_or_zero"], ["y1"]),
        ]
        inits.append(numpy_helper.from_array(np.array(nan_above, np.float32), "limit"))
        last = "y1"
    if pad_bytes:
        pad = np.random.default_rng(pad_seed).standard_normal(pad_bytes // 4).astype(np.float32)
        nodes += [
            helper.make_node("ReduceSum", ["pad"], ["padsum"], keepdims=0),
            helper.make_node("Mul", ["padsum", "zero"], ["padzero"]),
            helper.make_node("Add", [last, "padzero"], ["y2"]),
        ]
        inits.append(numpy_helper.from_array(pad, "pad"))
        last = "y2"
    nodes.append(helper.make_node("Identity", [last], ["score"]))
    graph = helper.make_graph(
        nodes,
        "bundle_test",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, N_INPUTS])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def card_for(
    model: bytes, *, version: str = "1.1.0", file: str = "pump_skab.v2.onnx", **changes: Any
) -> bytes:
    """The shipped pump card for ``model`` (one fp32 file bound by hash), with ``changes``."""
    card = json.loads((MODELS / f"{PUMP}.card.json").read_text())
    card.update(
        version=version,
        files={"fp32": {"path": file, "sha256": hashlib.sha256(model).hexdigest(), "bytes": len(model)}},
        default_precision="fp32",
        tflite_files={},
    )
    card.update(changes)
    return json.dumps(card).encode()


def shipped_int8() -> tuple[bytes, bytes]:
    """The shipped int8 pump model and a card serving it as a new version (a model that agrees)."""
    model = (MODELS / "pump_skab.int8.onnx").read_bytes()
    return model, card_for(model, file="pump_skab.int8.onnx")


def tampered_weights() -> bytes:
    """The shipped numpy weights with one weight changed: a valid archive whose reference scores no longer hold."""
    with np.load(MODELS / f"{PUMP}.fp32.dense.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["w0"] = arrays["w0"].copy()
    arrays["w0"][0, 0] += 0.5
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def write(directory: Path, card: bytes, model: bytes) -> Path:
    """Card and model into ``directory`` (as an installed version is laid out); the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = json.loads(card)["files"]["fp32"]
    (directory / f"{PUMP}.card.json").write_bytes(card)
    (directory / spec["path"]).write_bytes(model)
    return directory


def litert_card(**tflite_entry: Any) -> bytes:
    """The shipped pump card as a version whose card chose LiteRT (``tflite_entry``: its fp32 file's entry changed)."""
    card = json.loads((MODELS / f"{PUMP}.card.json").read_text())
    card["backend"] = "litert"
    card["tflite_files"]["fp32"].update(tflite_entry)
    return json.dumps(card).encode()
