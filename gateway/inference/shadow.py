"""Model slots: a new version scored in shadow beside the serving one, then promoted, rejected or rolled back.

A :class:`Slot` is the :class:`~gateway.contracts.WindowModel` the pipeline runs for one
``[[models.use]]`` name.  It serves its *active* version.  A version staged over the downlink
(:mod:`gateway.downlink.bundles`) is a *candidate*: it scores the same live windows in the same
worker thread, its verdicts are counted, never alarmed.  When the shadow period of its
:class:`Acceptance` rules is over (``windows`` judged, or ``seconds``; the clock is also checked
every second, so a period ends when no window comes), the slot compares it with the active
version - alarm rate, agreement, score distribution (two-sample Kolmogorov-Smirnov
statistic), median CPU time per window, health events (non-finite scores, demotions) - and
promotes or rejects it, saying which rule decided.  After a promotion the replaced version stays
loaded (and on disk): a health regression of the new one - a non-finite score, its latency
budget overrun, an alarm storm - puts it back in the window where it shows, and that window is
scored again by the restored version.

Installed versions live in ``<state_dir>/models/bundles/<slot>/v<N>/`` (card and ONNX file);
``<slot>/active.json`` names the version serving (0: the shipped model) and the one before it,
so a restart serves what was promoted.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.contracts import Diagnostic, ModelResult, WindowRecord
from gateway.errors import ConfigError, CorruptDataError
from gateway.inference.card import CARD_SUFFIX, load_card
from gateway.inference.partial import Coverage
from gateway.inference.runner import AnomalyModel, Event
from gateway.inference.statefile import store_json

__all__ = ["Acceptance", "Outcome", "Slot", "ks_statistic", "open_slots", "version_dir"]

log = logging.getLogger(__name__)

#: Health reasons of a promoted version that roll it back at once (a demotion). A latency overrun
#: is not one: it follows the machine's load, and the shadow's median ``latency`` rule judged the
#: version's own time before it was promoted.
REGRESSIONS = frozenset({"non_finite_output", "backend_error"})
#: How a rollback's detail says each regression.
_ROLLBACK_WORDS = {
    "non_finite_output": "demoted for non-finite output",
    "backend_error": "demoted for a backend error",
}


class Acceptance(BaseModel):
    """The rules a candidate must meet over its shadow period; carried in the signed bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    windows: int | None = Field(30, ge=1, le=1_000_000)  # windows the candidate judged
    seconds: float | None = Field(None, gt=0, le=30 * 86_400)  # or this long after staging
    # A period counted in windows ends here at the latest: a candidate whose subjects are seldom or
    # never scored (an empty bed, a machine stopped) is rejected, not left in shadow for ever.
    max_wait_s: float = Field(86_400.0, gt=0, le=30 * 86_400)
    max_alarm_rate: float = Field(0.2, ge=0, le=1)  # anomalous share of the candidate's judged windows
    min_agreement: float = Field(0.8, ge=0, le=1)  # same verdict as the active version, where both judged
    max_score_shift: float = Field(1.0, ge=0, le=1)  # KS statistic, candidate vs active scores (1: off)
    max_latency_us: float | None = Field(None, gt=0)  # median CPU time per window; None: the card's budget
    max_health_events: int = Field(0, ge=0)  # non-finite scores / demotions allowed during the shadow
    # After promotion: an alarm storm (this share of the last storm_windows anomalous) rolls back.
    storm_windows: int = Field(10, ge=2, le=100_000)
    storm_rate: float = Field(0.8, gt=0, le=1)

    @model_validator(mode="after")
    def _period(self) -> Self:
        if self.windows is None and self.seconds is None:
            raise ValueError("a shadow period needs windows or seconds")
        if self.seconds is not None and self.seconds > self.max_wait_s:
            raise ValueError(f"seconds ({self.seconds:g}) is past max_wait_s ({self.max_wait_s:g})")
        return self


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a version: ``promoted``, ``rejected`` or ``rolled-back``, with the rule and the figures."""

    kind: str
    version: int
    reason: str  # a word: alarm-rate, agreement, score-shift, latency, health, no-windows, ...
    detail: str
    figures: dict[str, float] = field(default_factory=dict)
    restored: int | None = None  # for a rollback: the version serving again


@dataclass(slots=True)
class _Trial:
    model: AnomalyModel
    version: int
    rules: Acceptance
    started: float
    judged: int = 0
    alarms: int = 0
    both: int = 0
    agree: int = 0
    health: int = 0
    scores: list[float] = field(default_factory=list)
    active_scores: list[float] = field(default_factory=list)
    latency_us: list[float] = field(default_factory=list)


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    if not a or not b:
        return 0.0
    xa, xb = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([xa, xb])
    fa = np.searchsorted(xa, grid, side="right") / len(xa)
    fb = np.searchsorted(xb, grid, side="right") / len(xb)
    return float(np.max(np.abs(fa - fb)))


def _judged(r: ModelResult) -> bool:
    return not r.fallback and not r.reason and math.isfinite(r.score)


class Slot:
    """One model slot: the active version, perhaps a candidate in shadow and the version before."""

    #: Its versions (carded models) vet their own inputs: the pipeline need not vet its windows.
    checks_plausibility = True

    def __init__(
        self,
        model: AnomalyModel,
        *,
        version: int = 0,
        previous: AnomalyModel | None = None,
        previous_version: int | None = None,
        state_dir: Path | None = None,
        rules: Acceptance | None = None,
    ) -> None:
        self.name = model.name
        self.active = model
        self.version = version  # 0: the shipped model
        self.previous = previous
        self.previous_version = previous_version
        self._state_dir = state_dir
        self._rules = rules or Acceptance()
        self._lock = threading.Lock()
        self._trial: _Trial | None = None
        self._outcomes: deque[Outcome] = deque(maxlen=64)
        self._events: deque[Event] = deque(maxlen=256)
        self._recent: deque[bool] = deque(maxlen=self._rules.storm_windows)

    # ---- what the pipeline and the status board see: the active version ----------------------

    @property
    def card(self) -> Any:
        """The active version's card."""
        return self.active.card

    @property
    def window_s(self) -> float:
        """The window length the active version is scored on."""
        return self.active.window_s

    @property
    def subject_kind(self) -> str:
        """The subject kind the active version scores."""
        return self.active.subject_kind

    @property
    def explain_all(self) -> bool:
        """True when every served window is explained (a fusion reads this model's inputs)."""
        return self.active.explain_all

    @explain_all.setter
    def explain_all(self, value: bool) -> None:
        self.active.explain_all = value
        if self.previous is not None:
            self.previous.explain_all = value

    @property
    def demoted(self) -> bool:
        """True while the active version is demoted to its fallback."""
        return self.active.demoted

    def applies_to(self, record: WindowRecord) -> bool:
        """True for windows the active version scores."""
        return self.active.applies_to(record)

    def stats(self) -> dict[str, float | str]:
        """The active version's figures."""
        return self.active.stats()

    @property
    def coverage(self) -> Coverage:
        """The active version's coverage rule and its count of partial windows."""
        return self.active.coverage

    def subject_states(self, known: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
        """The active version's per-subject states."""
        return self.active.subject_states(known)

    def recommission(self, subject: str) -> None:
        """Forget a subject's statistics in the active version."""
        self.active.recommission(subject)

    def demoted_for(self, subject: str) -> bool:
        """True while the fallback scores this subject."""
        return self.active.demoted_for(subject)

    def resume_fault(self, subject: str, stream_key: str) -> None:
        """A fault of an input a previous run left on: the active version judges it."""
        self.active.resume_fault(subject, stream_key)

    def forget_source(self, source: str, device: str | None = None) -> None:
        """Forget the input faults of ``source``'s streams (of ``device`` only) in the versions that alarm."""
        self.active.forget_source(source, device)
        if self.previous is not None:
            self.previous.forget_source(source, device)

    def drain_events(self) -> list[Event]:
        """The active version's events and the slot's own (promotions, rollbacks)."""
        out = self.active.drain_events()
        while self._events:
            out.append(self._events.popleft())
        return out

    # ---- the downlink's side (event loop) ----------------------------------------------------

    @property
    def candidate(self) -> dict[str, Any] | None:
        """The version in shadow and its progress, or None."""
        trial = self._trial
        if trial is None:
            return None
        return {
            "version": trial.version,
            "judged": trial.judged,
            "of": trial.rules.windows,
            "seconds": round(time.monotonic() - trial.started, 1),
        }

    def stage(self, model: AnomalyModel, version: int, rules: Acceptance) -> str:
        """Put ``model`` in shadow; says how its commissioning starts."""
        how = "redo"
        if model.card.commissioning_on_update == "carry":
            taken = model.adopt_commissioning(self.active)
            how = f"carried over for {taken} subject(s)" if taken else "redo (nothing to carry over)"
        with self._lock:
            before, self._trial = self._trial, _Trial(model, version, rules, time.monotonic())
        if before is not None:
            detail = f"v{version} came before its shadow period was over"
            self._note(Outcome("rejected", before.version, "superseded", detail))
        log.info(
            "models %s: v%d in shadow beside v%d; commissioning %s", self.name, version, self.version, how
        )
        return how

    def expire(self, now: float | None = None) -> None:
        """End a shadow period that is over by the clock alone (its windows may never come)."""
        with self._lock:
            trial = self._trial
        if trial is None:
            return
        rules = trial.rules
        waited = (time.monotonic() if now is None else now) - trial.started
        if rules.seconds is not None and waited >= rules.seconds:
            self._judge(trial)
        elif waited >= rules.max_wait_s:
            self._decide(
                trial,
                "rejected",
                "no-windows" if trial.judged == 0 else "too-few-windows",
                f"judged {trial.judged} of {rules.windows} windows in {waited / 3600:.1f} h "
                f"(max_wait_s {rules.max_wait_s:g}): its subjects were seldom scored; send it again "
                "when they are monitored, or with a shadow period in seconds",
            )

    def take_outcomes(self) -> list[Outcome]:
        """Promotions, rejections and rollbacks decided since the last call."""
        out: list[Outcome] = []
        while self._outcomes:
            out.append(self._outcomes.popleft())
        return out

    # ---- the worker thread ---------------------------------------------------------------------

    def score_batch(self, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
        """Score with the active version; run the candidate beside it, or guard a fresh promotion."""
        with self._lock:
            active, trial = self.active, self._trial
        results = active.score_batch(records)
        if trial is not None:
            self._shadow(trial, records, results)
        elif self.previous is not None:
            why = self._regression(active, results)
            if why:
                results = self._roll_back(why, records)
        return results

    def _shadow(self, trial: _Trial, records: Sequence[WindowRecord], results: Sequence[ModelResult]) -> None:
        picked = [i for i, r in enumerate(records) if trial.model.applies_to(r)]
        if picked:
            t0 = time.thread_time()
            try:
                theirs = trial.model.score_batch([records[i] for i in picked])
            except Exception as exc:  # noqa: BLE001 - a candidate that breaks is rejected, the pipeline goes on
                self._decide(trial, "rejected", "health", f"scoring raised {type(exc).__name__}: {exc}")
                return
            trial.latency_us.append((time.thread_time() - t0) * 1e6 / len(picked))
            for i, c in zip(picked, theirs, strict=True):
                a = results[i]
                if not _judged(c):
                    continue
                trial.judged += 1
                trial.alarms += c.anomaly
                trial.scores.append(c.score)
                if _judged(a):
                    trial.both += 1
                    trial.agree += a.anomaly == c.anomaly
                    trial.active_scores.append(a.score)
        # The candidate's alarms are counted above, never raised; its demotions are counted. Being
        # over budget is not: load alone would reject it; the median ``latency`` rule judges time.
        for event in trial.model.drain_events():
            if isinstance(event, Diagnostic) and event.detail.get("state") == "demoted":
                trial.health += 1
        rules = trial.rules
        if trial.health > rules.max_health_events:
            self._decide(
                trial,
                "rejected",
                "health",
                f"{trial.health} health event(s) (demotions for non-finite scores or backend errors), "
                f"{rules.max_health_events} allowed",
            )
            return
        over = (rules.windows is not None and trial.judged >= rules.windows) or (
            rules.seconds is not None and time.monotonic() - trial.started >= rules.seconds
        )
        if over:
            self._judge(trial)

    def _judge(self, trial: _Trial) -> None:
        rules = trial.rules
        n = trial.judged
        rate = trial.alarms / n if n else 0.0
        agreement = trial.agree / trial.both if trial.both else 1.0
        shift = ks_statistic(trial.scores, trial.active_scores)
        latency = float(np.median(trial.latency_us)) if trial.latency_us else 0.0
        budget = rules.max_latency_us or trial.model.card.health.latency_budget_us
        figures = {
            "windows": float(n),
            "alarm_rate": round(rate, 4),
            "agreement": round(agreement, 4),
            "score_shift": round(shift, 4),
            "latency_us": round(latency, 1),
        }
        if n == 0:
            verdict = ("no-windows", "the candidate judged no window in its shadow period")
        elif rate > rules.max_alarm_rate:
            verdict = ("alarm-rate", f"alarm rate {rate:.3f} over {n} windows > {rules.max_alarm_rate:g}")
        elif latency > budget:
            verdict = ("latency", f"median {latency:.0f} us per window > {budget:g} us")
        elif agreement < rules.min_agreement:
            verdict = (
                "agreement",
                f"agrees with v{self.version} on {agreement:.3f} of {trial.both} windows < {rules.min_agreement:g}",
            )
        elif shift > rules.max_score_shift:
            verdict = (
                "score-shift",
                f"score distribution shift (KS) {shift:.3f} > {rules.max_score_shift:g}",
            )
        else:
            summary = (
                f"alarm rate {rate:.3f}, agreement {agreement:.3f}, KS {shift:.3f}, median {latency:.0f} us"
            )
            verdict = ("", f"{n} windows: {summary}")
        reason, detail = verdict
        self._decide(trial, "promoted" if not reason else "rejected", reason or "rules-met", detail, figures)

    def _decide(
        self, trial: _Trial, kind: str, reason: str, detail: str, figures: dict[str, float] | None = None
    ) -> None:
        with self._lock:
            if self._trial is not trial:
                return  # decided already: by the worker's window and the clock at the same moment
            self._trial = None
            if kind == "promoted":
                self.previous, self.previous_version = self.active, self.version
                self.active, self.version = trial.model, trial.version
                self._rules = trial.rules
                self._recent = deque(maxlen=trial.rules.storm_windows)
        if kind == "promoted":
            trial.model.keep_state_in(self._state_dir)
            log.info("models %s: v%d promoted: %s", self.name, trial.version, detail)
        else:
            log.warning(
                "models %s: v%d rejected after its shadow period: %s: %s",
                self.name,
                trial.version,
                reason,
                detail,
            )
        self._note(Outcome(kind, trial.version, reason, detail, figures or {}))

    def _regression(self, active: AnomalyModel, results: Sequence[ModelResult]) -> str:
        """Why the freshly promoted version must go back ("" when it is healthy)."""
        why = active.demotion_reason
        if why in REGRESSIONS:
            return why
        for r in results:
            if _judged(r):
                self._recent.append(r.anomaly)
        rules = self._rules
        if (
            len(self._recent) == rules.storm_windows
            and sum(self._recent) >= rules.storm_rate * rules.storm_windows
        ):
            return "alarm-storm"
        return ""

    def _roll_back(self, why: str, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
        with self._lock:
            bad, bad_version = self.active, self.version
            assert self.previous is not None
            self.active, self.version = self.previous, self.previous_version or 0
            self.previous, self.previous_version = None, None
        bad.drain_events()  # its own demotion notice: the rollback below says what happened
        self.active.keep_state_in(self._state_dir)  # its statistics files again (the other wrote there)
        detail = (
            f"v{bad_version} {_ROLLBACK_WORDS.get(why, why.replace('_', ' '))}: v{self.version} serves again"
        )
        log.warning("models %s: rolled back: %s", self.name, detail)
        self._note(Outcome("rolled-back", bad_version, why.replace("_", "-"), detail, restored=self.version))
        return self.active.score_batch(records)

    def _note(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        # Plain tokens only, as the anonymizer lets through: "rolled_back", "alarm_rate".
        detail: dict[str, float | str] = {
            "model": self.name,
            "state": outcome.kind.replace("-", "_"),
            "version": outcome.version,
            "reason": outcome.reason.replace("-", "_"),
        }
        self._events.append(Diagnostic("model_update", None, time.time(), detail))


# ---- installed versions on disk -----------------------------------------------------------------


def slot_dir(state_dir: Path, slot: str) -> Path:
    """Where a slot's installed versions and ``active.json`` live."""
    return state_dir / "models" / "bundles" / slot


def version_dir(state_dir: Path, slot: str, version: int) -> Path:
    """Where version ``version`` of ``slot`` is installed (card and model file)."""
    return slot_dir(state_dir, slot) / f"v{version}"


def read_installed(state_dir: Path, slot: str) -> tuple[int, int | None]:
    """(version serving, version before it) from ``active.json``; (0, None) for the shipped model."""
    path = slot_dir(state_dir, slot) / "active.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return int(raw["version"]), None if raw.get("previous") is None else int(raw["previous"])
    except FileNotFoundError:
        return 0, None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("models %s %s: unreadable (%s): the shipped model serves", slot, path, exc)
        return 0, None


def write_installed(state_dir: Path, slot: str, version: int, previous: int | None) -> None:
    """Record which version serves (atomically)."""
    store_json(slot_dir(state_dir, slot) / "active.json", {"version": version, "previous": previous}, slot)


def open_version(shipped: AnomalyModel, state_dir: Path, version: int) -> AnomalyModel:
    """An installed version of ``shipped``'s slot, with the site's settings; ConfigError/CorruptDataError when it does not load."""
    if version == 0:
        return shipped
    where = version_dir(state_dir, shipped.name, version)
    model = shipped.sibling(load_card(where / f"{shipped.name}{CARD_SUFFIX}"), where, tag=f"v{version}")
    model.keep_state_in(state_dir)
    return model


def open_slots(models: Sequence[AnomalyModel], state_dir: Path | None) -> list[Slot]:
    """A slot per built model, serving the version promoted over the downlink where there is one."""
    slots: list[Slot] = []
    for shipped in models:
        if state_dir is None:
            slots.append(Slot(shipped))
            continue
        version, previous = read_installed(state_dir, shipped.name)
        try:
            active = open_version(shipped, state_dir, version)
        except (ConfigError, CorruptDataError) as exc:
            log.error(
                "models %s: installed v%d does not load (%s): the shipped model serves",
                shipped.name,
                version,
                exc,
            )
            active, version, previous = shipped, 0, None
        before = None
        if previous is not None:
            try:
                before = open_version(shipped, state_dir, previous)
            except (ConfigError, CorruptDataError) as exc:
                log.warning("models %s: v%d to roll back to does not load: %s", shipped.name, previous, exc)
                previous = None
        slots.append(
            Slot(active, version=version, previous=before, previous_version=previous, state_dir=state_dir)
        )
    return slots
