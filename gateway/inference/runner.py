"""The window-model runtime: card-checked model, per-subject normalisation, fallback, self-healing.

:class:`AnomalyModel` is a :class:`gateway.contracts.WindowModel`.  ``score_batch`` runs in a worker
thread and does, per batch of windows (any mix of subjects):

1. pick the card's inputs (``<metric>.<feature>``) from each window; windows whose input streams
   break a plausibility rule are not scored and raise a ``SENSOR_FAULT`` event instead;
2. normalise per subject: ``commissioning`` cards learn each subject's mean and spread over its
   first N complete windows (a new machine is not scored until then), ``fixed`` cards use the
   training statistics; a card with ``track_s`` lets the level of its ``mean`` inputs follow slow
   wander after that, guarded by the model's own verdicts (:class:`Normaliser`; windows of one
   subject in one batch are judged against its level before the batch);
3. run the backend once for the whole batch, then check the outputs (finite?), the inputs (far
   outside the training statistics?) and the time per window against the card's budget;
4. explain each anomaly by occlusion: the share of the score lost when one input is set to its
   normal value (``z = 0``), over the inputs that lower it.

Self-healing: a model that returns NaN/inf, raises or overruns its latency budget
``health.overruns_to_demote`` batches in a row is demoted: its windows are scored by the
statistical fallback (largest ``|z|``) and flagged ``fallback``.  While demoted the model still
runs as a probe, and ``health.healthy_to_promote`` healthy probes in a row promote it back.  The
latency is the worker thread's own CPU time (``time.thread_time``; the backend runs in that
thread), so a busy machine does not change verdicts.  Inputs beyond ``health.ood_z`` demote the
model for *that subject only*, which is promoted back after ``healthy_to_promote`` of its windows
in range.  Every change is queued as a ``model_health`` diagnostic saying why (see
:meth:`AnomalyModel.drain_events`).

Each result is a three-valued verdict (:attr:`gateway.contracts.ModelResult.verdict`): a window
that cannot be judged carries the reason - ``implausible_input``, ``partial`` (an input stream
holds less than ``min_coverage`` of its window: after a start or an outage; such a window neither
commissions nor moves the baseline, :mod:`gateway.inference.partial`), ``commissioning``, ``gap``,
``missing_inputs``, or ``demoted`` for a fallback score that does not flag it.

Commissioning statistics live in memory and, when a ``state_dir`` is given, in one small JSON file
per model and subject there, so a restart does not recommission a machine.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from gateway.compiled import compiled
from gateway.contracts import DEFAULT_MIN_COVERAGE, Alarm, AlarmKind, Diagnostic, ModelResult, WindowRecord
from gateway.inference.backends import Backend, DenseBackend, open_backend, wanted_backend
from gateway.inference.card import ModelCard, ModelFile, input_matches
from gateway.inference.deferred import Deferred
from gateway.inference.partial import PARTIAL, Coverage
from gateway.inference.plausibility import PlausibilityChecker, Rule, Violation, window_breaches
from gateway.inference.statefile import state_file, store_json
from gateway.sample import Stream

__all__ = ["TOP_CONTRIBUTIONS", "AnomalyModel", "Event", "Normaliser", "Tracking"]

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]

#: Contributions sent with an anomaly: the largest few, shares of the whole score.
TOP_CONTRIBUTIONS = 5
_LATENCY_KEEP = 4096
# A longer silence between a subject's windows counts as this long for its baseline, so the first
# window after an outage does not replace the level at once.
_MAX_STEP_S = 60.0
_SAVE_LEVEL_EVERY = 60  # judged windows between saves of a following baseline
_FMAX = float(np.finfo(np.float64).max)
_PENDING = ModelResult(math.nan, False)  # a placeholder score_batch overwrites for every window
_STREAM_OF = operator.attrgetter("stream")

Event: TypeAlias = Alarm | Diagnostic

# A window's input row, its z-scores and its baseline's step compiled (gateway/_window.c): each the
# numpy operations it replaces to the bit, in one call; None where numpy must decide (the same
# numpy paths serve where nothing was built).  After a busy neighbour's time slice each distinct
# numpy call here cost 1-6 us (bench_models.py --evict), and a window made about fifteen.
_vector_of: Callable[[list[float | None]], F64 | None] | None = compiled("vector")
_zrow_of: Callable[[F64, F64, F64], tuple[F64, float, bool] | None] | None = compiled("zrow")
_follow_of: Callable[[F64, F64, F64, F64 | None, F64 | None], bool | None] | None = compiled("follow")


def _zrow(x: F64, mean: F64, std: F64) -> tuple[F64, float, bool]:
    """``(x - mean) / std`` as a ``(1, n)`` row, its largest ``|z|`` (non-finite ones as 0), whether all are finite."""
    if _zrow_of is not None:
        got = _zrow_of(x, mean, std)
        if got is not None:
            return got
    z = x - mean
    z /= std  # absent inputs stay NaN here: score_batch sets them to 0 (their normal value)
    row = z.tolist()
    return z[np.newaxis], max(abs(v) if math.isfinite(v) else 0.0 for v in row), all(map(math.isfinite, row))


@dataclass(frozen=True, slots=True)
class Tracking:
    """How a commissioned baseline follows slow wander (the card's ``track_*``; see Normaliser)."""

    inputs: npt.NDArray[np.bool_]  # which inputs follow: the card's ``mean`` inputs
    normal_s: float | None  # time constant once ``guard_s`` of normal windows went by; None: frozen
    flagged_s: float | None  # time constant otherwise; None: frozen
    guard_s: float
    cap: float  # in commissioning spreads around the commissioning mean

    @property
    def weight(self) -> F64:
        """1.0 for the inputs that follow, 0.0 for the others."""
        return self.inputs.astype(np.float64)

    @classmethod
    def of(cls, card: ModelCard) -> Tracking | None:
        """The card's tracking, or None when its baseline stays the commissioning mean."""
        norm = card.normalisation
        if norm.kind != "commissioning" or (norm.track_s is None and norm.track_flagged_s is None):
            return None
        inputs = np.array([spec.feature == "mean" for spec in card.inputs])
        return cls(inputs, norm.track_s, norm.track_flagged_s, norm.track_guard_s, norm.track_cap)


@dataclass(slots=True)
class Normaliser:
    """One subject's input statistics: collected over commissioning windows, then frozen.

    With a :class:`Tracking`, ``level`` (what ``z`` is taken against) is an exponential average
    of the windows: through commissioning, so scoring starts from the machine's latest level and
    not the span's mean, and after it while the model says normal.  A slowly wandering flow or
    supply voltage is then not a fault hours after a short commissioning, while a fault, which
    the model flags within a window or two, freezes it (or lets it follow only slowly); the level
    never leaves ``mean`` by more than ``cap`` commissioning spreads.
    """

    n: int
    need: int
    total: F64
    total_sq: F64
    mean: F64 | None = None
    std: F64 | None = None
    level: F64 | None = None
    last_t: float | None = None  # time (s) of the last window seen
    normal_s: float = 0.0  # normal windows' time in a row
    # Per window after commissioning: which inputs follow (1/0) and the level's bounds.
    _weight: F64 | None = None
    _scaled: tuple[float, F64] | None = None  # (rate, weight x rate) of the last step
    _lo: F64 | None = None
    _hi: F64 | None = None
    _bounds: tuple[list[float], list[float]] | None = None  # _lo and _hi as lists

    @classmethod
    def empty(cls, n: int, need: int) -> Normaliser:
        """A normaliser that still has ``need`` windows to see."""
        return cls(0, need, np.zeros(n), np.zeros(n))

    def add(
        self, x: F64, min_rel: float, min_abs: float, *, t: float = 0.0, track: Tracking | None = None
    ) -> bool:
        """Count one complete window (at time ``t``); True when this completes commissioning."""
        self.n += 1
        self.total += x
        self.total_sq += x * x
        if track is not None:
            self._move(x, t, track.normal_s, track)
        if self.n < self.need:
            return False
        mean = self.total / self.n
        var = np.maximum(self.total_sq / self.n - mean * mean, 0.0)
        self.mean = mean
        self.std = np.maximum(np.sqrt(var), np.maximum(min_rel * np.abs(mean), min_abs))
        if track is not None:
            self.bound(track)
        if track is None or self.level is None or track.normal_s is None:
            self.level = mean.copy()
        else:
            self.level = np.where(track.inputs, self._capped(self.level), mean)
        return True

    def follow(self, x: F64, flagged: bool | None, t: float, track: Tracking | None) -> None:
        """After commissioning: move the level after a judged window (``flagged`` None: not judged)."""
        if track is None or self.mean is None:
            return
        if flagged is None:
            # An unjudged window (a gap, implausible inputs) neither moves the level nor counts as
            # normal: after it the guard starts again.
            self.last_t, self.normal_s = t, 0.0
            return
        dt = 0.0 if self.last_t is None else min(max(t - self.last_t, 0.0), _MAX_STEP_S)
        self.normal_s = 0.0 if flagged else self.normal_s + dt
        tau = track.normal_s if self.normal_s >= track.guard_s else track.flagged_s
        self._move(x, t, tau, track)

    def _move(self, x: F64, t: float, tau: float | None, track: Tracking) -> None:
        dt = 0.0 if self.last_t is None else min(max(t - self.last_t, 0.0), _MAX_STEP_S)
        self.last_t = t
        if self.level is None:
            self.level = np.asarray(x, np.float64).copy()
            return
        if tau is None or dt <= 0.0:
            return
        if self._weight is None:
            self._weight = track.weight
        rate = min(1.0, dt / tau)
        scaled = self._scaled
        if scaled is None or scaled[0] != rate:  # windows a hop apart repeat the rate
            scaled = self._scaled = (rate, self._weight * rate)
        if _follow_of is not None and _follow_of(x, self.level, scaled[1], self._lo, self._hi) is True:
            return  # the step below in one call, to the bit (False: a step is not finite)
        # In place and few operations: this runs for every window of every machine.  One product
        # by weight x rate is the product by weight then by rate to the bit (each weight is 1 or 0
        # and rate > 0), one numpy call fewer per window.
        step = x - self.level
        step *= scaled[1]
        # Finite unless an input is absent (NaN) or the step overflowed; a sum on the Python list
        # says so without numpy calls of its own (an overflowing sum only costs the clean-up).
        if not math.isfinite(sum(step.tolist())):
            # np.nan_to_num(step, copy=False) in bare ufuncs (its wrapper cost more than the step),
            # on the step by weight alone as before the rate: an absent input does not move its
            # level, an overflow is the largest finite step.
            step = x - self.level
            step *= self._weight
            np.copyto(step, 0.0, where=np.isnan(step))
            np.minimum(step, _FMAX, out=step)
            np.maximum(step, -_FMAX, out=step)
            step *= rate
        self.level += step
        if self._bounds is not None and self._lo is not None and self._hi is not None:
            # Compared on Python lists first: a level that stays within its bounds (nearly every
            # window) costs no numpy calls for them.
            level, (lo, hi) = self.level.tolist(), self._bounds
            if min(map(operator.sub, level, lo)) < 0.0 or max(map(operator.sub, level, hi)) > 0.0:
                np.maximum(self.level, self._lo, out=self.level)  # np.clip, without its wrapper's cost
                np.minimum(self.level, self._hi, out=self.level)

    def bound(self, track: Tracking) -> None:
        """Fix the level's bounds: ``cap`` commissioning spreads around the commissioning mean."""
        assert self.mean is not None
        assert self.std is not None
        room = track.cap * self.std
        self._lo, self._hi = self.mean - room, self.mean + room
        self._bounds = (self._lo.tolist(), self._hi.tolist())

    def _capped(self, level: F64) -> F64:
        return level if self._lo is None or self._hi is None else np.clip(level, self._lo, self._hi)


@dataclass(slots=True)
class _Resolved:
    """Where each card input sits in a subject's window: (stream position, feature) or None."""

    streams: tuple[Stream, ...]  # held, so the identity check in _resolve stays sound
    slots: tuple[tuple[int, str] | None, ...]
    found: int
    # Per window these do not change: (stream position, feature) of the inputs found and where
    # they go in the input vector, and the streams a plausibility rule applies to, each once with
    # its rule (looked up here, not per window).
    picks: tuple[tuple[int, str], ...] = ()
    columns: list[int] = field(default_factory=list)
    rules: tuple[tuple[int, Rule], ...] = ()
    positions: tuple[int, ...] = ()  # the input streams, each once


@dataclass(slots=True)
class _Health:
    demoted: bool = False
    reason: str = ""
    overruns: int = 0
    healthy_probes: int = 0
    demotions: int = 0
    promotions: int = 0
    fallback_windows: int = 0
    model_windows: int = 0
    latencies_us: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_KEEP))


class AnomalyModel:
    """A carded anomaly model scoring window records; see the module docstring."""

    #: It leaves a window whose inputs break a plausibility rule unjudged (``implausible_input``).
    checks_plausibility = True

    def __init__(
        self,
        card: ModelCard,
        card_dir: Path,
        *,
        precision: str | None = None,
        backend: str = "card",
        threshold: float | None = None,
        commissioning_windows: int | None = None,
        plausibility: PlausibilityChecker | None = None,
        state_dir: Path | None = None,
        opened: Backend | None = None,
        subjects: Sequence[str] = (),
        clock: Callable[[], float] = time.thread_time,
        fault_alarms: bool = True,
        inputs: Mapping[str, str] | None = None,
        window_s: float | None = None,
        min_coverage: float = DEFAULT_MIN_COVERAGE,
    ) -> None:
        self.card = card
        self.name = card.name
        # The window length it is scored on (the pipeline cuts it for it): the card's, or the site's.
        self.window_s = float(window_s or card.window_s)
        self.subject_kind = card.subject_kind
        # Explain every served window, not only flagged ones: a fusion over this model may flag a
        # window this model alone does not, and its explanation lists this model's inputs too.
        # Windows the model does not flag are explained when their contributions are first read
        # (a fusion reads them for the few windows it flags): the occlusion runs the model once
        # per input and cost twice the rest of a window.
        self.explain_all = False
        # The backend runs in the worker thread, and a deferred explanation wherever it is read.
        self._run_lock = threading.Lock()
        self._state_name = card.name  # its statistics files; a version sent over the downlink has its own
        # False where the pipeline already checks every sample against the same rules: one
        # sensor fault must page once, not once per checker.
        self._fault_alarms = fault_alarms
        self.backend: Backend = opened or open_backend(card, card_dir, precision=precision, backend=backend)
        self._backend_asked = backend  # what versions sent over the downlink follow (sibling)
        self.threshold = card.threshold if threshold is None else threshold
        norm = card.normalisation
        self._need = commissioning_windows or norm.windows
        self._fixed = norm.kind == "fixed"
        self._track = Tracking.of(card)
        self._fixed_mean = np.asarray(norm.mean, np.float64)
        self._fixed_std = np.asarray(norm.std, np.float64)
        self._keys = card.feature_keys()
        self._n = card.n_inputs
        self._checker = plausibility or PlausibilityChecker()
        self._state_dir = state_dir
        self._clock = clock
        self._subjects = frozenset(subjects)
        self._inputs = dict(inputs or {})  # card input metric -> configured stream name
        self._reported: set[str] = set()  # subjects whose missing inputs were logged
        self._norm: dict[str, Normaliser] = {}
        self._follows: dict[str, int] = {}  # windows each subject's baseline followed, for saving
        self._resolved: dict[str, _Resolved] = {}
        self._faulted: set[tuple[str, str]] = set()
        # Stream-key prefixes whose faults were ended elsewhere; the worker drops them from _faulted.
        self._forgotten: deque[str] = deque()
        self._events: deque[Event] = deque(maxlen=1024)
        self._health = _Health()
        # Subjects demoted for out-of-range inputs (-> why), and their in-range windows since.
        self._subject_demoted: dict[str, str] = {}
        self._subject_probes: dict[str, int] = {}
        self.coverage = Coverage(card.name, min_coverage)
        log.info(
            "models %s %s loaded (%s, %s, threshold %.4g)",
            card.name,
            card.version,
            self.backend.name,
            self.backend.precision,
            self.threshold,
        )

    # ---- loop side ---------------------------------------------------------------------

    def applies_to(self, record: WindowRecord) -> bool:
        """True for windows of the card's subject kind (and listed subjects) holding an input stream."""
        if record.kind != self.card.subject_kind or (self._subjects and record.subject not in self._subjects):
            return False
        return self._resolve(record).found > 0

    def resume_fault(self, subject: str, stream_key: str) -> None:
        """A fault of an input stream a previous run left on: its next window in range restores it."""
        if self._fault_alarms:
            self._faulted.add((subject, stream_key))

    def forget_source(self, source: str, device: str | None = None) -> None:
        """Forget the input faults of ``source``'s streams (of ``device`` only): the pipeline ended them.

        Kept, a fault of a retired source would sit in the set for good and send a stray restore
        once a source of the same stream key delivers again.  Applied by the worker before its next
        batch (the set is the worker's).
        """
        self._forgotten.append(f"{source}/" if device is None else f"{source}/{device}/")

    def drain_events(self) -> list[Event]:
        """Sensor-fault alarms and model-health diagnostics raised since the last call (thread-safe)."""
        out: list[Event] = []
        while self._events:
            out.append(self._events.popleft())
        return out

    @property
    def demoted(self) -> bool:
        """True while the statistical fallback scores this model's windows."""
        return self._health.demoted

    def stats(self) -> dict[str, float | str]:
        """Health and per-window latency figures (microseconds) for diagnostics."""
        h = self._health
        lat = np.asarray(h.latencies_us) if h.latencies_us else np.zeros(1)
        return {
            "model": self.name,
            "state": "demoted" if h.demoted else "healthy",
            "precision": self.backend.precision,
            "latency_p50_us": float(np.percentile(lat, 50)),
            "latency_p99_us": float(np.percentile(lat, 99)),
            "model_windows": h.model_windows,
            "fallback_windows": h.fallback_windows,
            "partial_windows": self.coverage.partial_windows,
            "demotions": h.demotions,
            "promotions": h.promotions,
        }

    def subject_states(self, known: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
        """Per subject: ``commissioning`` (learning its normal), ``active`` or ``demoted``.

        ``known`` adds (subject, kind) pairs the pipeline has seen, so subjects without a window
        scored yet are listed too.
        """
        demoted = self._health.demoted
        out: dict[str, str] = {}
        for subject, kind in known:
            if kind == self.card.subject_kind and (not self._subjects or subject in self._subjects):
                out[subject] = "demoted" if demoted else "active" if self._fixed else "commissioning"
        for subject, norm in list(self._norm.items()):
            learning = not self._fixed and (norm.mean is None or norm.std is None)
            out[subject] = "demoted" if demoted else "commissioning" if learning else "active"
        return out

    def recommission(self, subject: str) -> None:
        """Forget a subject's statistics (after maintenance): its next N windows commission it again."""
        self._norm.pop(subject, None)
        self._follows.pop(subject, None)
        path = self._norm_path(subject)
        if path is not None:
            path.unlink(missing_ok=True)

    # ---- model updates (gateway.inference.shadow) ---------------------------------------

    @property
    def demotion_reason(self) -> str:
        """Why the whole model is demoted now (``non_finite_output``, ``latency_budget``, ...), or ""."""
        return self._health.reason if self._health.demoted else ""

    def sibling(self, card: ModelCard, card_dir: Path, *, tag: str) -> AnomalyModel:
        """Another version of this model with this site's settings (subjects, input mapping, rules).

        It keeps its commissioning statistics in memory only until :meth:`keep_state_in` is
        called, and then in files of its own (``<name>.<tag>-...``): a version on trial must not
        overwrite the files of the one that serves, nor a promoted one those of the version it
        may roll back to.
        """
        spec = card.normalisation
        need = self._need if spec.kind == "commissioning" and not self._fixed else spec.windows
        model = AnomalyModel(
            card,
            card_dir,
            backend=self._bundle_backend(card, card_dir, tag),
            commissioning_windows=need,
            plausibility=self._checker,
            subjects=tuple(self._subjects),
            clock=self._clock,
            fault_alarms=self._fault_alarms,
            inputs=self._inputs,
            window_s=self.window_s if self.window_s != self.card.window_s else None,
            min_coverage=self.coverage.min_coverage,
        )
        model.explain_all = self.explain_all
        model._state_name = f"{self.name}.{tag}"
        return model

    def _bundle_backend(self, card: ModelCard, card_dir: Path, tag: str) -> str:
        """The backend a version in ``card_dir`` runs on: the card's (or the site's) where its file came.

        A bundle carries the ONNX file and the other files its card names (numpy weights, .tflite);
        a version whose chosen runtime's file did not come runs on onnxruntime, or a card from a
        recipe would fail to load.  The numpy backend checks its reference scores when it opens and
        LiteRT refuses a file that is no model of the card's shape (a bad file refuses the version);
        "card" still serves the ONNX model where no LiteRT wheel imports.
        """
        asked = "litert" if self._backend_asked == "tflite" else self._backend_asked
        want = wanted_backend(asked, card.backend)
        files: dict[str, tuple[dict[Any, ModelFile], str]] = {
            "numpy": (dict(card.dense_files), "numpy weights"),
            "litert": (dict(card.tflite_files), ".tflite file"),
        }
        if want not in files:
            return "onnxruntime"
        listed, what = files[want]
        spec = listed.get(card.default_precision)
        if spec is not None and (card_dir / spec.path).is_file():
            return asked
        why = f"its bundle carries no {what}" if spec is not None else f"its card lists no {what}"
        log.info("models %s %s: %s: it runs on onnxruntime", self.name, tag, why)
        return "onnxruntime"

    def adopt_commissioning(self, other: AnomalyModel) -> int:
        """Take the per-subject statistics ``other`` has learned (same inputs); how many subjects."""
        if self._fixed or other._keys != self._keys:
            return 0
        taken = 0
        for subject, norm in other._norm.items():
            if norm.mean is not None and norm.std is not None:
                mine = Normaliser.empty(self._n, self._need)
                mine.n, mine.mean, mine.std = self._need, norm.mean.copy(), norm.std.copy()
                if self._track is not None:
                    # The level the active version follows now, not the commissioning mean: the two
                    # versions must judge the same windows against the same baseline to be compared.
                    mine.bound(self._track)
                    level = norm.level if norm.level is not None else norm.mean
                    mine.level = np.clip(level, mine._lo, mine._hi)
                    mine.last_t, mine.normal_s = norm.last_t, norm.normal_s
                self._norm[subject] = mine
                taken += 1
        return taken

    def keep_state_in(self, state_dir: Path | None) -> None:
        """From now on keep commissioning statistics in ``state_dir``; store those learned so far."""
        self._state_dir = state_dir
        for subject, norm in list(self._norm.items()):
            if norm.mean is not None:
                self._save_norm(subject, norm)

    # ---- worker-thread side ------------------------------------------------------------

    def _resolve(self, record: WindowRecord) -> _Resolved:
        streams = tuple(map(_STREAM_OF, record.streams))
        got = self._resolved.get(record.subject)
        if (
            got is not None
            and len(got.streams) == len(streams)
            and all(map(operator.is_, got.streams, streams))
        ):
            return got
        slots: list[tuple[int, str] | None] = []
        for spec in self.card.inputs:
            mapped = self._inputs.get(spec.metric)
            pos = next(
                (
                    i
                    for i, sf in enumerate(record.streams)
                    if input_matches(spec.metric, mapped, sf.stream.metric.name)
                ),
                None,
            )
            slots.append(None if pos is None else (pos, spec.feature))
        picks = tuple(slot for slot in slots if slot is not None)
        columns = [j for j, slot in enumerate(slots) if slot is not None]
        positions = dict.fromkeys(pos for pos, _ in picks)
        rules = tuple((p, r) for p in positions if (r := self._checker.rule_for(streams[p])) is not None)
        got = _Resolved(streams, tuple(slots), len(picks), picks, columns, rules, tuple(positions))
        self._resolved[record.subject] = got
        if got.found < self._n and record.subject not in self._reported:
            self._reported.add(record.subject)
            missing = list(
                dict.fromkeys(
                    s.metric for s, slot in zip(self.card.inputs, slots, strict=True) if slot is None
                )
            )
            log.warning(
                "models %s: subject %s: inputs %s not among its streams (%s): "
                'map them in [[models.use]] inputs = { %s = "<stream>" }',
                self.name,
                record.subject,
                ", ".join(missing),
                ", ".join(sf.stream.metric.name for sf in record.streams),
                missing[0],
            )
        return got

    def _vector(self, record: WindowRecord) -> tuple[F64, int, list[Violation]]:
        """Raw input vector (NaN where absent), how many inputs are present, plausibility breaches."""
        res = self._resolve(record)
        streams = record.streams
        bad = window_breaches(streams, res.rules)
        # None where a window lacks the feature: NaN in the float array (features are never NaN).
        got = [streams[pos].features.get(feat) for pos, feat in res.picks]
        present = len(got) - got.count(None)
        if res.found == self._n:
            x = None if _vector_of is None else _vector_of(got)
            return (np.array(got, np.float64) if x is None else x), present, bad
        x = np.full(self._n, np.nan)
        x[res.columns] = np.array(got, np.float64)
        return x, present, bad

    def _fault_events(self, record: WindowRecord, bad: list[Violation]) -> None:
        """Raise SENSOR_FAULT / SENSOR_RESTORED for the model's input streams on state changes only."""
        now_bad = {v.stream.key: v for v in bad}
        for v in bad:
            key = (record.subject, v.stream.key)
            if key not in self._faulted:
                self._faulted.add(key)
                self._events.append(
                    Alarm(
                        AlarmKind.SENSOR_FAULT,
                        record.subject,
                        record.end_mono,
                        record.end_wall,
                        v.stream,
                        {"rule": v.rule, "value": v.value, "limit": v.limit, "model": self.name},
                    )
                )
        for key in [k for k in self._faulted if k[0] == record.subject and k[1] not in now_bad]:
            stream = next((sf.stream for sf in record.streams if sf.stream.key == key[1]), None)
            if stream is None:
                # Not in this window: after a restart, its source has not delivered yet (a retired
                # source's faults are forgotten). Only a window that holds it can say it is in range.
                continue
            self._faulted.discard(key)
            self._events.append(
                Alarm(
                    AlarmKind.SENSOR_RESTORED,
                    record.subject,
                    record.end_mono,
                    record.end_wall,
                    stream,
                    {"after": "sensor_fault", "rule": "plausibility", "model": self.name},
                )
            )

    def _normaliser(self, subject: str) -> Normaliser:
        norm = self._norm.get(subject)
        if norm is None:
            norm = self._load_norm(subject) or Normaliser.empty(self._n, self._need)
            self._norm[subject] = norm
        return norm

    def _z(self, record: WindowRecord, x: F64, present: int) -> tuple[tuple[F64, float, bool] | None, str]:
        """Normalised inputs (see :func:`_zrow`), or None and why not (commissioning, a gap, too little present)."""
        if self._fixed:
            mean, std = self._fixed_mean, self._fixed_std
        else:
            norm = self._normaliser(record.subject)
            if norm.mean is None or norm.std is None:
                if present == self._n:
                    spec = self.card.normalisation
                    if norm.add(x, spec.min_std_rel, spec.min_std_abs, t=record.end_mono, track=self._track):
                        log.info("models %s: subject commissioned after %d windows", self.name, norm.n)
                        self._save_norm(record.subject, norm)
                return None, "commissioning"
            mean, std = (norm.level if norm.level is not None else norm.mean), norm.std
        if 2 * present < self._n:
            return None, self._absent_reason(record)
        return _zrow(x, mean, std), ""

    def _follow(self, record: WindowRecord, x: F64, flagged: bool | None) -> None:
        """Let a commissioned subject's baseline follow this window (see Normaliser); saved now and then."""
        norm = self._norm.get(record.subject)
        if self._track is None or self._fixed or norm is None or norm.mean is None:
            return
        norm.follow(x, flagged, record.end_mono, self._track)
        n = self._follows[record.subject] = self._follows.get(record.subject, 0) + 1
        if n % _SAVE_LEVEL_EVERY == 0:
            self._save_norm(record.subject, norm)

    def _absent_reason(self, record: WindowRecord) -> str:
        """Why too few inputs are present: "gap" (streams there, no usable sample) or "missing_inputs"."""
        res = self._resolve(record)
        slots = [s for s in res.slots if s is not None]
        if slots and any(record.streams[pos].gap for pos, _ in slots):
            return "gap"
        return "missing_inputs"

    def score_batch(self, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
        """Score windows (any subjects) in one backend call; see the module docstring."""
        t0 = self._clock()
        h = self._health
        spec = self.card.health
        nan = math.nan
        results: list[ModelResult] = [_PENDING] * len(records)  # every slot is set below
        while self._forgotten:
            prefix = self._forgotten.popleft()
            self._faulted = {k for k in self._faulted if not k[1].startswith(prefix)}
        rows: list[int] = []
        zs: list[F64] = []
        xs: list[F64] = []
        zmax_list: list[float] = []  # per row: the largest |z|, an absent (non-finite) input as 0
        finite = True
        for i, rec in enumerate(records):
            x, present, bad = self._vector(rec)
            if (bad or self._faulted) and self._fault_alarms:
                self._fault_events(rec, bad)
            if bad:
                results[i] = ModelResult(nan, False, reason="implausible_input")
                self._follow(rec, x, None)
                continue
            if self.coverage.short_stream(rec.subject, rec.streams, self._resolve(rec).positions):
                # Features over a few seconds of the span are not what the model knows: neither
                # judged nor commissioned on, and the baseline's guard starts again after it.
                results[i] = PARTIAL
                self._follow(rec, x, None)
                continue
            zrow, why = self._z(rec, x, present)
            if zrow is None:
                results[i] = ModelResult(nan, False, reason=why)
                if why != "commissioning":
                    self._follow(rec, x, None)
            else:
                rows.append(i)
                zs.append(zrow[0])
                zmax_list.append(zrow[1])
                finite = finite and zrow[2]
                xs.append(x)
        if not rows:
            return results
        z_all = zs[0] if len(zs) == 1 else np.concatenate(zs)
        clip = self.card.normalisation.clip
        # The per-row decisions are taken on Python lists: a batch holds a few windows, and each
        # numpy operation on them cost more than the loop (most of a window's bookkeeping).
        if not finite:
            # An absent input (NaN) or an overflow sits at its normal value, z = 0 (as zmax_list
            # already counts it).  Most windows have every input: the mask is rarely needed.
            z_all[~np.isfinite(z_all)] = 0.0
        ood_z = spec.ood_z
        ood = [zm > ood_z for zm in zmax_list]
        any_ood = True in ood
        # Out-of-range inputs are one subject's matter (a pump commissioned while idle): that
        # subject alone goes to the fallback, and comes back once its inputs are in range again.
        if any_ood or self._subject_demoted:
            subjects = [records[i].subject for i in rows]
            subject_ok: list[bool] = self._subject_health(subjects, np.array(ood), z_all).tolist()
        else:
            subject_ok = [True] * len(rows)
        reason = ""
        scores: F64 | None = None
        score_list: list[float] = []
        model_rows: list[int] = [r for r, o in enumerate(ood) if not o] if any_ood else []
        xin = z_all[model_rows] if any_ood else z_all
        if len(xin):
            if max(zmax_list) > clip:  # bare ufuncs: np.clip's wrapper costs more
                xin = np.minimum(xin, clip)
                np.maximum(xin, -clip, out=xin)
            try:
                with self._run_lock:
                    out = self.backend.run(xin.astype(np.float32))
            except Exception:  # a failing backend must not take the pipeline down
                log.exception("models %s: backend raised; the fallback scores this batch", self.name)
                reason = "backend_error"
            else:
                score_list = out.tolist()
                if not all(map(math.isfinite, score_list)):
                    reason = "non_finite_output"
                if not any_ood:
                    scores = out
        if scores is None:  # some rows (or all) were not run: NaN there
            scores = np.full(len(rows), np.nan)
            if score_list:
                scores[model_rows] = score_list
            score_list = scores.tolist()
        if not h.demoted and reason:
            self._demote(reason)
        elif h.demoted and not h.reason.startswith("latency"):
            self._probe(not reason)
        serving = not h.demoted
        threshold = self.threshold
        served = [
            serving and not o and ok and math.isfinite(sc)
            for o, ok, sc in zip(ood, subject_ok, score_list, strict=True)
        ]
        flagged = [sv and sc > threshold for sv, sc in zip(served, score_list, strict=True)]
        by_row: dict[int, Mapping[str, float]] = {}
        if True in flagged:
            contrib_rows = [r for r, f in enumerate(flagged) if f]
            contribs = self._explain(z_all[contrib_rows], clip)
            by_row = dict(zip(contrib_rows, contribs, strict=True))
        if self.explain_all:
            for r, sv in enumerate(served):
                if sv and not flagged[r]:
                    by_row[r] = Deferred(functools.partial(self._explain_one, z_all[r : r + 1], clip))
        fb_z = self.card.fallback.z
        for r, i in enumerate(rows):
            self._follow(records[i], xs[r], flagged[r] if served[r] else None)
            if served[r]:
                results[i] = ModelResult(score_list[r], flagged[r], by_row.get(r, {}))
                h.model_windows += 1
            else:
                s = zmax_list[r]
                flag = s > fb_z
                # The fallback is far less sensitive than the model: its "normal" does not show
                # the subject is normal, so it cannot end an episode (indeterminate, "demoted").
                results[i] = ModelResult(
                    s, flag, _zshare(z_all[r], self._keys) if flag else {}, fallback=True, reason="demoted"
                )
                h.fallback_windows += 1
        per_window_us = (self._clock() - t0) * 1e6 / len(records)
        h.latencies_us.append(per_window_us)
        self._latency(per_window_us, spec.latency_budget_us, spec.overruns_to_demote)
        return results

    def _subject_health(
        self, subjects: list[str], ood: npt.NDArray[np.bool_], z: F64
    ) -> npt.NDArray[np.bool_]:
        """Demote and promote per subject on its inputs' range; True where the model may serve."""
        ok = np.ones(len(subjects), bool)
        need = self.card.health.healthy_to_promote
        for r, subject in enumerate(subjects):
            if ood[r]:
                self._subject_probes[subject] = 0
                if subject not in self._subject_demoted:
                    j = int(np.argmax(np.abs(z[r])))
                    why = (
                        f"input {self._keys[j]} at z={z[r, j]:.0f}, beyond +-{self.card.health.ood_z:g} "
                        "of the subject's commissioning statistics (commissioned while idle? delete "
                        f"{self._norm_path(subject) or 'its statistics'} to commission it again)"
                    )
                    self._subject_demoted[subject] = why
                    self._health_event("demoted", "input_out_of_range", subject, self._keys[j], why)
                ok[r] = False
            elif subject in self._subject_demoted:
                n = self._subject_probes.get(subject, 0) + 1
                self._subject_probes[subject] = n
                if n >= need:
                    del self._subject_demoted[subject]
                    self._subject_probes.pop(subject, None)
                    self._health_event(
                        "promoted", "input_out_of_range", subject, "", f"inputs in range for {n} windows"
                    )
                else:
                    ok[r] = False
        return ok

    def _health_event(self, state: str, reason: str, subject: str | None, key: str, why: str) -> None:
        """Log and queue one ``model_health`` diagnostic (a subject's or the model's)."""
        (log.warning if state == "demoted" else log.info)(
            "models %s: %s for subject %s: %s", self.name, state, subject, why
        )
        self._queue_health(state, reason, subject, key)

    def _queue_health(self, state: str, reason: str, subject: str | None = None, key: str = "") -> None:
        """Queue one ``model_health`` diagnostic: the model's (no subject) or a subject's, of one input."""
        detail: dict[str, float | str] = {
            "model": self.name,
            "state": state,
            "reason": reason,
            "precision": self.backend.precision,
        }
        if key:
            detail["input"] = key
        self._events.append(Diagnostic("model_health", subject, time.time(), detail))

    def demoted_for(self, subject: str) -> bool:
        """True while the fallback scores this subject (the model's or the subject's demotion)."""
        return self._health.demoted or subject in self._subject_demoted

    def _latency(self, per_window_us: float, budget_us: float, limit: int) -> None:
        h = self._health
        if per_window_us > budget_us:
            h.overruns += 1
            if not h.demoted and h.overruns >= limit:
                self._demote("latency_budget")
        else:
            h.overruns = 0
            if h.demoted and h.reason.startswith("latency"):
                self._probe(True)

    def _explain_one(self, z: F64, clip: float) -> dict[str, float]:
        """The occlusion shares of one window (a row of ``z``)."""
        return self._explain(z, clip)[0]

    def _explain(self, z: F64, clip: float) -> list[dict[str, float]]:
        """Occlusion shares: score lost when each input alone returns to ``z = 0``."""
        k, n = z.shape
        # Rows 0..n-1 each with one input at 0, row n the window itself: the score the drops are
        # taken from comes from the same batch call as the occluded ones.  A window scored alone
        # takes another path (the numpy backend sums its last layer in Python), which may differ
        # in the last bit: an input without effect must lose exactly nothing, not 1e-22.  The
        # numpy backend scores the probes compiled without building them (an anomaly's window
        # cold: ~89 -> ~53 us for pump_skab); every probe and the window in one call, as here.
        try:
            with self._run_lock:
                backend = self.backend
                out = backend.occlusion(z, clip) if isinstance(backend, DenseBackend) else None
                if out is None:
                    probe = np.repeat(np.clip(z, -clip, clip), n + 1, axis=0).reshape(k, n + 1, n)
                    probe[:, np.arange(n), np.arange(n)] = 0.0
                    out = backend.run(probe.reshape(k * (n + 1), n).astype(np.float32)).reshape(k, n + 1)
        except Exception:  # explanations are best effort; the anomaly itself still goes out
            log.exception("models %s: explanation failed; sending the z-score shares", self.name)
            return [_zshare(row, self._keys) for row in z]
        drops = np.maximum(out[:, n:] - out[:, :n], 0.0)
        drops[~np.isfinite(drops)] = 0.0
        result: list[dict[str, float]] = []
        for r in range(k):
            total = float(drops[r].sum())
            result.append(_top(drops[r] / total, self._keys) if total > 0.0 else _zshare(z[r], self._keys))
        return result

    def _demote(self, reason: str) -> None:
        h = self._health
        h.demoted = True
        h.reason = reason
        h.healthy_probes = 0
        h.demotions += 1
        log.warning("models %s: demoted to the statistical fallback: %s", self.name, reason)
        self._queue_health("demoted", reason)

    def _probe(self, healthy: bool) -> None:
        h = self._health
        h.healthy_probes = h.healthy_probes + 1 if healthy else 0
        if h.healthy_probes >= self.card.health.healthy_to_promote:
            h.demoted = False
            h.promotions += 1
            h.overruns = 0
            log.info(
                "models %s: promoted back after %d healthy probes (%s)", self.name, h.healthy_probes, h.reason
            )
            self._queue_health("promoted", h.reason)
            h.reason = ""
            h.healthy_probes = 0

    # ---- persistence of commissioning statistics -----------------------------------------

    def _norm_path(self, subject: str) -> Path | None:
        return state_file(self._state_dir, self._state_name, subject)

    def _load_norm(self, subject: str) -> Normaliser | None:
        path = self._norm_path(subject)
        if path is None or not path.exists():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            mean = np.asarray(raw["mean"], np.float64)
            std = np.asarray(raw["std"], np.float64)
            ok = raw["version"] == self.card.version and mean.shape == std.shape == (self._n,)
            # Learnt on another window length (a site's window_s changed): not this model's inputs.
            # Files from before per-model windows carry none and are kept.
            if ok and abs(float(raw.get("window_s", self.window_s)) - self.window_s) > 1e-9:
                log.warning(
                    "models %s: stored statistics were learnt on %s s windows, the model runs on %s s: "
                    "commissioning again",
                    self.name,
                    raw["window_s"],
                    self.window_s,
                )
                return None
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok or not (np.isfinite(mean).all() and (std > 0).all()):
            log.warning("models %s: stored commissioning statistics unusable; commissioning again", self.name)
            return None
        norm = Normaliser.empty(self._n, self._need)
        norm.n, norm.mean, norm.std = self._need, mean, std
        try:
            level = np.asarray(raw.get("level", mean), np.float64)
        except (ValueError, TypeError):  # a damaged level only costs where the machine had wandered to
            level = mean
        norm.level = mean.copy()
        if self._track is not None:
            norm.bound(self._track)
            if level.shape == mean.shape and np.isfinite(level).all():
                norm.level = np.clip(level, mean - self._track.cap * std, mean + self._track.cap * std)
        return norm

    def _save_norm(self, subject: str, norm: Normaliser) -> None:
        path = self._norm_path(subject)
        if path is None or norm.mean is None or norm.std is None:
            return
        body: dict[str, object] = {
            "version": self.card.version,
            "window_s": self.window_s,
            "windows": norm.n,
            "mean": norm.mean.tolist(),
            "std": norm.std.tolist(),
        }
        if self._track is not None and norm.level is not None:
            body["level"] = norm.level.tolist()
        store_json(path, body, self.name)


def _top(shares: F64, keys: Sequence[str]) -> dict[str, float]:
    order = np.argsort(-shares)[:TOP_CONTRIBUTIONS]
    return {keys[j]: round(float(shares[j]), 4) for j in order if shares[j] > 0.0}


def _zshare(z: F64, keys: Sequence[str]) -> dict[str, float]:
    """Shares of ``z**2``: the explanation of the fallback score and of a failed occlusion."""
    sq = np.where(np.isfinite(z), z * z, 0.0)
    total = float(sq.sum())
    return _top(sq / total, keys) if total > 0.0 else {}
