"""Model coverage: which models will score which subject, and what is missing where they will not.

A model scores a subject when the subject's streams hold its inputs.  An input is found by the
model card's metric name - the stream's whole name or its last path segments (``RateRMS`` matches
``Pump1/RateRMS``) - unless ``[[models.use]] inputs`` maps it to a stream of another name::

    [[models.use]]
    name = "pump_skab"
    inputs = { RateRMS = "Pump1/Hydraulics/Flow", Thermocouple = "Pump1/Hydraulics/FluidTemperature" }

A model that normalises per subject (``commissioning``) learns only from windows holding every
input, so it needs all of them; a ``fixed`` one scores with half of them present.  What the
streams of a source are called is known before it runs for most drivers (the driver config's
``metric_names()``); where it is not, the runner reports missing inputs once the first windows
arrive.  Pure, no I/O beyond reading model cards.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.alarms.config import AlarmsSection, merged_limits
from gateway.inference.build import ModelsSection, default_models_dir, plausibility_checker
from gateway.inference.plausibility import PlausibilityChecker
from gateway.sample import MDC

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.inference.card import ModelCard

__all__ = [
    "ModelCoverage",
    "SubjectCoverage",
    "check_coverage",
    "idle_models",
    "log_coverage",
    "novelty_streams",
    "subject_coverage",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelCoverage:
    """One model's view of one subject."""

    model: str
    scores: bool
    found: Mapping[str, str]  # card input metric -> stream metric
    missing: tuple[str, ...]  # card input metrics with no stream


@dataclass(frozen=True, slots=True)
class SubjectCoverage:
    """What covers one subject: its models and its limit rules."""

    subject: str
    kind: str
    metrics: tuple[str, ...] | None  # None: some stream names are known only at run time
    models: tuple[ModelCoverage, ...] = ()
    limits: tuple[str, ...] = ()  # metrics with a limit rule
    ectopy: tuple[str, ...] = ()  # RR-interval streams the ectopic-beat detector watches
    unit_notes: tuple[str, ...] = ()  # streams whose unit leaves them without a default rule

    @property
    def covered(self) -> bool:
        """True when a model scores it or a limit or detector watches it (or it cannot be told yet)."""
        return self.metrics is None or bool(self.limits or self.ectopy) or any(m.scores for m in self.models)

    def lines(self) -> list[str]:
        """Human-readable lines for ``edgetwin check`` and the start log."""
        head = f"subject {self.subject} ({self.kind})"
        out: list[str] = []
        if self.metrics is None:
            out.append(f"{head}: stream names known only once its sources run; the runner reports gaps")
        for m in self.models:
            if m.scores:
                out.append(f"{head}: model {m.model} scores it ({len(m.found)} input streams)")
            else:
                example = ", ".join(f'{name} = "<stream>"' for name in m.missing[:3])
                out.append(
                    f"{head}: model {m.model} will not score it: missing inputs {', '.join(m.missing)}: "
                    f"map them in [[models.use]] {m.model}: inputs = {{ {example} }}, or, if this "
                    f'subject is not one it is for, list those it is for: subjects = ["<subject>"]'
                    + (f" (its streams: {', '.join(self.metrics)})" if self.metrics else "")
                )
        if self.limits:
            out.append(f"{head}: limit alarms on {', '.join(self.limits)}")
        if self.ectopy:
            out.append(f"{head}: ectopic-beat detection on {', '.join(self.ectopy)}")
        out += [f"{head}: {note}" for note in self.unit_notes]
        if not self.covered:
            out.append(f"{head}: NOT COVERED: no model scores it and no limit watches it")
        return out


def _for(want_kind: str, subjects: Sequence[str], kind: str, subject: str) -> bool:
    """True if a detector for ``want_kind`` (and ``subjects``, if any) watches this subject."""
    return want_kind == kind and (not subjects or subject in subjects)


def _cards(section: ModelsSection) -> dict[str, ModelCard]:
    out: dict[str, ModelCard] = {}
    if not section.use:  # a gateway without models does not load the cards' module
        return out
    from gateway.inference.card import CARD_SUFFIX, load_card  # noqa: PLC0415 - only with models

    directory = section.dir or default_models_dir()
    for use in section.use:
        path = directory / f"{use.name}{CARD_SUFFIX}"
        if path.exists():  # a missing card is reported by build_problems
            out[use.name] = load_card(path)
    return out


def subject_coverage(
    sources: Sequence[Any], models: ModelsSection, alarms: AlarmsSection
) -> list[SubjectCoverage]:
    """Coverage of every subject of the enabled sources (``config.sources`` entries)."""
    by_subject: dict[str, tuple[str, list[str] | None]] = {}
    units: dict[str, dict[str, str]] = {}
    for entry in sources:
        if not entry.enabled:
            continue
        names_of = getattr(entry.config, "metric_names", None)
        names: list[str] | None = names_of() if callable(names_of) else None
        units_of = getattr(entry.config, "metric_units", None)
        units.setdefault(entry.info.subject, {}).update(units_of() if callable(units_of) else {})
        kind, known = by_subject.get(entry.info.subject, (entry.info.kind, []))
        by_subject[entry.info.subject] = (kind, None if known is None or names is None else known + names)
    cards = _cards(models)
    checker = plausibility_checker(models)
    general, per_subject = merged_limits(alarms)
    out: list[SubjectCoverage] = []
    for subject, (kind, metrics) in by_subject.items():
        cover: list[ModelCoverage] = []
        for use in models.use:
            card = cards.get(use.name)
            if card is None or (use.subjects and subject not in use.subjects):
                continue
            if card.subject_kind != kind or metrics is None:
                continue
            from gateway.inference.card import input_matches  # noqa: PLC0415 - loaded with a card

            found: dict[str, str] = {}
            for spec in card.inputs:
                hit = next(
                    (m for m in metrics if input_matches(spec.metric, use.inputs.get(spec.metric), m)), None
                )
                if hit is not None:
                    found[spec.metric] = hit
            wanted = list(dict.fromkeys(spec.metric for spec in card.inputs))
            missing = tuple(m for m in wanted if m not in found)
            present = sum(spec.metric in found for spec in card.inputs)
            need = card.n_inputs if card.normalisation.kind == "commissioning" else (card.n_inputs + 1) // 2
            cover.append(ModelCoverage(use.name, present >= need, found, missing))
        # Detectors learned on the gateway: novelty per machine; per stream where nothing else scores.
        nov, per_stream = models.novelty, models.streams
        if nov is not None and metrics is not None and _for(nov.subject_kind, nov.subjects, kind, subject):
            wanted = [m for m in metrics if nov.wants(m)]
            cover.append(ModelCoverage("novelty", bool(wanted), {m: m for m in wanted}, ()))
        alone = per_stream is not None and per_stream.enabled and metrics and not any(c.scores for c in cover)
        if (
            alone
            and per_stream is not None
            and _for(per_stream.subject_kind, per_stream.subjects, kind, subject)
        ):
            cover.append(ModelCoverage("stream_change", True, {m: m for m in metrics or ()}, ()))
        limits: tuple[str, ...] = ()
        if metrics is not None:
            table = {**general, **per_subject.get(subject, {})}
            limits = tuple(
                m
                for m in metrics
                if (lim := table.get(m, table.get(m.rsplit("/", 1)[-1]))) is not None and lim.enabled
            )
        notes = tuple(
            note for m, u in units.get(subject, {}).items() if (note := _unit_note(m, u, checker)) is not None
        )
        out.append(
            SubjectCoverage(
                subject,
                kind,
                None if metrics is None else tuple(metrics),
                tuple(cover),
                limits,
                tuple(
                    m for m in metrics or () if models.ectopy and (mdc := MDC.get(m)) is not None and mdc.rr
                ),
                notes,
            )
        )
    return out


def _unit_note(metric: str, unit: str, checker: PlausibilityChecker) -> str | None:
    """Why a stream of a known unit gets no plausibility rule, or None when it does (or has none)."""
    rule = checker.base_rule(metric)
    if rule is None or rule.in_unit(unit) is not None:
        return None
    return (
        f"stream {metric}: unit {unit!r} does not convert from the default rule's {rule.unit!r}: "
        f"no plausibility check; set [models.plausibility.{metric!r}] in its unit"
    )


def novelty_streams(sources: Sequence[Any], models: ModelsSection) -> list[str] | None:
    """Metric names of the enabled sources' streams the novelty detector may take; None if not all known."""
    nov = models.novelty
    if nov is None:
        return []
    names: list[str] = []
    for entry in sources:
        if not entry.enabled or not _for(nov.subject_kind, nov.subjects, entry.info.kind, entry.info.subject):
            continue
        names_of = getattr(entry.config, "metric_names", None)
        known: list[str] | None = names_of() if callable(names_of) else None
        if known is None:
            return None
        names += [m for m in known if nov.wants(m)]
    return list(dict.fromkeys(names))


def idle_models(coverage: Sequence[SubjectCoverage], models: ModelsSection) -> list[str]:
    """Configured models that score no subject although every subject's streams are known."""
    if any(c.metrics is None for c in coverage):
        return []
    scoring = {m.model for c in coverage for m in c.models if m.scores}
    return [use.name for use in models.use if use.name not in scoring]


def check_coverage(config: Config) -> tuple[list[str], list[str]]:
    """For ``edgetwin check``: a line per subject and model, and the problems that fail the check."""
    core = config.core
    coverage = subject_coverage(config.sources, core.models, core.alarms)
    lines = [line for c in coverage for line in c.lines()]
    problems = [
        f"models {name}: scores no subject: its inputs are missing from every subject it could score "
        "(see the lines above): map them with [[models.use]] inputs, or remove the model"
        for name in idle_models(coverage, core.models)
    ]
    return lines, problems


def log_coverage(config: Config) -> None:
    """The start log: per subject, what scores or watches it; warnings for what will not."""
    core = config.core
    for c in subject_coverage(config.sources, core.models, core.alarms):
        for line in c.lines():
            quiet = c.covered and "will not" not in line
            (log.info if quiet else log.warning)("%s", line)
