"""Machine health: remaining useful life (RUL) with a 90 % interval from a machine's per-cycle sensors.

The model (``models/rul_cmapss.card.json`` and its files - ONNX, .tflite and the ridge's numpy
constants - written by ``models/recipes/rul_cmapss.py``) was trained on NASA C-MAPSS FD001:
fourteen turbofan sensors, one reading per operating cycle.  The gateway rebuilds what it saw:
samples of each input stream are averaged per *cycle* (``cycle_s`` seconds, aligned to the first
sample; one sample per cycle is what C-MAPSS records), the last ``window`` cycles are kept, and at
each cycle's close :func:`cycle_features` gives the model its raw inputs (per sensor the mean of
the last ``recent`` cycles and the least-squares slope over the window); the graph standardises
them, squares them and applies the ridge, clipped to ``[0, cap]``, on the runtime the card chose
by measured time and memory (numpy for the shipped ridge: no runtime library loaded for five
operations), or the one the estimator's ``backend`` names.  A cycle closes once every input has
sent a sample ``grace_s`` past its end (samples arrive in blocks of one stream at a time), or at
the stage's tick ``grace_s`` after its end when some input stays silent.

Each closed cycle gives two estimates: ``rul`` in cycles, its ``sd`` the card's split-conformal
90 % half-width over 1.645 and the interval itself in ``detail`` (``lo90``, ``hi90``), and
``health``, the health index RUL / cap in %.  State: ``measured``; ``bridged`` when some input was
silent through the cycle and its last value was held; ``untrusted`` while fewer cycles than the
model's window have been seen (its interval was calibrated on full windows).  A cycle in which no
input reported is no cycle (the machine did not run).  The window is saved across restarts: wear
does not reset when the gateway does.  With ``low_rul`` set, an estimate below it (once the window
is full) raises a ``limit`` alarm with the configured priority, cleared only when the estimate is
back above it by the interval's half-width (after maintenance, say).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import zipfile
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from gateway.contracts import Alarm, Estimate
from gateway.errors import ConfigError, CorruptDataError
from gateway.estimation.config import RulSpec
from gateway.estimation.limits import LowLimits
from gateway.inference.backends import (
    BACKENDS,
    Backend,
    LiteRtBackend,
    OnnxBackend,
    litert_interpreter_class,
    wanted_backend,
)
from gateway.inference.card import ModelFile, read_card
from gateway.sample import FAULT_FLAGS, Stream

__all__ = [
    "RIDGE_TOLERANCE",
    "Z90",
    "RidgeBackend",
    "RulCard",
    "RulEstimator",
    "RulModel",
    "cycle_features",
    "load_rul_model",
]

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
Z90 = 1.6449  # a two-sided 90 % interval is +-1.645 sd of a normal error


def cycle_features(window: F64, recent: int = 5) -> F64:
    """The model's raw inputs at a window's last cycle: per sensor the recent mean, then the slope.

    ``window``: ``(cycles, sensors)``, oldest first.  The slope (per cycle) is the least-squares one
    over the whole window, 0 while it holds two cycles or fewer.
    """
    n, k = window.shape
    out = np.zeros(2 * k)
    out[:k] = window[-recent:].mean(axis=0)
    if n > 2:
        t = np.arange(n) - (n - 1) / 2.0
        out[k:] = (t @ (window - window.mean(axis=0))) / (t @ t)
    return out


class RulCard(BaseModel):
    """``<name>.card.json`` of a RUL model: its sensors, window, output range, interval and files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    version: str
    task: str
    sensors: tuple[str, ...] = Field(min_length=1)
    window: int = Field(ge=3, le=10_000)
    recent: int = Field(ge=1, le=10_000)
    cap: float = Field(gt=0)
    input_name: str
    output_name: str
    interval_90: float = Field(gt=0)  # half-width, cycles
    files: dict[Literal["fp32"], ModelFile]
    # The same graph as .tflite for LiteRT (int8 is evaluated in the card, never served: see there).
    tflite_files: dict[Literal["fp32", "int8"], ModelFile] = Field(default_factory=dict)
    # The ridge's constants and reference estimates (.ridge.npz) for the numpy backend.
    numpy_files: dict[Literal["fp32"], ModelFile] = Field(default_factory=dict)
    # The runtime that serves it, chosen by the recipe from measured time and memory
    # (evaluation.backends.choice); where it cannot serve, the ONNX model does.
    backend: Literal["onnxruntime", "litert", "numpy"] = "onnxruntime"
    training: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)

    @property
    def n_inputs(self) -> int:
        """Width of the model's input row: a recent mean and a slope per sensor."""
        return 2 * len(self.sensors)


#: Largest |estimate - recorded onnxruntime estimate| (cycles) the numpy ridge accepts on its
#: reference rows: float32 rounding of a sum of 56 terms near 100 cycles, far inside the +-31-cycle
#: interval.
RIDGE_TOLERANCE = 1e-3
#: The arrays of a ``.ridge.npz``: the graph's constants, and reference rows with their estimates.
RIDGE_ARRAYS = ("shift", "scale", "W", "B", "lo", "hi", "ref_x", "ref_y")


class RidgeBackend:
    """The RUL graph in numpy: standardise, square, weigh, clip - float64 on the graph's float32 constants.

    The weights file (``.ridge.npz``, written by the recipe from the ONNX graph's constants) is
    refused at load unless it reproduces the onnxruntime estimates recorded in it within
    :data:`RIDGE_TOLERANCE`.
    """

    name = "numpy"

    def __init__(self, card: RulCard, data: bytes) -> None:
        self.precision = "fp32"

        def refuse(problem: str) -> CorruptDataError:
            return CorruptDataError(
                f"estimation rul {card.name}: numpy weights file: {problem}: re-run models/recipes/rul_cmapss.py"
            )

        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: np.asarray(npz[k], np.float64) for k in RIDGE_ARRAYS}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise refuse(
                f"not a ridge archive with {', '.join(RIDGE_ARRAYS)} ({type(exc).__name__})"
            ) from exc
        k = card.n_inputs
        self._shift, self._scale = arrays["shift"].reshape(-1), arrays["scale"].reshape(-1)
        self._w = arrays["W"].reshape(-1)
        if not (len(self._shift) == len(self._scale) == k and len(self._w) == 2 * k):
            raise refuse(
                f"shift, scale and W of {len(self._shift)}, {len(self._scale)} and {len(self._w)}, need {k}, {k}, {2 * k}"
            )
        self._b = float(arrays["B"].reshape(-1)[0])
        self._lo, self._hi = float(arrays["lo"]), float(arrays["hi"])
        ref_x, ref_y = arrays["ref_x"], arrays["ref_y"].reshape(-1)
        if ref_x.ndim != 2 or ref_x.shape[1] != k or len(ref_x) != len(ref_y) or not len(ref_y):
            raise refuse(f"reference rows {ref_x.shape} and estimates {ref_y.shape}, need (n, {k}) and (n,)")
        worst = float(np.max(np.abs(self.run(ref_x.astype(np.float32)) - ref_y)))
        if not worst <= RIDGE_TOLERANCE:
            raise refuse(
                f"it does not reproduce the recorded estimates on {len(ref_y)} rows (max |diff| {worst:.3g} "
                f"cycles, allowed {RIDGE_TOLERANCE:g})"
            )

    def run(self, x: npt.NDArray[np.float32]) -> F64:
        """RUL estimates of a ``(batch, n_inputs)`` array."""
        z = (x - self._shift) / self._scale
        y = np.hstack([z, z * z]) @ self._w + self._b
        return np.asarray(np.clip(y, self._lo, self._hi), np.float64).reshape(len(x))


class RulModel:
    """A loaded RUL model: its card and the backend that serves it (numpy, LiteRT or onnxruntime)."""

    def __init__(self, card: RulCard, backend: Backend) -> None:
        self.card = card
        self.backend = backend
        log.info(
            "estimation rul %s %s loaded (%s, %s)", card.name, card.version, backend.name, backend.precision
        )

    def predict(self, features: F64) -> float:
        """RUL in cycles from one row of :func:`cycle_features`."""
        return float(self.backend.run(np.ascontiguousarray(features.reshape(1, -1), np.float32))[0])


def _verified(directory: Path, card: RulCard, spec: ModelFile) -> bytes:
    """A file of the card, refused unless its sha256 is the card's."""
    file = directory / spec.path
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"estimation rul {file}: cannot read the model file: {exc.strerror}: reinstall the models"
        ) from exc
    if hashlib.sha256(data).hexdigest() != spec.sha256:
        raise CorruptDataError(
            f"estimation rul {file}: sha256 does not match its card: the file is corrupt or not the "
            f"one the card describes: restore it from the release or re-run the recipe ({card.name})"
        )
    return data


def load_rul_model(directory: Path, name: str, backend: str = "card") -> RulModel:
    """The RUL model ``name`` of ``directory`` on ``backend``: its card validated, its file checked by sha256.

    ``backend`` takes the values of ``[[models.use]] backend`` (:data:`BACKENDS`; "tflite" names
    LiteRT).  "card" serves on the card's measured choice; when that is LiteRT and no LiteRT wheel
    imports here (or a file it needs is not listed) the ONNX model serves and an INFO line says
    why.  A backend asked for by name that cannot serve is a ConfigError.
    """
    path = directory / f"{name}.card.json"
    card = read_card(
        path,
        RulCard,
        "estimation rul",
        unreadable="set [[estimators.rul]] model to a shipped RUL model or [models] dir to where it is",
        malformed="not a RUL model card, or a damaged one: re-run models/recipes/rul_cmapss.py",
    )
    if backend not in BACKENDS:
        raise ConfigError(
            f"estimation rul {card.name}: backend {backend!r}: unknown: use one of {', '.join(BACKENDS)}"
        )
    want = wanted_backend(backend, card.backend)
    why = ""
    if want == "numpy":
        if "fp32" in card.numpy_files:
            return RulModel(card, RidgeBackend(card, _verified(directory, card, card.numpy_files["fp32"])))
        why = "the card lists no numpy weights"
    elif want == "litert":
        cls = litert_interpreter_class()
        if cls is None:
            why = "neither ai-edge-litert nor tflite-runtime imports on this platform"
        elif "fp32" not in card.tflite_files:
            why = "the card lists no fp32 .tflite file"
        else:
            data = _verified(directory, card, card.tflite_files["fp32"])
            return RulModel(card, LiteRtBackend(card, data, "fp32", cls))
    if why and backend != "card":
        raise ConfigError(
            f"estimation rul {card.name}: backend {backend!r}: {why}: set [[estimators.rul]] backend "
            '= "onnxruntime" (or "card")'
        )
    if why:
        log.info("estimation rul %s: the card prefers %s but %s; the ONNX model serves", card.name, want, why)
    data = _verified(directory, card, card.files["fp32"])
    try:
        return RulModel(card, OnnxBackend(card, data, "fp32"))
    except ConfigError as exc:
        raise ConfigError(f"estimation rul {card.name}: {exc}") from exc


class RulEstimator:
    """One ``[[estimators.rul]]`` estimator; see the module docstring."""

    def __init__(
        self,
        spec: RulSpec,
        index: int,
        kind: str,
        emit: Callable[[Estimate], None],
        model: RulModel,
        alarm: Callable[[Alarm], None] = lambda _: None,
    ) -> None:
        card = model.card
        self.spec = spec
        self.kind = kind
        self.model = model
        self._emit = emit
        # Cleared only when back above the limit by the interval's half-width: an estimate this
        # noisy (RMSE ~17 cycles) would flap around the limit otherwise; wear does not heal itself.
        self.limits = LowLimits(spec.subject, kind, alarm, model.card.interval_90)
        self._where = f"estimators.rul[{index}]"
        missing = [s for s in card.sensors if s not in spec.inputs and spec.prefix is None]
        unknown = sorted(set(spec.inputs) - set(card.sensors))
        if missing or unknown:
            raise ConfigError(
                f"config {self._where}.inputs: model {card.name} needs a metric for each of its sensors "
                f"{', '.join(card.sensors)}: "
                + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}")
                + ": map each sensor to one metric of the subject (or set prefix)"
            )
        #: metric -> the model's sensor it feeds
        self._role = {spec.inputs.get(s, f"{spec.prefix}{s}"): s for s in card.sensors}
        self._col = {s: i for i, s in enumerate(card.sensors)}
        self._streams: dict[str, Stream] = {}
        self._t0 = math.nan  # start of cycle 0 (monotonic)
        self._open: dict[int, tuple[list[float], list[int]]] = {}  # cycle -> (sums, counts) per sensor
        self._due = math.inf  # no cycle can close before this (the earliest open one's end + grace)
        self._closed = -1  # last cycle closed
        self._latest: dict[str, float] = {}  # per sensor: its latest sample's time
        self._wall_offset = 0.0
        self._held = np.full(len(card.sensors), math.nan)  # latest per-cycle value per sensor
        self.rows: deque[F64] = deque(maxlen=card.window)
        self.cycles = 0  # cycles seen, across restarts
        self._warned_missing = False
        self.late = 0  # samples of a cycle already closed (counted, not used)

    @property
    def key(self) -> str:
        """Where this estimator's state is kept across restarts."""
        return f"rul/{self.spec.subject}/{self.spec.name}"

    def route(self, stream: Stream) -> str | None:
        """The model sensor ``stream`` feeds, or None."""
        if stream.subject != self.spec.subject:
            return None
        return self._role.get(stream.metric.name)

    def update(
        self, role: str, stream: Stream, t_mono: float, t_wall: float, value: float, quality: int
    ) -> None:
        """Add one sample to its cycle; close the cycles whose samples have all arrived."""
        self._streams[role] = stream
        self._wall_offset = t_wall - t_mono
        self._latest[role] = max(t_mono, self._latest.get(role, t_mono))
        c = self.spec.cycle_s
        if math.isnan(self._t0):
            self._t0 = t_mono - c / 2.0  # a sample per cycle falls mid-cycle, away from the edges
        if not quality & int(FAULT_FLAGS) and math.isfinite(value):
            k = math.floor((t_mono - self._t0) / c)
            if k <= self._closed:
                self.late += 1
            else:
                cycle = self._open.get(k)
                if cycle is None:
                    cycle = self._open[k] = ([0.0] * len(self._col), [0] * len(self._col))
                    self._due = min(self._due, self._t0 + (k + 1) * c + self.spec.grace_s)
                col = self._col[role]
                cycle[0][col] += value
                cycle[1][col] += 1
        if t_mono >= self._due and len(self._latest) == len(self._col):
            # Every input has reported: the slowest one's latest sample says how far all have come.
            self._close(min(self._latest.values()))

    def tick(self, now_mono: float) -> None:
        """Close the cycles that ended ``grace_s`` ago even when some input stays silent."""
        self._close(now_mono)

    def _close(self, watermark: float) -> None:
        if not self._open:
            return
        c, grace = self.spec.cycle_s, self.spec.grace_s
        for k in sorted(self._open):
            end = self._t0 + (k + 1) * c
            if end + grace > watermark:
                break
            sums, counts = self._open.pop(k)
            self._closed = k
            self._cycle(end, np.array(sums), np.array(counts))
        self._due = self._t0 + (min(self._open) + 1) * c + grace if self._open else math.inf

    def _cycle(self, t_end: float, sums: F64, counts: npt.NDArray[np.int64]) -> None:
        seen = counts > 0
        self._held[seen] = sums[seen] / counts[seen]
        if not np.isfinite(self._held).all():
            if not self._warned_missing:
                self._warned_missing = True
                silent = [s for s, i in self._col.items() if not math.isfinite(self._held[i])]
                log.warning(
                    "estimation %s: no value yet of %s: no RUL until every input reports: "
                    "check that the subject's source delivers these metrics",
                    self._where,
                    ", ".join(silent),
                )
            return
        if self._warned_missing:
            self._warned_missing = False
            log.info("estimation %s: every input reports: RUL estimates start", self._where)
        self.rows.append(self._held.copy())
        self.cycles += 1
        card = self.model.card
        rul = self.model.predict(cycle_features(np.vstack(self.rows), card.recent))
        hw = card.interval_90
        if len(self.rows) < card.window:
            state = "untrusted"
        elif not seen.all():
            state = "bridged"
        else:
            state = "measured"
        share = 1.0 / len(self._streams) if self._streams else 0.0
        sources = tuple((self._streams[s], share) for s in sorted(self._streams))
        detail: dict[str, float | str] = {
            "lo90": round(max(rul - hw, 0.0), 2),
            "hi90": round(min(rul + hw, card.cap), 2),
            "cycles": self.cycles,
            "held": int((~seen).sum()),
            "model": card.name,
        }
        t_wall = t_end + self._wall_offset
        sd = hw / Z90
        self._emit(
            Estimate(
                self.spec.subject, self.kind, "rul", "{cycle}", t_end, t_wall, rul, sd, state, sources, detail
            )
        )
        self._emit(
            Estimate(
                self.spec.subject,
                self.kind,
                "health",
                "%",
                t_end,
                t_wall,
                100.0 * rul / card.cap,
                100.0 * sd / card.cap,
                state,
                sources,
                {"model": card.name},
            )
        )
        if self.spec.low_rul is not None and state != "untrusted":
            self.limits.check("rul", rul, self.spec.low_rul, self.spec.low_rul_priority, t_end, t_wall)

    def save(self, now_mono: float, now_wall: float) -> dict[str, Any] | None:
        """The window of per-cycle values and the cycles counted: the machine's wear so far."""
        del now_mono
        if not self.rows:
            return None
        return {
            "sensors": list(self.model.card.sensors),
            "rows": [[float(v) for v in r] for r in self.rows],
            "cycles": self.cycles,
            "t_wall": now_wall,
        }

    def restore(self, state: Mapping[str, Any], now_mono: float, now_wall: float) -> None:
        """Resume the window from :meth:`save`'s state (of the same model's sensors)."""
        del now_mono, now_wall
        sensors = list(self.model.card.sensors)
        try:
            rows = np.asarray(state["rows"], np.float64)
            cycles = int(state["cycles"])
        except (KeyError, TypeError, ValueError):
            return
        if state.get("sensors") != sensors or rows.ndim != 2 or rows.shape[1] != len(sensors):
            return
        if not np.isfinite(rows).all() or cycles < len(rows):
            return
        self.rows.extend(rows[-self.model.card.window :])
        self.cycles = cycles
        self._held = rows[-1].copy()
