"""numpy weights of the recipes' dense ONNX graphs, and the card's backend chosen by measurement.

A graph that is only constant-weight MatMul+Add layers, each optionally followed by Relu or (last)
Sigmoid, is written as ``<stem>.fp32.dense.npz``: ``w<i>``, ``b<i>``, ``act`` and reference rows
``ref_x`` with their onnxruntime fp32 scores ``ref_y``, which the gateway's numpy backend must
reproduce within ``DENSE_TOLERANCE`` at load.  fp32 only: an int8 numpy path would either compute
in float (and not be int8) or re-implement the quantizer's rounding; the int8 model stays with
onnxruntime and LiteRT.

:func:`backend_card_fields` is what a recipe calls after writing its ONNX files: the LiteRT fields
(:func:`models.recipes.tflite.litert_card_fields`), the numpy weights where the graph allows them,
checked on every evaluation row, and the card's ``backend`` chosen from the batch-1 latency and
process growth of every runtime measured the same way (numpy's: the gateway's backend on one
float32 row, the path a window is scored on; :data:`BATCH1_PATH`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.inference.backends import DENSE_TOLERANCE, dense_forward, open_backend
from gateway.inference.card import load_card
from models.recipes.common import write_npz
from models.recipes.tflite import UnsupportedGraphError, litert_card_fields, median_us, probe_growth_mb

__all__ = [
    "BATCH1_PATH",
    "REFERENCE_ROWS",
    "backend_card_fields",
    "choose_backend",
    "dense_layers",
    "export_dense",
    "served_batch1_us",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: Evaluation rows kept in the weights file as the load-time check (evenly spaced, deterministic).
REFERENCE_ROWS = 256
#: Batch-1 microseconds within which runtimes count as equally fast: 5 % of the 200 us per-window
#: budget (features included), far below what one scheduling hiccup costs on a shared core.
SAME_SPEED_US = 10.0


def dense_layers(onnx_bytes: bytes) -> list[tuple[F32, F32, str]]:
    """The ``(weights, bias, activation)`` layers of a dense-only ONNX graph, else UnsupportedGraphError."""
    import onnx  # noqa: PLC0415 - training-only dependency
    from onnx import numpy_helper  # noqa: PLC0415

    g = onnx.load_from_string(onnx_bytes).graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    if len(g.input) != 1 or len(g.output) != 1:
        raise UnsupportedGraphError(
            f"{len(g.input)} inputs and {len(g.output)} outputs: one of each is mapped"
        )
    nodes, layers = list(g.node), []
    current = g.input[0].name
    k = 0
    while k < len(nodes):
        mm = nodes[k]
        add = nodes[k + 1] if k + 1 < len(nodes) else None
        if mm.op_type != "MatMul" or add is None or add.op_type != "Add" or mm.input[0] != current:
            raise UnsupportedGraphError(f"node {k} ({mm.op_type}): only MatMul+Add[+Relu|Sigmoid] chains map")
        wname = mm.input[1]
        bname = next((i for i in add.input if i != mm.output[0]), "")
        if wname not in consts or bname not in consts:
            raise UnsupportedGraphError(f"node {k}: weights or bias are not constants")
        w = np.asarray(consts[wname], np.float32)
        b = np.broadcast_to(np.asarray(consts[bname], np.float32), (w.shape[1],)).copy()
        current, act, k = add.output[0], "identity", k + 2
        if k < len(nodes) and nodes[k].op_type in ("Relu", "Sigmoid") and nodes[k].input[0] == current:
            act = nodes[k].op_type.lower()
            current, k = nodes[k].output[0], k + 1
        layers.append((w, b, act))
    if current != g.output[0].name:
        raise UnsupportedGraphError("the chain does not end at the graph's output")
    return layers


def export_dense(fp32_onnx: Path, ref_x: F32, ref_y: F64) -> Path:
    """Write ``<stem>.fp32.dense.npz`` beside the ONNX file (deterministic bytes for the same inputs)."""
    layers = dense_layers(fp32_onnx.read_bytes())
    arrays: dict[str, npt.NDArray[Any]] = {"act": np.array([a for _, _, a in layers])}
    for i, (w, b, _) in enumerate(layers):
        arrays[f"w{i}"], arrays[f"b{i}"] = w, b
    arrays["ref_x"], arrays["ref_y"] = np.ascontiguousarray(ref_x, np.float32), np.asarray(ref_y, np.float64)
    return write_npz(fp32_onnx.with_name(fp32_onnx.name.removesuffix(".onnx") + ".dense.npz"), arrays)


_RSS_PROBE = """
import sys, numpy as np
from pathlib import Path
from gateway.inference import backends
from gateway.inference.card import load_card
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
card_path, kind = Path(sys.argv[1]), sys.argv[2]
card = load_card(card_path)
x = np.zeros((1, card.n_inputs), np.float32)
base = rss()
b = backends.open_backend(card, card_path.parent, backend=kind)
b.run(x)
print(base, rss())
"""


#: What ``evaluation.backends.numpy.fp32.batch1_latency_us`` times (cards recorded without it
#: timed the layers in numpy, :func:`dense_forward` on a float64 row).
BATCH1_PATH = "the gateway's numpy backend on one float32 row (the window-at-a-time path)"


def served_batch1_us(card_path: Path, row: F32) -> float:
    """Median microseconds of the numpy backend's call on one float32 row, as the gateway scores a window."""
    served = open_backend(load_card(card_path), card_path.parent, precision="fp32", backend="numpy")
    x1 = np.ascontiguousarray(row.reshape(1, -1), np.float32)
    return median_us(functools.partial(served.run, x1))


def process_growth_mb(card_path: Path, kind: str) -> float:
    """MB a fresh process (numpy and the gateway's backends module loaded) grows by serving on ``kind``."""
    return probe_growth_mb(_RSS_PROBE, str(card_path), kind)


def choose_backend(figures: dict[str, dict[str, float]]) -> str:
    """The leanest runtime among those within SAME_SPEED_US of the fastest at batch 1."""
    fastest = min(f["batch1_us"] for f in figures.values())
    near = [k for k, f in figures.items() if f["batch1_us"] <= fastest + SAME_SPEED_US]
    return min(near, key=lambda k: (figures[k]["process_growth_mb"], figures[k]["batch1_us"]))


def backend_card_fields(
    onnx_fp32: Path,
    onnx_int8: Path,
    calibration: npt.NDArray[np.floating[Any]],
    check_rows: npt.NDArray[np.floating[Any]],
    card: dict[str, Any],
) -> dict[str, Any]:
    """The card's ``tflite_files``, ``dense_files``, ``backend`` and its evaluation of every runtime.

    ``card`` is the card as far as the recipe has written it (inputs, files, normalisation); the
    runtimes are measured on it in a scratch card beside the model files, removed afterwards.
    """
    from models.recipes.common import file_entry, run, session  # noqa: PLC0415

    threshold = float(card["threshold"])
    lite = litert_card_fields(onnx_fp32, onnx_int8, calibration, check_rows, threshold)
    rows = np.ascontiguousarray(check_rows, np.float32)
    ref = run(session(onnx_fp32), rows.astype(np.float64))
    pick = np.linspace(0, len(rows) - 1, min(REFERENCE_ROWS, len(rows))).round().astype(int)
    dense: dict[str, Any] = {
        "precisions": "fp32 only: an int8 numpy path would compute in float or re-implement the "
        "quantizer's rounding; int8 serves on onnxruntime or LiteRT"
    }
    try:
        npz = export_dense(onnx_fp32, rows[pick], ref[pick])
    except UnsupportedGraphError as exc:
        dense["fp32"] = {"unsupported": str(exc)}
        npz = None
    if npz is not None:
        layers = [
            (w.astype(np.float64), b.astype(np.float64), a)
            for w, b, a in dense_layers(onnx_fp32.read_bytes())
        ]
        got = dense_forward(rows.astype(np.float64), layers)
        worst = float(np.abs(got - ref).max())
        if not worst <= DENSE_TOLERANCE:
            raise UnsupportedGraphError(
                f"numpy scores differ from onnxruntime by {worst:.3g} on the check rows"
            )
        dense["fp32"] = {
            "max_abs_diff_vs_onnx_fp32": worst,
            "decision_agreement_vs_onnx_fp32": float(np.mean((got > threshold) == (ref > threshold))),
            "reference_rows": len(pick),
        }
    fields = {"tflite_files": lite["tflite_files"], "dense_files": {"fp32": file_entry(npz)} if npz else {}}
    scratch = onnx_fp32.parent / f".{card['name']}.measure.card.json"
    scratch.write_text(json.dumps({**card, **fields, "backend": "onnxruntime"}), encoding="utf-8")
    try:
        if npz is not None:
            dense["fp32"]["batch1_latency_us"] = served_batch1_us(scratch, rows[:1])
            dense["fp32"]["batch1_path"] = BATCH1_PATH
        prec = card["default_precision"]
        figures = {
            "onnxruntime": {"batch1_us": lite["litert"][prec]["onnxruntime_batch1_latency_us"]},
            "litert": {"batch1_us": lite["litert"][prec]["batch1_latency_us"]},
        }
        if npz is not None and prec == "fp32":
            figures["numpy"] = {"batch1_us": dense["fp32"]["batch1_latency_us"]}
        for kind, fig in figures.items():
            fig["process_growth_mb"] = process_growth_mb(scratch, kind)
    finally:
        scratch.unlink(missing_ok=True)
    backend = choose_backend(figures)
    choice = f"{backend}: {prec} batch 1 " + ", ".join(
        f"{k} {f['batch1_us']:.2f} us / {f['process_growth_mb']:.1f} MB" for k, f in figures.items()
    )
    choice += f"; the leanest within {SAME_SPEED_US:g} us of the fastest"
    return {
        **fields,
        "backend": backend,
        "litert": lite["litert"],
        "quantization": lite["quantization"],
        "backends": {"numpy": dense, "measured": figures, "choice": choice},
    }


def backends_report(card: dict[str, Any]) -> str:
    """The eval report's sentence on the numpy weights and the runtime the card serves on."""
    ev = card["evaluation"]["backends"]
    d = ev["numpy"].get("fp32", {})
    head = (
        f"numpy (dense layers, fp32 only) max |score - ONNX fp32| {d['max_abs_diff_vs_onnx_fp32']:.2g} on "
        f"the same windows, {d['reference_rows']} of them kept in the weights file as its load-time check. "
        if "max_abs_diff_vs_onnx_fp32" in d
        else f"numpy: {d.get('unsupported', 'not written')}. "
    )
    return head + f"Backend {card['backend']}: {ev['choice'].split(': ', 1)[1]}."
