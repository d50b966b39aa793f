"""A detector for every stream no model covers: robust level and spread, CUSUM for steps and drifts.

Each numeric stream of a subject that no other model scores is commissioned on its own first
windows: its level is the median of the window means and its spread 1.4826 x their median absolute
deviation (floored, so a constant tag does not make every change infinite).  After that each
window is judged by

* the level: ``|z| > z_limit`` (a jump far outside anything commissioning saw), and
* a two-sided CUSUM of ``z`` with allowance ``k`` and decision interval ``h`` (Page's), which
  accumulates small persistent shifts - a step, or a drift - that no single window shows.

Overlapping windows share samples, so the CUSUM steps only once per window length (every
``round(window / hop)`` windows): its increments are then nearly independent, as Page's run-length
figures assume.  The score is the larger of ``|z| / z_limit`` and ``S / h`` over the subject's
streams (above 1: anomalous); the contributions name the streams.  Alarms go through the same
episode logic as every model, with ``model = "stream_change"``.  There is no adaptation: after a
change the operator recommissions the subject (delete its state file), the detector never learns a
change as normal.  Daily seasonality is not modelled.

Commissioning values and fitted levels persist per subject under ``<state_dir>/models/``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from gateway.contracts import ModelResult, WindowModel, WindowRecord
from gateway.inference.statefile import state_file, store_json

__all__ = ["StreamChange", "StreamUse", "build_stream_change"]

log = logging.getLogger(__name__)

NAME = "stream_change"
_SAVE_EVERY = 20


class StreamUse(BaseModel):
    """The ``[models.streams]`` table: the per-stream detector (present = on)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    subject_kind: str = "industrial"
    subjects: list[str] = Field(default_factory=list)  # empty: every subject of that kind
    feature: str = "mean"
    commissioning_s: float = Field(3600.0, gt=0, le=30 * 86_400)
    z_limit: float = Field(8.0, gt=0)
    # CUSUM allowance and decision interval in robust spreads: k = 0.5 finds a 1-spread shift;
    # with h = 10 Page's in-control run length is several thousand independent steps.
    cusum_k: float = Field(0.5, gt=0)
    cusum_h: float = Field(10.0, gt=0)
    min_spread_rel: float = Field(0.002, ge=0)
    min_spread_abs: float = Field(1e-6, gt=0)


@dataclass(slots=True)
class _Stream:
    values: list[float] = field(default_factory=list)
    level: float | None = None
    spread: float = 1.0
    up: float = 0.0
    down: float = 0.0


class StreamChange:
    """A :class:`gateway.contracts.WindowModel` watching each uncovered stream on its own."""

    def __init__(
        self,
        use: StreamUse,
        *,
        hop_s: float,
        state_dir: Path | None = None,
        covered: Callable[[WindowRecord], bool] = lambda _r: False,
    ) -> None:
        self.name = NAME
        self.use = use
        self._hop_s = hop_s
        self._need = max(30, math.ceil(use.commissioning_s / hop_s))
        self._state_dir = state_dir
        self._covered = covered
        self._subjects = frozenset(use.subjects)
        self._state: dict[str, dict[str, _Stream]] = {}
        self._learned: dict[str, int] = {}  # windows each subject has commissioned on

    @property
    def commissioning_windows(self) -> int:
        """Windows each stream needs before it is judged."""
        return self._need

    def applies_to(self, record: WindowRecord) -> bool:
        """Subjects of the configured kind that no other model scores."""
        if record.kind != self.use.subject_kind or (self._subjects and record.subject not in self._subjects):
            return False
        return not self._covered(record)

    def score_batch(self, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
        """Commission or judge each window's streams; see the module docstring."""
        return [self._one(r) for r in records]

    def _one(self, record: WindowRecord) -> ModelResult:
        u = self.use
        streams = self._state.get(record.subject)
        if streams is None:
            streams = self._state[record.subject] = self._load(record.subject)
        stride = max(1, round(record.length_s / self._hop_s))
        step = record.index % stride == 0
        scores: dict[str, float] = {}
        learning = fitted = False
        for sf in record.streams:
            value = sf.features.get(u.feature)
            if value is None or not math.isfinite(value):
                continue
            key = sf.stream.metric.name
            st = streams.setdefault(key, _Stream())
            if st.level is None:
                learning = True
                st.values.append(value)
                if len(st.values) >= self._need:
                    self._fit(st)
                    fitted = True
                    log.info("models %s: subject %s stream %s commissioned", NAME, record.subject, key)
                continue
            z = (value - st.level) / st.spread
            if step:
                # Capped at 1.5 h: once a change is over, the sum falls below h within
                # 0.5 h / k steps and the episode can clear, however large the change was.
                cap = 1.5 * u.cusum_h
                st.up = min(cap, max(0.0, st.up + z - u.cusum_k))
                st.down = min(cap, max(0.0, st.down - z - u.cusum_k))
            scores[key] = max(abs(z) / u.z_limit, max(st.up, st.down) / u.cusum_h)
        if learning:
            n = self._learned[record.subject] = self._learned.get(record.subject, 0) + 1
            if fitted or n % _SAVE_EVERY == 0:
                self._save(record.subject, streams)
        if not scores:
            return ModelResult(math.nan, False, reason="commissioning" if learning else "gap")
        score = max(scores.values())
        if score <= 1.0:
            return ModelResult(score, False)
        total = sum(v for v in scores.values() if v > 1.0)
        contributions = {
            k: round(v / total, 4) for k, v in sorted(scores.items(), key=lambda kv: -kv[1]) if v > 1.0
        }
        return ModelResult(score, True, dict(list(contributions.items())[:5]))

    def _fit(self, st: _Stream) -> None:
        vals = sorted(st.values)
        n = len(vals)
        med = 0.5 * (vals[(n - 1) // 2] + vals[n // 2])
        dev = sorted(abs(v - med) for v in vals)
        mad = 0.5 * (dev[(n - 1) // 2] + dev[n // 2])
        st.level = med
        st.values = []
        st.spread = max(1.4826 * mad, self.use.min_spread_rel * abs(med), self.use.min_spread_abs)

    # ---- persistence ---------------------------------------------------------------------

    def _path(self, subject: str) -> Path | None:
        return state_file(self._state_dir, NAME, subject)

    def _load(self, subject: str) -> dict[str, _Stream]:
        path = self._path(subject)
        if path is None or not path.exists():
            return {}
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw["need"] != self._need:
                return {}
            return {
                k: _Stream([float(x) for x in v["values"]], v["level"], float(v["spread"]))
                for k, v in raw["streams"].items()
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("models %s: stored state %s unusable (%s); commissioning again", NAME, path, exc)
            return {}

    def _save(self, subject: str, streams: dict[str, _Stream]) -> None:
        path = self._path(subject)
        body = {
            "need": self._need,
            "streams": {
                k: {"values": s.values, "level": s.level, "spread": s.spread} for k, s in streams.items()
            },
        }
        store_json(path, body, NAME)


def build_stream_change(
    use: StreamUse | None, *, hop_s: float, state_dir: Path | None, others: Sequence[WindowModel]
) -> list[StreamChange]:
    """The per-stream detector the ``[models.streams]`` table asks for, beside ``others``."""
    if use is None:
        return []
    models = tuple(others)

    def covered(record: WindowRecord) -> bool:
        # Never where a trained (or commissioned) model applies: it knows the machine better.
        return any(m.applies_to(record) for m in models)

    return [StreamChange(use, hop_s=hop_s, state_dir=state_dir, covered=covered)]
