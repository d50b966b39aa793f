"""Inference backends: onnxruntime on the CPU (one thread by default) and LiteRT where it installs.

A backend is opened from verified bytes (see :func:`gateway.inference.card.read_verified`) and
checked against the card: a graph whose input or output does not have the card's name and width
is refused before it scores anything.  ``run`` takes a float32 ``(batch, n_inputs)`` array and
returns a float64 ``(batch,)`` array of scores; it is called from one worker thread at a time.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from gateway.errors import ConfigError, CorruptDataError
from gateway.inference.card import ModelCard, read_verified

__all__ = ["Backend", "LiteRtBackend", "OnnxBackend", "litert_interpreter_class", "open_backend"]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


class Backend(Protocol):
    """Runs one model on a batch of input vectors."""

    name: str  # "onnxruntime" or "litert"
    precision: str

    def run(self, x: F32) -> F64:
        """Scores of a ``(batch, n_inputs)`` float32 array, one per row."""


def _dims(shape: Any) -> list[int | None]:
    return [d if isinstance(d, int) else None for d in shape]


class OnnxBackend:
    """onnxruntime CPU session, sequential, ``threads`` intra-op threads (1 keeps a core for I/O)."""

    name = "onnxruntime"

    def __init__(self, card: ModelCard, model: bytes, precision: str, *, threads: int = 1) -> None:
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

    def _check(self, card: ModelCard) -> None:
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
        (y,) = self._sess.run(self._out, {self._in: x})
        return np.asarray(y, np.float64).reshape(len(x))


def litert_interpreter_class() -> Any | None:
    """The LiteRT ``Interpreter`` class from ai-edge-litert or tflite-runtime, or None."""
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    return None


class LiteRtBackend:
    """TFLite model through ai-edge-litert (or tflite-runtime), one thread."""

    name = "litert"

    def __init__(self, card: ModelCard, model: bytes, precision: str, interpreter_class: Any) -> None:
        try:
            self._interp = interpreter_class(model_content=model, num_threads=1)
            self._interp.allocate_tensors()
        except Exception as exc:  # the interpreter raises untyped errors for malformed models
            raise CorruptDataError(
                f"models {card.name} ({precision}): LiteRT cannot load the model: {type(exc).__name__}: "
                "restore the file from the release or re-run the recipe"
            ) from exc
        self.precision = precision
        (inp,) = self._interp.get_input_details()
        self._in = inp["index"]
        self._out = self._interp.get_output_details()[0]["index"]
        if len(inp["shape"]) != 2 or int(inp["shape"][1]) != card.n_inputs:
            raise CorruptDataError(
                f"models {card.name} ({precision}): LiteRT input shape {list(inp['shape'])}, card needs "
                f"(batch, {card.n_inputs}): ship the card written with this model file"
            )
        self._batch = int(inp["shape"][0])

    def run(self, x: F32) -> F64:
        """Scores of a ``(batch, n_inputs)`` float32 array, resizing the input when the batch changes."""
        if len(x) != self._batch:
            self._interp.resize_tensor_input(self._in, [len(x), x.shape[1]])
            self._interp.allocate_tensors()
            self._batch = len(x)
        self._interp.set_tensor(self._in, x)
        self._interp.invoke()
        return np.asarray(self._interp.get_tensor(self._out), np.float64).reshape(len(x))


def open_backend(
    card: ModelCard, card_dir: Path, *, precision: str | None = None, backend: str = "onnxruntime"
) -> Backend:
    """Open the card's model on ``backend`` ("onnxruntime" or "litert"), falling back to onnxruntime.

    LiteRT serves only when its wheel imports on this platform and the card ships a .tflite file;
    otherwise a warning says why and the ONNX model serves.
    """
    prec = precision or card.default_precision
    if backend == "litert":
        cls = litert_interpreter_class()
        if cls is None:
            log.warning(
                "models %s: LiteRT requested but neither ai-edge-litert nor tflite-runtime imports on "
                "this platform; the ONNX model serves instead",
                card.name,
            )
        elif prec not in card.tflite_files:
            log.warning(
                "models %s: LiteRT requested but the card ships no %s .tflite file; the ONNX model serves",
                card.name,
                prec,
            )
        else:
            return LiteRtBackend(card, read_verified(card, card_dir, prec, tflite=True), prec, cls)
    elif backend != "onnxruntime":
        raise ConfigError(f"models {card.name}: backend {backend!r}: unknown: use 'onnxruntime' or 'litert'")
    return OnnxBackend(card, read_verified(card, card_dir, prec), prec)
