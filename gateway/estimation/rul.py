"""Machine health: remaining useful life (RUL) with a 90 % interval from a machine's per-cycle sensors.

The model (``models/rul_cmapss.card.json`` and its ONNX file, written by
``models/recipes/rul_cmapss.py``) was trained on NASA C-MAPSS FD001: fourteen turbofan sensors, one
reading per operating cycle.  The gateway rebuilds what it saw: samples of each input stream are
averaged per *cycle* (``cycle_s`` seconds, aligned to the first sample; one sample per cycle is what
C-MAPSS records), the last ``window`` cycles are kept, and at each cycle's close
:func:`cycle_features` gives the model its raw inputs (per sensor the mean of the last ``recent``
cycles and the least-squares slope over the window); the graph standardises them, squares them and
applies the ridge, clipped to ``[0, cap]``.  A cycle closes once every input has sent a sample
``grace_s`` past its end (samples arrive in blocks of one stream at a time), or at the stage's tick
``grace_s`` after its end when some input stays silent.

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
import importlib
import logging
import math
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
from gateway.inference.card import ModelFile, read_card
from gateway.sample import FAULT_FLAGS, Stream

__all__ = ["Z90", "RulCard", "RulEstimator", "RulModel", "cycle_features", "load_rul_model"]

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
    """``<name>.card.json`` of a RUL model: its sensors, window, output range, interval and file."""

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
    training: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)


class RulModel:
    """A loaded RUL model: its card and a one-thread onnxruntime session."""

    def __init__(self, card: RulCard, model: bytes) -> None:
        try:
            ort = importlib.import_module("onnxruntime")
        except ImportError as exc:
            raise ConfigError(
                f"estimation rul {card.name}: onnxruntime is not installed: the RUL model needs it: "
                "pip install 'edgetwin[models]'"
            ) from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for malformed graphs
            raise CorruptDataError(
                f"estimation rul {card.name}: onnxruntime cannot load the model: {type(exc).__name__}: "
                "restore the file from the release or re-run models/recipes/rul_cmapss.py"
            ) from exc
        self.card = card
        self._out = [card.output_name]

    def predict(self, features: F64) -> float:
        """RUL in cycles from one row of :func:`cycle_features`."""
        x = np.ascontiguousarray(features.reshape(1, -1), np.float32)
        (y,) = self._sess.run(self._out, {self.card.input_name: x})
        return float(np.asarray(y, np.float64).reshape(-1)[0])


def load_rul_model(directory: Path, name: str) -> RulModel:
    """The RUL model ``name`` of ``directory``: its card validated, its file checked by sha256."""
    path = directory / f"{name}.card.json"
    card = read_card(
        path,
        RulCard,
        "estimation rul",
        unreadable="set [[estimators.rul]] model to a shipped RUL model or [models] dir to where it is",
        malformed="not a RUL model card, or a damaged one: re-run models/recipes/rul_cmapss.py",
    )
    spec = card.files["fp32"]
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
            "one the card describes: restore it from the release or re-run the recipe"
        )
    return RulModel(card, data)


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
