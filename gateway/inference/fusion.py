"""A fused verdict over several window models of one subject (``[[models.fusion]]``).

A fusion card (``<name>.fusion.json`` in the models directory, written by its recipe) names its
members - models the pipeline already runs, each on its own window - and how their scores are
put on one scale: each member's score ``s`` becomes ``u`` (``log_odds``: the log-odds of a
probability over the member's threshold, 0 at that threshold; ``log``: ``log s`` for a score that
is 1 at its limit, as the novelty detector's), divided by its ``scale`` (its spread on the training
data).  The fused score is ``sum(weight * u / scale)``; the window is anomalous above ``tau``.

The fusion's verdict is three-valued like a model's: a window one member cannot judge (a gap in
its window, commissioning, a demoted model, a missing result) is indeterminate with that member's
reason.  The pipeline raises the fusion's episodes and not its members' on the subjects the fusion
scores: one alarm per episode, whose explanation lists the contributing inputs of every member,
each weighted by its member's share of the fused score.  The members' scores are still sent with
the window record.

Pure arithmetic on the members' results; the pipeline calls :meth:`FusionModel.fuse` on the loop.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.contracts import ModelResult, WindowRecord
from gateway.errors import ConfigError
from gateway.inference.build import FusionUse, card_file, default_models_dir
from gateway.inference.novelty import named

__all__ = [
    "FUSION_SUFFIX",
    "FusionCard",
    "FusionModel",
    "Member",
    "build_fusions",
    "load_fusion",
]

#: A fusion's card is ``<name>.fusion.json`` in the models directory.
FUSION_SUFFIX = ".fusion.json"
log = logging.getLogger(__name__)

_EPS = 1e-6
#: Inputs each member contributes to an explanation (by its own ranking).
_PER_MEMBER = 3


class Member(BaseModel):
    """One member of a fusion: which model, how its score is put on the fused scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")  # a model's name as the pipeline runs it
    transform: Literal["log_odds", "log"]
    threshold: float | None = Field(None, gt=0, lt=1)  # log_odds: the member's own threshold
    weight: float = Field(ge=0)
    scale: float = Field(gt=0)
    window_s: float | None = Field(None, gt=0)  # the window the member was chosen on
    # Settings the member's config must have (e.g. the novelty detector's ewma, var_keep).
    settings: dict[str, float | list[str]] = Field(default_factory=dict)

    def u(self, score: float) -> float:
        """The member's score on the fused scale (before weight and scale)."""
        if self.transform == "log":
            return math.log(max(score, _EPS))
        p = min(max(score, _EPS), 1.0 - _EPS)
        t = min(max(self.threshold or 0.5, _EPS), 1.0 - _EPS)
        return math.log(p / (1.0 - p)) - math.log(t / (1.0 - t))


class FusionCard(BaseModel):
    """What a fusion's recipe chose: its members, their scales and weights, the threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    version: str
    subject_kind: Literal["industrial", "medical"]
    members: tuple[Member, ...] = Field(min_length=2)
    tau: float
    hop_s: float | None = Field(None, gt=0)  # the hop the settings were chosen at
    training: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)


def load_fusion(path: Path) -> FusionCard:
    """Read and check a fusion card; ConfigError saying what is wrong."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return FusionCard.model_validate(raw)
    except OSError as exc:
        raise ConfigError(f"models fusion {path}: cannot read: {exc.strerror}: check [models] dir") from exc
    except (ValueError, ValidationError) as exc:
        raise ConfigError(
            f"models fusion {path}: not a valid fusion card: {exc}: write it again with its recipe"
        ) from exc


class FusionModel:
    """A fused verdict over member models' results; see the module docstring."""

    def __init__(self, card: FusionCard, *, tau: float | None = None, subjects: Sequence[str] = ()) -> None:
        self.card = card
        self.name = card.name
        self.members = card.members
        self.tau = card.tau if tau is None else tau
        self.subject_kind = card.subject_kind
        self._subjects = frozenset(subjects)
        self.member_names = frozenset(m.model for m in card.members)

    def applies_to(self, record: WindowRecord) -> bool:
        """Windows of the card's subject kind (and listed subjects)."""
        return record.kind == self.subject_kind and (not self._subjects or record.subject in self._subjects)

    def fuse(self, results: Mapping[str, ModelResult]) -> ModelResult:
        """The fused verdict on one window from its members' results (by model name)."""
        terms: list[float] = []
        for m in self.members:
            r = results.get(m.model)
            if r is None:
                return ModelResult(math.nan, False, reason="missing_inputs")
            if r.reason or r.fallback or not math.isfinite(r.score):
                return ModelResult(math.nan, False, reason=r.reason or "demoted")
            terms.append(m.weight * m.u(r.score) / m.scale)
        score = sum(terms)
        anomalous = score > self.tau
        return ModelResult(score, anomalous, self._explain(terms, results) if anomalous else {})

    def _explain(self, terms: list[float], results: Mapping[str, ModelResult]) -> dict[str, float]:
        """Each member's top inputs, weighted by its share of the fused score's positive part."""
        pos = [max(t, 0.0) for t in terms]
        total = sum(pos)
        shares = [p / total for p in pos] if total > 0.0 else [1.0 / len(terms)] * len(terms)
        out: dict[str, float] = {}
        for m, share in zip(self.members, shares, strict=True):
            contrib = results[m.model].contributions
            for key, c in sorted(contrib.items(), key=lambda kv: -kv[1])[:_PER_MEMBER]:
                out[key] = out.get(key, 0.0) + share * c
        norm = sum(out.values())
        if not norm > 0.0:
            return {}
        return {k: round(v / norm, 4) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def fuse_window(
    fusions: Sequence[FusionModel], record: WindowRecord, verdicts: dict[str, ModelResult]
) -> set[str]:
    """Add the verdict of each fusion that applies to ``verdicts``; the members whose alarms it raises.

    A fusion applies to a window of its subjects that every member has judged (a subject one
    member does not score keeps its members' own alarms).
    """
    fused: set[str] = set()
    for fusion in fusions:
        if fusion.applies_to(record) and fusion.member_names <= verdicts.keys():
            verdicts[fusion.name] = fusion.fuse(verdicts)
            fused |= fusion.member_names
    return fused


#: List settings a site may extend with names of its own streams (the card's names stay in them):
#: which streams wander with ambient or run time is a fact of the site, not of the fusion's choice.
_SITE_NAMES = frozenset({"spread_only"})


def _same(key: str, got: object, want: float | list[str]) -> bool:
    if isinstance(want, list):
        if not isinstance(got, list):
            return False
        return set(want) <= set(got) if key in _SITE_NAMES else sorted(got) == sorted(want)
    return isinstance(got, int | float) and math.isclose(float(got), want)


def _check_site_names(fusion: str, member: Member, use: Any, streams: Sequence[str] | None) -> None:
    """Refuse a name a site added to a member's list setting that names none of the detector's inputs.

    The inputs are its ``inputs`` names when set, else the streams of the configured sources
    (``streams``; None: known only at run time, not checked).  A name matches an input as the
    detector matches streams: the whole metric name or its last segments, either way round.
    """
    pool = list(use.inputs) or streams
    if pool is None:
        return
    for key in _SITE_NAMES & member.settings.keys():
        card = member.settings[key]
        extra = [n for n in getattr(use, key) if isinstance(card, list) and n not in card]
        unmatched = [n for n in extra if not any(named(p, [n]) or named(n, [p]) for p in pool)]
        if unmatched:
            where = "its inputs" if use.inputs else "the streams of the configured sources"
            raise ConfigError(
                f"config [[models.fusion]] {fusion}: member {member.model}: [models.novelty] {key} "
                f"{', '.join(unmatched)}: matches no input of the detector ({where}: {', '.join(pool) or 'none'}): "
                "name a stream by its whole metric name or its last segments, or remove the name"
            )


def _check_member(
    fusion: str, member: Member, model: Any, novelty: Any, pipeline_s: float, streams: Sequence[str] | None
) -> None:
    """Refuse a member configured otherwise than the fusion's settings were chosen for."""
    window = getattr(model, "window_s", None) or pipeline_s
    if member.window_s is not None and abs(window - member.window_s) > 1e-9:
        raise ConfigError(
            f"config [[models.fusion]] {fusion}: member {member.model} is scored on {window:g} s windows, "
            f"the fusion was chosen with {member.window_s:g} s: set its window_s = {member.window_s:g}"
        )
    if member.settings and model is novelty:
        use = novelty.use
        wrong = [k for k, v in member.settings.items() if not _same(k, getattr(use, k, None), v)]
        if wrong:
            want = ", ".join(f"{k} = {v}" for k, v in member.settings.items())
            got = ", ".join(f"{k} = {getattr(use, k)}" for k in wrong)
            extend = sorted(_SITE_NAMES & set(wrong))
            also = f" ({', '.join(extend)} may also name streams of this site)" if extend else ""
            raise ConfigError(
                f"config [[models.fusion]] {fusion}: member {member.model}: [models.novelty] has {got}: "
                f"the fusion was chosen with {want}: set them{also}"
            )
        _check_site_names(fusion, member, use, streams)


def build_fusions(
    uses: Sequence[FusionUse],
    models: Sequence[Any],
    directory: Path | None,
    *,
    hop_s: float,
    window_s: float,
    streams: Sequence[str] | None = None,
) -> list[FusionModel]:
    """The fusions ``[[models.fusion]]`` asks for, over ``models`` (the pipeline's, by name).

    ``directory``: the ``[models] dir`` (None: the shipped models).  ``window_s`` is the
    pipeline's (the window of a model that has none of its own).  ``streams``: the metric names
    of the streams the novelty detector may take (None: known only at run time), against which a
    ``spread_only`` name a site added is checked when it lists no ``inputs``.  Every
    member must be a configured model, run as the fusion's settings were chosen; its
    results are then explained on every window (``explain_all``; a window the member does not
    flag when its contributions are read), so a fused anomaly can name inputs of a member that
    did not flag the window alone.
    """
    if not uses:
        return []  # the card module and the models folder are looked at only with fusions
    directory = directory or default_models_dir()
    by_name = {getattr(m, "name", ""): m for m in models}
    novelty = by_name.get("novelty")
    out: list[FusionModel] = []
    seen: set[str] = set()
    for use in uses:
        if use.name in seen:
            raise ConfigError(f"config [[models.fusion]] {use.name}: listed twice: keep one entry")
        seen.add(use.name)
        card = load_fusion(card_file(directory, use.name, FUSION_SUFFIX, "config [[models.fusion]]"))
        missing = [m.model for m in card.members if m.model not in by_name]
        if missing:
            raise ConfigError(
                f"config [[models.fusion]] {use.name}: members {', '.join(missing)} not configured: "
                "add them ([[models.use]] name = ..., [models.novelty] for novelty)"
            )
        if card.name in by_name:
            raise ConfigError(f"config [[models.fusion]] {use.name}: a model has the same name: rename one")
        for member in card.members:
            _check_member(use.name, member, by_name[member.model], novelty, window_s, streams)
            by_name[member.model].explain_all = True
        if card.hop_s is not None and abs(card.hop_s - hop_s) > 1e-9:
            # The episode logic counts windows: at another hop an episode takes another time to raise.
            log.warning(
                "models %s: settings chosen at hop %g s, the pipeline's hop is %g s",
                card.name,
                card.hop_s,
                hop_s,
            )
        out.append(FusionModel(card, tau=use.tau, subjects=use.subjects))
    return out
