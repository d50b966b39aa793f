"""Anomaly episodes from three-valued verdicts, with hysteresis: one alarm per episode.

A window's verdict is anomalous, normal or indeterminate (with a reason: a gap, an implausible
input, missing inputs, commissioning, a demoted model).  Only scored *normal* windows end an
episode, and only ``clear_after`` of them in a row: a probe slipping off during a desaturation
leaves the episode open and says so (``anomaly_indeterminate`` with the reason) instead of telling
the twin the patient recovered.

Transitions (per subject and model)::

    idle   --anomalous x M--> active emit anomaly              (M = raise_after, the condition delay)
    active --normal x N--> idle     emit anomaly_cleared        (N = clear_after)
    active --indeterminate-> unsure emit anomaly_indeterminate (reason)
    unsure --anomalous-->  active   emit anomaly (resumed)
    unsure --normal x N--> idle     emit anomaly_cleared
    idle   --normal / indeterminate--> idle (nothing)

An indeterminate window inside an episode starts the run of normal windows over.  Pure logic.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from gateway.contracts import Alarm, AlarmKind, ModelResult, WindowRecord

__all__ = ["Emission", "EpisodeState", "EpisodeTracker", "episode_alarm"]


class EpisodeState(enum.Enum):
    """Where one (subject, model) episode stands."""

    IDLE = "idle"
    ACTIVE = "active"
    UNSURE = "unsure"  # inside an episode, the latest verdicts could not judge the subject


@dataclass(frozen=True, slots=True)
class Emission:
    """What to raise for one verdict: the alarm kind and what to put in its detail."""

    kind: AlarmKind
    detail: dict[str, float | str] = field(default_factory=dict)
    result: ModelResult | None = None
    held_s: float | None = None  # since the episode's first anomalous window (when times are given)


@dataclass(slots=True)
class _Episode:
    state: EpisodeState = EpisodeState.IDLE
    normal_run: int = 0
    anomalous_run: int = 0  # while idle: anomalous windows in a row (alarm condition delay)
    reason: str = ""
    onset: float = math.nan  # time of the first anomalous window of the run or episode


class EpisodeTracker:
    """Per-key episode state machines; :meth:`update` says what each verdict must raise."""

    def __init__(self, clear_after: int = 2, raise_after: int = 1) -> None:
        if clear_after < 1 or raise_after < 1:
            raise ValueError(f"episodes: clear_after {clear_after}, raise_after {raise_after}: must be >= 1")
        self.clear_after = clear_after
        self.raise_after = raise_after
        self._eps: dict[tuple[str, str], _Episode] = {}

    def state(self, key: tuple[str, str]) -> EpisodeState:
        """The state of one (subject, model) episode."""
        ep = self._eps.get(key)
        return EpisodeState.IDLE if ep is None else ep.state

    def active(self) -> list[tuple[str, str]]:
        """The (subject, model) keys inside an episode now (active or unsure)."""
        return [key for key, ep in self._eps.items() if ep.state is not EpisodeState.IDLE]

    def resume(self, key: tuple[str, str]) -> None:
        """An episode a previous run left on: active again, so ``clear_after`` normal windows end it.

        Anomalous windows then send nothing (the episode goes on), indeterminate ones say so as
        inside any episode.  Its onset before the stop is not known here: the pipeline gives its
        alarms their ``held`` from the alarm ledger, which keeps it.
        """
        ep = self._eps.get(key)
        if ep is None:
            ep = self._eps[key] = _Episode()
        ep.state, ep.normal_run, ep.anomalous_run, ep.reason = EpisodeState.ACTIVE, 0, 0, ""

    def forget(self, subject: str) -> None:
        """Drop every episode of ``subject`` (ended elsewhere: its source removed or changed)."""
        self._eps = {k: ep for k, ep in self._eps.items() if k[0] != subject}

    def update(self, key: tuple[str, str], result: ModelResult, t: float = math.nan) -> Emission | None:
        """Fold one window's verdict (its end at ``t``) into its episode; the alarm it raises, if any."""
        ep = self._eps.get(key)
        if ep is None:
            ep = self._eps[key] = _Episode()
        verdict = result.verdict
        if verdict == "anomalous":
            ep.normal_run = 0
            if ep.state is EpisodeState.ACTIVE:
                return None
            resumed = ep.state is EpisodeState.UNSURE
            if not resumed:
                if ep.anomalous_run == 0:
                    ep.onset = t
                ep.anomalous_run += 1
                if ep.anomalous_run < self.raise_after:
                    return None
            ep.anomalous_run = 0
            ep.state, ep.reason = EpisodeState.ACTIVE, ""
            detail: dict[str, float | str] = {"episode": "resumed"} if resumed else {}
            return Emission(AlarmKind.ANOMALY, detail, result, self._held(ep, t))
        if ep.state is EpisodeState.IDLE:
            ep.anomalous_run = 0
            return None
        if verdict == "indeterminate":
            ep.normal_run = 0
            if ep.state is EpisodeState.UNSURE and ep.reason == result.reason:
                return None
            ep.state, ep.reason = EpisodeState.UNSURE, result.reason
            return Emission(
                AlarmKind.ANOMALY_INDETERMINATE, {"reason": result.reason}, result, self._held(ep, t)
            )
        ep.normal_run += 1
        if ep.normal_run < self.clear_after:
            return None
        ep.state, ep.normal_run, ep.reason = EpisodeState.IDLE, 0, ""
        return Emission(
            AlarmKind.ANOMALY_CLEARED, {"normal_windows": self.clear_after}, result, self._held(ep, t)
        )

    @staticmethod
    def _held(ep: _Episode, t: float) -> float | None:
        held = t - ep.onset
        return round(held, 3) if math.isfinite(held) else None


def episode_alarm(emission: Emission, record: WindowRecord, model: str) -> Alarm:
    """The alarm an emission raises for the window that caused it."""
    result = emission.result
    detail: dict[str, float | str] = {"model": model}
    contributions: dict[str, float] = {}
    if result is not None and math.isfinite(result.score):
        detail["score"] = round(result.score, 4)
    if result is not None and result.fallback:
        detail["fallback"] = 1
    detail.update(emission.detail)
    if emission.kind is AlarmKind.ANOMALY and result is not None:
        contributions = dict(result.contributions)
    return Alarm(
        emission.kind,
        record.subject,
        record.end_mono,
        record.end_wall,
        detail=detail,
        contributions=contributions,
        held_s=emission.held_s,
        subject_kind=record.kind,
    )
