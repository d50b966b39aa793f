"""TFLite versions of the recipes' ONNX graphs, without TensorFlow or torch (training-only).

Our graphs use a handful of ops (MatMul+Add[+Relu], Sigmoid, Sub, Div, Mul, Concat, Clip), so the
fp32 ``.tflite`` is written op for op with the flatbuffer schema and writer that ship inside the
``ai-edge-litert`` wheel (``schema_py_generated``, ``flatbuffer_utils``) instead of pulling the
multi-GB TensorFlow or litert-torch converters.  The int8 variant is LiteRT's own post-training
quantizer (the calibration wrapper the TensorFlow converter uses): int8 weights and activations,
int32 biases, per-tensor scales calibrated on the recipe's rows, float32 input and output so the
gateway feeds it the same z-scores as the ONNX model.

:func:`litert_card_fields` writes both ``.tflite`` files, checks their scores against the ONNX
ones on held-out rows and measures batch-1 latency and process memory of both runtimes; the
card's backend is chosen among all runtimes in :mod:`models.recipes.dense`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "UnsupportedGraphError",
    "alternated_us",
    "export_tflite",
    "litert_card_fields",
    "median_us",
    "onnx_to_tflite",
    "probe_growth_mb",
    "quantize_tflite",
]

F32 = npt.NDArray[np.float32]


class UnsupportedGraphError(ValueError):
    """The ONNX graph uses an op or pattern this writer does not map."""


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated  # noqa: PLC0415 - training-only dependency

    return schema_py_generated


class _Writer:
    """Builds one TFLite subgraph from ONNX tensors and ops."""

    def __init__(self, batch_free: bool = True) -> None:
        self.s = _schema()
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [self.s.BufferT()]  # buffer 0 is the empty sentinel
        self.ops: list[Any] = []
        self.codes: list[int] = []
        self.index: dict[str, int] = {}
        self._batch_free = batch_free

    def activation(self, name: str, width: int) -> int:
        """A float32 ``(batch, width)`` tensor computed at run time."""
        t = self.s.TensorT()
        t.name = name
        t.type = self.s.TensorType.FLOAT32
        t.shape = [1, width]
        t.shapeSignature = [-1, width] if self._batch_free else None
        t.buffer = 0
        self.tensors.append(t)
        self.index[name] = len(self.tensors) - 1
        return self.index[name]

    def constant(self, name: str, value: npt.NDArray[Any]) -> int:
        """A float32 constant tensor with its own buffer."""
        arr = np.ascontiguousarray(value, np.float32)
        buf = self.s.BufferT()
        buf.data = np.frombuffer(arr.tobytes(), np.uint8)
        self.buffers.append(buf)
        t = self.s.TensorT()
        t.name = name
        t.type = self.s.TensorType.FLOAT32
        t.shape = list(arr.shape)
        t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        self.index[name] = len(self.tensors) - 1
        return self.index[name]

    def op(
        self, code: int, inputs: Sequence[int], outputs: Sequence[int], opt_type: int = 0, opt: Any = None
    ) -> None:
        """Append one builtin operator."""
        if code not in self.codes:
            self.codes.append(code)
        o = self.s.OperatorT()
        o.opcodeIndex = self.codes.index(code)
        o.inputs = list(inputs)
        o.outputs = list(outputs)
        o.builtinOptionsType = opt_type
        o.builtinOptions = opt
        self.ops.append(o)

    def model(self, inp: str, out: str, description: str) -> bytes:
        """The finished model as flatbuffer bytes."""
        from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415 - training-only dependency

        s = self.s
        sub = s.SubGraphT()
        sub.tensors = self.tensors
        sub.inputs = [self.index[inp]]
        sub.outputs = [self.index[out]]
        sub.operators = self.ops
        sub.name = "main"
        codes = []
        for c in self.codes:
            oc = s.OperatorCodeT()
            oc.builtinCode = c
            oc.deprecatedBuiltinCode = min(c, 127)
            oc.version = 1
            codes.append(oc)
        m = s.ModelT()
        m.version = 3
        m.operatorCodes = codes
        m.subgraphs = [sub]
        m.buffers = self.buffers
        m.description = description
        return bytes(flatbuffer_utils.convert_object_to_bytearray(m))


def onnx_to_tflite(onnx_bytes: bytes, *, description: str = "edgetwin recipe") -> bytes:
    """The fp32 TFLite model of an ONNX graph of one ``(batch, n)`` float input and one output.

    Maps MatMul+Add (with a following Relu fused) to FULLY_CONNECTED, Sigmoid to LOGISTIC,
    Sub/Div/Mul to their element-wise ops, Concat to CONCATENATION and Clip to MAXIMUM+MINIMUM;
    anything else raises :class:`UnsupportedGraphError`.
    """
    import onnx  # noqa: PLC0415 - training-only dependency
    from onnx import numpy_helper  # noqa: PLC0415

    g = onnx.load_from_string(onnx_bytes).graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    if len(g.input) != 1 or len(g.output) != 1:
        raise UnsupportedGraphError(
            f"{len(g.input)} inputs and {len(g.output)} outputs: one of each is mapped"
        )
    inp = g.input[0].name
    width: dict[str, int] = {inp: g.input[0].type.tensor_type.shape.dim[1].dim_value}
    w = _Writer()
    s = w.s
    ops = s.BuiltinOperator
    w.activation(inp, width[inp])
    nodes = list(g.node)
    uses: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1

    def tensor(name: str) -> int:
        if name in w.index:
            return w.index[name]
        if name in consts:
            return w.constant(name, consts[name])
        raise UnsupportedGraphError(f"tensor {name!r} is used before it is computed")

    k = 0
    while k < len(nodes):
        n = nodes[k]
        op = n.op_type
        if op == "MatMul":
            x, wname = n.input
            nxt = nodes[k + 1] if k + 1 < len(nodes) else None
            if wname not in consts or nxt is None or nxt.op_type != "Add" or uses.get(n.output[0]) != 1:
                raise UnsupportedGraphError(
                    "MatMul is mapped only as a constant-weight MatMul followed by Add"
                )
            bname = next(i for i in nxt.input if i != n.output[0])
            weights = consts[wname]
            bias = np.broadcast_to(consts[bname], (weights.shape[1],))
            out = nxt.output[0]
            fused = s.ActivationFunctionType.NONE
            k += 2
            if k < len(nodes) and nodes[k].op_type == "Relu" and uses.get(out) == 1:
                fused = s.ActivationFunctionType.RELU
                out = nodes[k].output[0]
                k += 1
            opt = s.FullyConnectedOptionsT()
            opt.fusedActivationFunction = fused
            ins = [tensor(x), w.constant(wname, weights.T), w.constant(bname, bias)]
            width[out] = int(weights.shape[1])
            w.op(
                ops.FULLY_CONNECTED,
                ins,
                [w.activation(out, width[out])],
                s.BuiltinOptions.FullyConnectedOptions,
                opt,
            )
            continue
        if op in ("Sigmoid", "Relu"):
            width[n.output[0]] = width[n.input[0]]
            code = ops.LOGISTIC if op == "Sigmoid" else ops.RELU
            w.op(code, [tensor(n.input[0])], [w.activation(n.output[0], width[n.output[0]])])
        elif op in ("Sub", "Div", "Mul"):
            a, b = n.input
            width[n.output[0]] = width[a] if a in width else width[b]
            if op == "Div" and b in consts:
                # LiteRT's int8 quantizer has no DIV kernel: a constant divisor becomes a MUL by
                # its reciprocal (within a float32 rounding of the quotient)
                op, b = "Mul", f"{b}__reciprocal"
                consts[b] = np.float32(1.0) / np.asarray(consts[n.input[1]], np.float32)
            code, opt_type, opt = {
                "Sub": (ops.SUB, s.BuiltinOptions.SubOptions, s.SubOptionsT()),
                "Div": (ops.DIV, s.BuiltinOptions.DivOptions, s.DivOptionsT()),
                "Mul": (ops.MUL, s.BuiltinOptions.MulOptions, s.MulOptionsT()),
            }[op]
            w.op(code, [tensor(a), tensor(b)], [w.activation(n.output[0], width[n.output[0]])], opt_type, opt)
        elif op == "Concat":
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if axis not in (1, -1):
                raise UnsupportedGraphError(f"Concat on axis {axis}: only the feature axis is mapped")
            width[n.output[0]] = sum(width[i] for i in n.input)
            opt = s.ConcatenationOptionsT()
            opt.axis = 1
            outs = [w.activation(n.output[0], width[n.output[0]])]
            w.op(
                ops.CONCATENATION,
                [tensor(i) for i in n.input],
                outs,
                s.BuiltinOptions.ConcatenationOptions,
                opt,
            )
        elif op == "Clip":
            x, lo, hi = n.input
            mid = f"{n.output[0]}__lo"
            width[mid] = width[n.output[0]] = width[x]
            mm = s.BuiltinOptions.MaximumMinimumOptions
            w.op(
                ops.MAXIMUM,
                [tensor(x), tensor(lo)],
                [w.activation(mid, width[x])],
                mm,
                s.MaximumMinimumOptionsT(),
            )
            w.op(
                ops.MINIMUM,
                [w.index[mid], tensor(hi)],
                [w.activation(n.output[0], width[x])],
                mm,
                s.MaximumMinimumOptionsT(),
            )
        else:
            raise UnsupportedGraphError(f"op {op} is not mapped: add it to models/recipes/tflite.py")
        k += 1
    return w.model(inp, g.output[0].name, description)


def quantize_tflite(fp32: bytes, calibration: F32, *, batch: int = 64) -> bytes:
    """Full-integer int8 TFLite (float32 input and output) calibrated on ``calibration`` rows.

    LiteRT's post-training quantizer: per-tensor int8 weights and activations, int32 bias.
    """
    from ai_edge_litert import (  # noqa: PLC0415 - training-only dependency
        _pywrap_tensorflow_lite_calibration_wrapper as calib,
    )

    rows = np.ascontiguousarray(calibration, np.float32)
    hooks: list[Callable[[int], None]] = []
    wrapper = calib.CalibrationWrapper(fp32, [], hooks)
    prepared = False
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        if not prepared or len(chunk) != batch:
            wrapper.Prepare([list(chunk.shape)])
            prepared = True
        wrapper.FeedTensor([chunk])
    f32, i8, i32 = np.dtype(np.float32).num, np.dtype(np.int8).num, np.dtype(np.int32).num
    # input float32, output float32, no float fallback, int8 activations, int32 bias, per-tensor
    return bytes(wrapper.QuantizeModel(f32, f32, False, i8, i32, True, True))


def export_tflite(fp32_onnx: Path, calibration: F32, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.fp32.tflite`` and ``<stem>.int8.tflite`` beside the recipe's ONNX files."""
    fp32 = onnx_to_tflite(fp32_onnx.read_bytes(), description=f"edgetwin {stem} fp32")
    p32 = out_dir / f"{stem}.fp32.tflite"
    p8 = out_dir / f"{stem}.int8.tflite"
    p32.write_bytes(fp32)
    p8.write_bytes(quantize_tflite(fp32, calibration))
    return p32, p8


def _interpreter(model: bytes) -> Any:
    """An interpreter set up as the gateway's LiteRT backend sets it up (built-in kernels, one thread)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: PLC0415 - training-only

    return Interpreter(
        model_content=model,
        num_threads=1,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )


def tflite_scores(model: bytes, rows: F32) -> npt.NDArray[np.float64]:
    """Scores of ``rows`` through a TFLite model (one batch)."""
    it = _interpreter(model)
    idx = it.get_input_details()[0]["index"]
    it.resize_tensor_input(idx, list(rows.shape))
    it.allocate_tensors()
    it.set_tensor(idx, np.ascontiguousarray(rows, np.float32))
    it.invoke()
    return np.asarray(it.get_tensor(it.get_output_details()[0]["index"]), np.float64).reshape(len(rows))


def median_us(call: Callable[[], object], repeats: int = 3000) -> float:
    """Median microseconds of ``call`` over ``repeats`` calls after 200 warm-up calls."""
    for _ in range(200):
        call()
    times = np.empty(repeats)
    for i in range(repeats):
        t = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t
    return float(np.median(times) * 1e6)


def alternated_us(
    calls: Mapping[str, Callable[[], object]], rounds: int = 10, per_round: int = 300
) -> dict[str, float]:
    """Median microseconds of each call, the calls taking turns (``per_round`` each, ``rounds`` times).

    Taking turns puts each runtime under the same load as the others on a shared machine, so the
    figures compare even when their absolute values move.
    """
    for call in calls.values():
        for _ in range(200):
            call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            for _ in range(per_round):
                t = time.perf_counter()
                call()
                times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v) * 1e6) for k, v in times.items()}


def tflite_batch1_us(model: bytes, row: F32) -> float:
    """Median microseconds of set_tensor + invoke + get_tensor at batch 1."""
    it = _interpreter(model)
    it.allocate_tensors()
    idx, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    x = np.ascontiguousarray(row.reshape(1, -1), np.float32)

    def call() -> object:
        it.set_tensor(idx, x)
        it.invoke()
        return it.get_tensor(out)

    return median_us(call)


_RSS_PROBE = """
import sys, numpy as np
from pathlib import Path
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
kind, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = np.zeros((1, n), np.float32)
base = rss()
if kind == "litert":
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    it = Interpreter(model_content=Path(path).read_bytes(), num_threads=1,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
else:
    import onnxruntime as ort
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    s = ort.InferenceSession(Path(path).read_bytes(), sess_options=o, providers=["CPUExecutionProvider"])
    s.run(None, {s.get_inputs()[0].name: x})
print(base, rss())
"""


def probe_growth_mb(script: str, *args: str) -> float:
    """Run a probe ``script`` in a fresh interpreter from the repository; the MB between the two RSS it prints."""
    out = subprocess.run(  # noqa: S603 - our interpreter and our own probe script
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split()
    return float(out[1]) - float(out[0])


def runtime_rss_mb(kind: str, path: Path, n_inputs: int) -> float:
    """MB a fresh Python process (numpy loaded) grows by importing ``kind`` and running ``path`` once."""
    return probe_growth_mb(_RSS_PROBE, kind, str(path), str(n_inputs))


def litert_card_fields(
    onnx_fp32: Path,
    onnx_int8: Path,
    calibration: npt.NDArray[np.floating[Any]],
    check_rows: npt.NDArray[np.floating[Any]],
    threshold: float,
    default_precision: str = "fp32",
) -> dict[str, Any]:
    """Write the .tflite variants beside the ONNX files; the card's ``tflite_files`` and their evaluation.

    ``check_rows`` are the recipe's evaluation windows (held-out ones where the recipe has them).
    The card's backend is chosen among every runtime by :func:`models.recipes.dense.backend_card_fields`.
    """
    from models.recipes.common import batch1_latency_us, file_entry, run, session  # noqa: PLC0415

    onnx_files = {"fp32": onnx_fp32, "int8": onnx_int8}

    def onnx_scores(path: Path, rows: F32) -> npt.NDArray[np.float64]:
        return run(session(path), rows.astype(np.float64))

    stem = onnx_fp32.name.removesuffix(".fp32.onnx")
    p32, p8 = export_tflite(onnx_fp32, np.asarray(calibration, np.float32), onnx_fp32.parent, stem)
    rows = np.ascontiguousarray(check_rows, np.float32)
    ref = onnx_scores(onnx_files["fp32"], rows)
    ev: dict[str, Any] = {"check_rows": len(rows)}
    for prec, path in (("fp32", p32), ("int8", p8)):
        got = tflite_scores(path.read_bytes(), rows)
        same_prec = onnx_scores(onnx_files[prec], rows)
        ev[prec] = {
            "max_abs_diff_vs_onnx_fp32": float(np.abs(got - ref).max()),
            f"max_abs_diff_vs_onnx_{prec}": float(np.abs(got - same_prec).max()),
            "decision_agreement_vs_onnx_fp32": float(np.mean((got > threshold) == (ref > threshold))),
            "batch1_latency_us": tflite_batch1_us(path.read_bytes(), rows[0]),
            "onnxruntime_batch1_latency_us": batch1_latency_us(
                session(onnx_files[prec]), rows[0].astype(np.float64)
            ),
        }
    n = rows.shape[1]
    ev["process_growth_mb"] = {
        "litert": runtime_rss_mb("litert", p32 if default_precision == "fp32" else p8, n),
        "onnxruntime": runtime_rss_mb("onnxruntime", onnx_files[default_precision], n),
    }
    return {
        "tflite_files": {"fp32": file_entry(p32), "int8": file_entry(p8)},
        "litert": ev,
        "quantization": "LiteRT post-training full-integer quantization (calibration wrapper), per-tensor "
        "int8 weights and activations, int32 bias, float32 input/output",
    }


def litert_report(card: dict[str, Any]) -> str:
    """The eval report's paragraph on the .tflite variants."""
    ev = card["evaluation"]["litert"]
    return (
        f"TFLite (LiteRT) on {ev['check_rows']} evaluation windows: fp32 max |score - ONNX fp32| "
        f"{ev['fp32']['max_abs_diff_vs_onnx_fp32']:.2g}; int8 (LiteRT full-integer) max |score - ONNX fp32| "
        f"{ev['int8']['max_abs_diff_vs_onnx_fp32']:.3g}, decision agreement "
        f"{ev['int8']['decision_agreement_vs_onnx_fp32']:.4f}."
    )
