"""Shared parts of the recipes: ONNX graphs from numpy weights, static QDQ int8, cards, metrics."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.inference.card import CARD_SUFFIX, file_sha256

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

#: Where the recipes write model files and cards: this package's parent folder, ``models/``.
MODELS_DIR = Path(__file__).resolve().parent.parent
OPSET = 17
IR_VERSION = 8  # readable by onnxruntime >= 1.14


def binary_scores(pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> dict[str, float]:
    """F1, false-alarm rate (FP / negatives) and missed-alarm rate (FN / positives), SKAB style."""
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    neg = int((~truth).sum())
    pos = int(truth.sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"f1": f1, "far": fp / neg if neg else 0.0, "mar": fn / pos if pos else 0.0}


def mlp_onnx(layers: Sequence[tuple[F64, F64]], *, name: str, n_inputs: int, sigmoid: bool) -> bytes:
    """A dense network ``z -> [MatMul+Add+Relu]* -> MatMul+Add (-> Sigmoid)`` as ONNX bytes."""
    from onnx import helper, numpy_helper  # noqa: PLC0415 - training-only dependency

    nodes = []
    inits = []
    cur = "z"
    for k, (w, b) in enumerate(layers):
        inits += [
            numpy_helper.from_array(np.asarray(w, np.float32), f"W{k}"),
            numpy_helper.from_array(np.asarray(b, np.float32), f"B{k}"),
        ]
        nodes.append(helper.make_node("MatMul", [cur, f"W{k}"], [f"mm{k}"]))
        last = k == len(layers) - 1
        out = ("logit" if sigmoid else "score") if last else f"h{k}"
        nodes.append(helper.make_node("Add", [f"mm{k}", f"B{k}"], [out if last else f"a{k}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{k}"], [out]))
        cur = out
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["logit"], ["score"]))
    return graph_onnx(nodes, inits, name=name, inp=("z", n_inputs), out="score")


def graph_onnx(
    nodes: Sequence[Any], inits: Sequence[Any], *, name: str, inp: tuple[str, int], out: str
) -> bytes:
    """A checked ONNX model of one float ``(batch, n)`` input and one ``(batch, 1)`` output, as bytes."""
    import onnx  # noqa: PLC0415 - training-only dependency
    from onnx import TensorProto, helper  # noqa: PLC0415

    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(inp[0], TensorProto.FLOAT, ["batch", inp[1]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgetwin-recipes"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: F32) -> None:
    """Static QDQ int8 (per-tensor, MinMax) of ``fp32_path`` calibrated on ``calibration`` rows."""
    from onnxruntime.quantization import (  # type: ignore[import-untyped]  # noqa: PLC0415
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, rows: F32) -> None:
            self._it: Iterator[dict[str, F32]] = iter(
                {"z": rows[i : i + 64]} for i in range(0, len(rows), 64)
            )

        def get_next(self) -> dict[str, F32] | None:
            return next(self._it, None)

    quantize_static(
        str(fp32_path),
        str(int8_path),
        _Reader(np.ascontiguousarray(calibration, np.float32)),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=False,
    )


def export_fp32_int8(
    layers: Sequence[tuple[F64, F64]], calib: F64, out_dir: Path, stem: str, *, n_inputs: int
) -> tuple[Path, Path]:
    """``<stem>.fp32.onnx`` and its static-QDQ int8 twin ``<stem>.int8.onnx`` of a sigmoid network."""
    fp32 = out_dir / f"{stem}.fp32.onnx"
    int8 = out_dir / f"{stem}.int8.onnx"
    fp32.write_bytes(mlp_onnx(layers, name=stem, n_inputs=n_inputs, sigmoid=True))
    quantize_int8(fp32, int8, calib.astype(np.float32))
    return fp32, int8


def session(path: Path) -> Any:
    """A one-thread onnxruntime session on ``path`` (evaluation only)."""
    import onnxruntime as ort  # type: ignore[import-untyped]  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run(sess: Any, z: F64) -> F64:
    """Scores of rows ``z`` through a session."""
    (y,) = sess.run(["score"], {"z": np.ascontiguousarray(z, np.float32)})
    return np.asarray(y, np.float64).reshape(len(z))


def batch1_latency_us(sess: Any, row: F64, repeats: int = 3000) -> float:
    """Median microseconds of one ``run`` at batch 1."""
    x = {"z": np.ascontiguousarray(row.reshape(1, -1), np.float32)}
    out = ["score"]
    for _ in range(200):
        sess.run(out, x)
    times = np.empty(repeats)
    for i in range(repeats):
        t = time.perf_counter()
        sess.run(out, x)
        times[i] = time.perf_counter() - t
    return float(np.median(times) * 1e6)


def latency_figures(s32: Any, s8: Any, row: F64) -> dict[str, float]:
    """Batch-1 microseconds of the fp32 and int8 sessions on one row, and their ratio."""
    lat32 = batch1_latency_us(s32, row)
    lat8 = batch1_latency_us(s8, row)
    return {"fp32": lat32, "int8": lat8, "int8_over_fp32": lat8 / lat32}


def file_entry(path: Path) -> dict[str, Any]:
    """The card's entry for one model file: path relative to the models folder, sha256, size."""
    return {"path": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def write_npz(path: Path, arrays: dict[str, npt.NDArray[Any]]) -> Path:
    """Write arrays as an uncompressed ``.npz`` whose bytes (and sha256) are the same on every run."""
    buf = io.BytesIO()
    # np.savez stamps each entry with the current time; fixed stamps keep the bytes the same
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    path.write_bytes(buf.getvalue())
    return path


def write_card(card: dict[str, Any], out_dir: Path) -> Path:
    """Write ``<name>.card.json`` (sorted keys, stable across runs)."""
    path = out_dir / f"{card['name']}{CARD_SUFFIX}"
    path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def rounded(obj: Any, digits: int = 4) -> Any:
    """Floats in a nested structure rounded for a readable card."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    return obj
