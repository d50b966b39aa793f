"""Inference backends: onnxruntime on the CPU (one thread by default), LiteRT where it installs, numpy.

A backend is opened from verified bytes (see :func:`gateway.inference.card.read_verified`) and
checked against the card: a graph whose input or output does not have the card's name and width
is refused before it scores anything.  ``run`` takes a float32 ``(batch, n_inputs)`` array and
returns a float64 ``(batch,)`` array of scores; it is called from one worker thread at a time.
The numpy backend serves graphs of dense layers only (their weights exported by the recipe) with
no runtime beyond numpy, which the gateway imports anyway: for the shipped models a runtime's
resident libraries cost more memory than everything else the models need.
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import operator
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from gateway.compiled import compiled
from gateway.errors import ConfigError, CorruptDataError
from gateway.inference.card import ModelCard, read_verified

__all__ = [
    "BACKENDS",
    "COMPILED",
    "DENSE_ACTIVATIONS",
    "DENSE_BATCH1_TOLERANCE",
    "DENSE_TOLERANCE",
    "LITERT_INTERPRETER_MODULES",
    "Backend",
    "DenseBackend",
    "GraphCard",
    "LiteRtBackend",
    "OnnxBackend",
    "dense_forward",
    "litert_interpreter_class",
    "open_backend",
    "wanted_backend",
]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
#: Dense layers as the compiled row takes them: (weights, bias, activation's index in DENSE_ACTIVATIONS).
_Packed = tuple[tuple[F64, F64, int], ...]
#: The compiled batch-1 forward (``gateway/_window.c``): a (1,) score, or None where numpy must run.
_compiled: Callable[[F32 | F64, object], F64 | None] | None = compiled("dense_row")
#: The compiled scores of an anomaly's occlusion probes (see DenseBackend.occlusion).
_occlusion: Callable[[F64, float, object], F64 | None] | None = compiled("dense_occlusion")
#: The layers exported once for both (an opaque handle, or None where they are not of its layout):
#: either takes it, or the layers themselves.
_net_of: Callable[[_Packed], object] | None = compiled("dense_net")
#: True where a window's score through dense layers runs compiled (``gateway/_window.c``).
COMPILED = _compiled is not None


class GraphCard(Protocol):
    """What a graph runtime checks a model file against (a model card, or a RUL card)."""

    @property
    def name(self) -> str: ...
    @property
    def n_inputs(self) -> int: ...
    @property
    def input_name(self) -> str: ...
    @property
    def output_name(self) -> str: ...


class Backend(Protocol):
    """Runs one model on a batch of input vectors."""

    name: str  # "onnxruntime", "litert" or "numpy"
    precision: str

    def run(self, x: F32) -> F64:
        """Scores of a ``(batch, n_inputs)`` float32 array, one per row."""


def _dims(shape: Any) -> list[int | None]:
    return [d if isinstance(d, int) else None for d in shape]


class OnnxBackend:
    """onnxruntime CPU session, sequential, ``threads`` intra-op threads (1 keeps a core for I/O)."""

    name = "onnxruntime"

    def __init__(self, card: GraphCard, model: bytes, precision: str, *, threads: int = 1) -> None:
        try:
            ort = importlib.import_module("onnxruntime")
        except ImportError as exc:
            raise ConfigError(
                f"models {card.name}: onnxruntime is not installed: models need it: "
                "pip install 'edgetwin[models]'"
            ) from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for malformed graphs
            raise CorruptDataError(
                f"models {card.name} ({precision}): onnxruntime cannot load the model: "
                f"{type(exc).__name__}: restore the file from the release or re-run the recipe"
            ) from exc
        self.precision = precision
        self._check(card)
        self._in = card.input_name
        self._out = [card.output_name]
        self._io, self._x1, self._y1 = self._bind_batch1(card)

    def _bind_batch1(self, card: GraphCard) -> tuple[Any, F32, F32]:
        """The window-at-a-time path: input and output bound once to preallocated arrays.

        ``run`` with a feed dict validates names and allocates the input and output tensors on
        every call; at batch 1 that is more than half the call (measured in bench_models.py).
        """
        out = next(o for o in self._sess.get_outputs() if o.name == card.output_name)
        x1 = np.zeros((1, card.n_inputs), np.float32)
        y1 = np.zeros((1, 1) if len(out.shape) == 2 else (1,), np.float32)
        ins = self._sess.get_inputs()
        if ins[0].type != "tensor(float)" or out.type != "tensor(float)":
            return None, x1, y1
        io = self._sess.io_binding()
        io.bind_input(self._in, "cpu", 0, np.float32, list(x1.shape), x1.ctypes.data)
        io.bind_output(card.output_name, "cpu", 0, np.float32, list(y1.shape), y1.ctypes.data)
        return io, x1, y1

    def _check(self, card: GraphCard) -> None:
        ins = {i.name: i for i in self._sess.get_inputs()}
        outs = {o.name: o for o in self._sess.get_outputs()}
        problem = ""
        if card.input_name not in ins or len(ins) != 1:
            problem = f"inputs {sorted(ins)}, card says [{card.input_name!r}]"
        elif card.output_name not in outs:
            problem = f"outputs {sorted(outs)}, card says {card.output_name!r}"
        else:
            shape = _dims(ins[card.input_name].shape)
            if len(shape) != 2 or shape[1] != card.n_inputs:
                problem = f"input shape {ins[card.input_name].shape}, card needs (batch, {card.n_inputs})"
            elif "float" not in str(ins[card.input_name].type):
                problem = f"input type {ins[card.input_name].type}, card needs float"
            else:
                oshape = _dims(outs[card.output_name].shape)
                if not (len(oshape) == 1 or (len(oshape) == 2 and oshape[1] == 1)):
                    problem = (
                        f"output shape {outs[card.output_name].shape}, card needs (batch,) or (batch, 1)"
                    )
        if problem:
            raise CorruptDataError(
                f"models {card.name} ({self.precision}): graph does not match its card: {problem}: "
                "ship the card that was written with this model file"
            )

    def run(self, x: F32) -> F64:
        """Scores of a ``(batch, n_inputs)`` float32 array."""
        if len(x) == 1 and self._io is not None:
            np.copyto(self._x1, x)
            self._sess.run_with_iobinding(self._io)
            return self._y1.astype(np.float64).reshape(1)
        (y,) = self._sess.run(self._out, {self._in: x})
        return np.asarray(y, np.float64).reshape(len(x))


#: Where the LiteRT ``Interpreter`` class is looked for, in order: ai-edge-litert, then tflite-runtime.
LITERT_INTERPRETER_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def litert_interpreter_class() -> Any | None:
    """The LiteRT ``Interpreter`` class from ai-edge-litert or tflite-runtime, or None."""
    for module in LITERT_INTERPRETER_MODULES:
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    return None


class LiteRtBackend:
    """TFLite model through ai-edge-litert (or tflite-runtime), one thread.

    One interpreter per batch size seen (at most ``MAX_SHAPES``): resizing one interpreter back and
    forth between the scoring batch and the explanation batch would re-plan its tensors on every
    switch, which costs more than the model itself.  The built-in kernels run without the default
    XNNPACK delegate: for models this small it saves under a microsecond a call, and it writes an
    unformatted line to stderr (the journal) for every interpreter it is created for.
    """

    name = "litert"
    MAX_SHAPES = 4

    def __init__(self, card: GraphCard, model: bytes, precision: str, interpreter_class: Any) -> None:
        self._model = model
        self._cls = interpreter_class
        resolver = getattr(sys.modules.get(interpreter_class.__module__), "OpResolverType", None)
        self._kwargs: dict[str, Any] = (
            {}
            if resolver is None
            else {"experimental_op_resolver_type": resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
        )
        self.precision = precision
        try:
            interp = self._open(None)
        except Exception as exc:  # the interpreter raises untyped errors for malformed models
            raise CorruptDataError(
                f"models {card.name} ({precision}): LiteRT cannot load the model: {type(exc).__name__}: "
                "restore the file from the release or re-run the recipe"
            ) from exc
        ins, outs = interp[0].get_input_details(), interp[0].get_output_details()
        problem = ""
        if len(ins) != 1 or len(outs) != 1:
            problem = f"{len(ins)} inputs and {len(outs)} outputs, card needs one of each"
        elif len(ins[0]["shape"]) != 2 or int(ins[0]["shape"][1]) != card.n_inputs:
            problem = f"input shape {list(ins[0]['shape'])}, card needs (batch, {card.n_inputs})"
        elif ins[0]["dtype"] != np.float32:
            problem = f"input type {np.dtype(ins[0]['dtype']).name}, card needs float32"
        elif not (
            len(outs[0]["shape"]) == 1 or (len(outs[0]["shape"]) == 2 and int(outs[0]["shape"][1]) == 1)
        ):
            problem = f"output shape {list(outs[0]['shape'])}, card needs (batch,) or (batch, 1)"
        if problem:
            raise CorruptDataError(
                f"models {card.name} ({precision}): LiteRT model does not match its card: {problem}: "
                "ship the card written with this model file"
            )
        self._width = card.n_inputs
        self._by_batch: dict[int, tuple[Any, int, int]] = {int(ins[0]["shape"][0]): interp}

    def _open(self, batch: int | None) -> tuple[Any, int, int]:
        interp = self._cls(model_content=self._model, num_threads=1, **self._kwargs)
        idx = interp.get_input_details()[0]["index"]
        if batch is not None:
            interp.resize_tensor_input(idx, [batch, self._width])
        interp.allocate_tensors()
        return interp, idx, interp.get_output_details()[0]["index"]

    def run(self, x: F32) -> F64:
        """Scores of a ``(batch, n_inputs)`` float32 array."""
        n = len(x)
        got = self._by_batch.get(n)
        if got is None:
            if len(self._by_batch) >= self.MAX_SHAPES:
                # The oldest shape, but never batch 1: a window at a time is the common call.
                del self._by_batch[next(k for k in self._by_batch if k != 1)]
            got = self._by_batch[n] = self._open(n)
        interp, idx, out = got
        interp.set_tensor(idx, x)
        interp.invoke()
        return np.asarray(interp.get_tensor(out), np.float64).reshape(n)


#: Activations a dense layer of the numpy backend may end with ("identity": none).
DENSE_ACTIVATIONS = ("identity", "relu", "sigmoid")
#: Largest |score - recorded onnxruntime score| the numpy backend accepts on the reference rows.
DENSE_TOLERANCE = 1e-5


def dense_forward(x: F32 | F64, layers: list[tuple[F64, F64, str]]) -> F64:
    """Scores of ``x`` through dense layers ``(weights (n_in, n_out), bias (n_out,), activation)``.

    The float64 weights make every product float64, float32 input included, so ``x`` is not
    copied to float64 first.
    """
    return _layers_forward(x, layers).reshape(len(x))


def _layers_forward(x: F32 | F64, layers: list[tuple[F64, F64, str]]) -> F64:
    """Outputs ``(batch, n_out)`` of ``x`` through dense layers (see :func:`dense_forward`)."""
    y = x
    for w, b, act in layers:
        y = y @ w
        y += b
        if act == "relu":
            np.maximum(y, 0.0, out=y)
        elif act == "sigmoid":
            # tanh form: no overflow warning for large |y|, and exact to float64 rounding
            np.tanh(y * 0.5, out=y)
            y += 1.0
            y *= 0.5
    return cast("F64", y)


#: Largest |score| difference between a window scored alone and the same row in a batch: the
#: window's dot products are summed in Python, the batch's by BLAS, in another order (a few
#: float64 roundings of the pre-activation; measured: at most 1.1e-16 on the shipped models).
DENSE_BATCH1_TOLERANCE = 1e-12


def _activate(y: float, act: str) -> float:
    """One output's activation in Python, the function :func:`_layers_forward` applies."""
    if act == "relu":
        return max(y, 0.0)  # NaN stays NaN, as with np.maximum
    if act == "sigmoid":
        return (math.tanh(y * 0.5) + 1.0) * 0.5
    return y


class DenseBackend:
    """A graph of dense layers in numpy (float64 arithmetic on the float32 weights), fp32 only.

    The weights file (``.dense.npz``, written by the recipe from the ONNX graph) carries
    ``w<i>``, ``b<i>``, ``act`` (one activation per layer) and reference rows ``ref_x`` with
    onnxruntime's scores ``ref_y``; a file whose layers do not chain, do not match the card or
    do not reproduce the recorded scores within :data:`DENSE_TOLERANCE` is refused at load.
    """

    name = "numpy"

    def __init__(self, card: ModelCard, data: bytes, precision: str) -> None:
        self.precision = precision
        self._layers, ref_x, ref_y = self._parse(card, data)
        # At batch 1 the last layer (one output) is a dot product in Python floats: numpy's
        # matmul of a float32 row by float64 weights goes through its casting machinery and BLAS,
        # 20-25 us of code a busy neighbour evicts, for 14 products (bench_models.py --evict).
        *self._hidden, (w, b, act) = self._layers
        self._last = (w[:, 0].tolist(), float(b[0]), act)
        # Compiled, the whole row is one call: every layer a dot product in input order, the last
        # one the same to the bit as the Python sum below, the hidden ones within
        # DENSE_BATCH1_TOLERANCE of BLAS (vitals_mimic's call cold: 21 -> 3 us).
        self._packed: _Packed = tuple(
            (np.ascontiguousarray(w), np.ascontiguousarray(b), DENSE_ACTIVATIONS.index(a))
            for w, b, a in self._layers
        )
        # Exported once here, not at every window: numpy describes an array anew at each export,
        # code a cold window would touch twice per layer.  Released with the backend.
        net = None if _net_of is None else _net_of(self._packed)
        self._net: object = self._packed if net is None else net
        got = self.run(ref_x)
        # The window-at-a-time path (see run) must reproduce them too.
        one = np.array([self.run(ref_x[i : i + 1])[0] for i in range(len(ref_x))])
        diff = np.maximum(np.abs(got - ref_y), np.abs(one - ref_y))
        worst = float(np.max(diff)) if len(ref_y) else float("inf")
        if not worst <= DENSE_TOLERANCE:
            raise CorruptDataError(
                f"models {card.name} ({precision}): numpy weights do not reproduce the recorded "
                f"onnxruntime scores on {len(ref_y)} reference rows (max |diff| {worst:.3g}, allowed "
                f'{DENSE_TOLERANCE:g}): re-run the model\'s recipe, or set backend = "onnxruntime"'
            )

    def _parse(self, card: ModelCard, data: bytes) -> tuple[list[tuple[F64, F64, str]], F32, F64]:
        def refuse(problem: str) -> CorruptDataError:
            return CorruptDataError(
                f"models {card.name} ({self.precision}): numpy weights file: {problem}: "
                "re-run the model's recipe to write it"
            )

        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # numpy's and zipfile's errors
            raise refuse(f"not a numpy archive ({type(exc).__name__})") from exc
        odd = sorted(k for k, a in arrays.items() if k != "act" and a.dtype.kind != "f")
        if odd:
            raise refuse(f"arrays {odd} are not floating point")
        acts = [str(a) for a in arrays.get("act", np.array([], str)).reshape(-1)]
        if not acts or any(a not in DENSE_ACTIVATIONS for a in acts):
            raise refuse(f"activations {acts}, each must be one of {', '.join(DENSE_ACTIVATIONS)}")
        layers: list[tuple[F64, F64, str]] = []
        width = card.n_inputs
        for i, act in enumerate(acts):
            w, b = arrays.get(f"w{i}"), arrays.get(f"b{i}")
            if w is None or b is None or w.ndim != 2 or b.shape != (w.shape[1],) or w.shape[0] != width:
                shapes = "missing" if w is None or b is None else f"{w.shape} and {b.shape}"
                raise refuse(f"layer {i}: weights and bias {shapes}, need ({width}, n) and (n,)")
            layers.append((w.astype(np.float64), b.astype(np.float64), act))
            width = w.shape[1]
        if width != 1:
            raise refuse(f"the last layer has {width} outputs, the card needs one score")
        ref_x, ref_y = arrays.get("ref_x"), arrays.get("ref_y")
        if ref_x is None or ref_y is None or ref_x.ndim != 2 or ref_x.shape[1] != card.n_inputs:
            raise refuse(f"no reference rows of width {card.n_inputs} (ref_x, ref_y)")
        if len(ref_x) != len(ref_y) or len(ref_y) == 0:
            raise refuse(f"{len(ref_x)} reference rows and {len(ref_y)} reference scores")
        return layers, ref_x.astype(np.float32), ref_y.astype(np.float64).reshape(-1)

    def run(self, x: F32) -> F64:
        """Scores of a ``(batch, n_inputs)`` float32 array."""
        if len(x) != 1:
            return dense_forward(x, self._layers)
        if _compiled is not None:
            y = _compiled(x, self._net)
            if y is not None:
                return y
        return self.run_numpy(x)

    def occlusion(self, z: F64, clip: float) -> F64 | None:
        """Scores ``(k, n + 1)`` of each row of ``z`` with each input at 0 in turn, then as it is, compiled.

        The rows are clipped to +-``clip`` and rounded to float32 as the runner's occlusion probes
        are; every score is summed in input order, as a window scored alone.  None where nothing
        was compiled: the runner then builds the probes and calls :meth:`run`.
        """
        return None if _occlusion is None else _occlusion(z, clip, self._net)

    def run_numpy(self, x: F32) -> F64:
        """The score of one row (``(1, n_inputs)``) in numpy and Python floats: where nothing was compiled."""
        w, b, act = self._last
        # Hidden layers on a float64 row: a matmul of equal types skips the casting path.
        h = _layers_forward(x.astype(np.float64), self._hidden) if self._hidden else x
        return np.array((_activate(sum(map(operator.mul, h.tolist()[0], w)) + b, act),))


#: Config values of ``backend``: "card" follows the card's measured choice; "tflite" names LiteRT too.
BACKENDS = ("card", "onnxruntime", "litert", "tflite", "numpy")


def wanted_backend(asked: str, chosen: str) -> str:
    """The runtime a config's ``backend`` asks for: the card's ``chosen`` one for "card", LiteRT for "tflite"."""
    return chosen if asked == "card" else "litert" if asked == "tflite" else asked


def open_backend(
    card: ModelCard, card_dir: Path, *, precision: str | None = None, backend: str = "card"
) -> Backend:
    """Open the card's model on ``backend`` ("card", "onnxruntime", "litert" or "tflite", "numpy").

    "card" uses the runtime the card's recipe chose from measured time and memory; when that is
    LiteRT and its wheel does not import here, or the card ships no file for that runtime in this
    precision, the ONNX model serves and an INFO line says why.  Asked for by the config, such a
    backend is refused at load with a ConfigError instead, and a broken file always is
    (CorruptDataError).
    """
    prec = precision or card.default_precision
    if backend not in BACKENDS:
        raise ConfigError(
            f"models {card.name}: backend {backend!r}: unknown: use one of {', '.join(BACKENDS)}"
        )
    want = wanted_backend(backend, card.backend)
    why = remedy = ""
    if want == "numpy":
        if prec in card.dense_files:
            return DenseBackend(card, read_verified(card, card_dir, prec, kind="numpy"), prec)
        why = f"the card ships no {prec} numpy weights (it has {sorted(card.dense_files) or 'none'})"
        remedy = "re-run the model's recipe to write them, or pick a precision it lists"
    elif want == "litert":
        cls = litert_interpreter_class()
        if cls is None:
            why = "neither ai-edge-litert nor tflite-runtime imports on this platform"
            remedy = "pip install 'edgetwin[litert]' where its wheel exists"
        elif prec not in card.tflite_files:
            why = f"the card ships no {prec} .tflite file (it has {sorted(card.tflite_files) or 'none'})"
            remedy = "re-run the model's recipe to write them"
        else:
            return LiteRtBackend(card, read_verified(card, card_dir, prec, kind="litert"), prec, cls)
    if why:
        if backend != "card":
            raise ConfigError(
                f"models {card.name}: backend {backend!r}: {why}: {remedy}, or set [models] backend = "
                '"onnxruntime"'
            )
        shown = {"litert": "LiteRT"}.get(want, want)
        log.info("models %s: the card prefers %s but %s; the ONNX model serves", card.name, shown, why)
    return OnnxBackend(card, read_verified(card, card_dir, prec), prec)
