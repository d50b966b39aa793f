"""From the ``[models]`` config section to the WindowModel objects the pipeline runs.

Where model files are found: ``[models] dir`` when set, else the ``models/`` folder of the source
tree or installed distribution (beside the ``gateway`` package, or an importable ``models``
package).  Each model is a ``<name>.card.json`` there plus the files the card lists.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.contracts import DEFAULT_MIN_COVERAGE
from gateway.errors import ConfigError
from gateway.inference.novelty import NoveltyUse
from gateway.inference.plausibility import DEFAULT_RULES, PlausibilityChecker, Rule
from gateway.inference.streams import StreamUse

if TYPE_CHECKING:
    from gateway.inference.runner import AnomalyModel

__all__ = [
    "BackendChoice",
    "FusionUse",
    "ModelUse",
    "ModelsSection",
    "PlausibilityRule",
    "build_models",
    "card_file",
    "default_models_dir",
    "model_lengths",
]

log = logging.getLogger(__name__)

#: A config's ``backend`` ([models], [[models.use]], [[estimators.rul]]): "card" follows the card's
#: measured choice; "tflite" names LiteRT too (the values of ``gateway.inference.backends.BACKENDS``).
BackendChoice = Literal["card", "onnxruntime", "litert", "tflite", "numpy"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelUse(_Section):
    """One ``[[models.use]]`` table: which model to run, and local overrides of its card."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    precision: Literal["fp32", "int8"] | None = None  # default: the card's
    threshold: float | None = None  # default: the card's calibrated threshold
    commissioning_s: float | None = Field(None, gt=0, le=86_400)  # per-machine calibration span
    subjects: list[str] = Field(default_factory=list)  # empty: every subject of the card's kind
    latency_budget_us: float | None = Field(None, gt=0)
    backend: BackendChoice | None = None  # default: [models] backend
    # Card input metric -> the stream that carries it, where the names differ (e.g. a PLC's tags):
    # inputs = { RateRMS = "Pump1/Hydraulics/Flow" } (a whole metric name or its last segments).
    inputs: dict[str, str] = Field(default_factory=dict)
    # The window (s) it is scored on; default: the card's window_s (the pipeline cuts it for it).
    window_s: float | None = Field(None, gt=0, le=3600)
    # Share of its expected samples each input stream must hold in a window for the model to judge
    # it (below: indeterminate "partial", not commissioned on); 0 judges every window.
    min_coverage: float = Field(DEFAULT_MIN_COVERAGE, ge=0, le=1)


class FusionUse(_Section):
    """One ``[[models.fusion]]`` table: a fusion card to run (gateway.inference.fusion), local overrides."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    tau: float | None = None  # default: the card's
    subjects: list[str] = Field(default_factory=list)  # empty: every subject of the card's kind


class PlausibilityRule(_Section):
    """A ``[models.plausibility."<metric>"]`` table overriding or adding a range/rate rule."""

    lo: float
    hi: float
    max_rate_per_s: float | None = Field(None, gt=0)


class ModelsSection(_Section):
    """The ``[models]`` section."""

    dir: Annotated[Path, Field(strict=False)] | None = None  # TOML has no path type: a string
    # "card": the runtime each card's recipe chose by measured time and memory (onnxruntime when
    # that one cannot serve here); "onnxruntime", "litert" (alias "tflite") or "numpy" for every model.
    backend: BackendChoice = "card"
    # Ectopic-beat detection on RR-interval streams (a physiology rule, no model file needed).
    ectopy: bool = True
    # Scored normal windows in a row that end an anomaly episode (hysteresis); an indeterminate
    # window (a gap, an implausible input) never ends one.
    clear_after_windows: int = Field(3, ge=1, le=1000)
    # Anomalous windows in a row before an episode is raised: the alarm condition delay of
    # IEC 60601-1-8, so one window just over the threshold does not page anyone.
    raise_after_windows: int = Field(2, ge=1, le=1000)
    use: list[ModelUse] = Field(default_factory=list)  # TOML arrays are lists (strict mode)
    plausibility: dict[str, PlausibilityRule] = Field(default_factory=dict)
    # Per-machine novelty detection learned at commissioning (gateway.inference.novelty): on when set.
    novelty: NoveltyUse | None = None
    # Fused verdicts over models above (gateway.inference.fusion): each raises its members' alarms.
    fusion: list[FusionUse] = Field(default_factory=list)
    # The per-stream detector for subjects no model scores (gateway.inference.streams): on unless
    # [models.streams] enabled = false.
    streams: StreamUse | None = Field(default_factory=StreamUse)


def default_models_dir() -> Path:
    """The shipped ``models/`` folder: beside the ``gateway`` package, else the ``models`` package."""
    from gateway.inference.card import CARD_SUFFIX  # noqa: PLC0415 - cards are read only with models

    beside = Path(__file__).resolve().parents[2] / "models"
    if any(beside.glob(f"*{CARD_SUFFIX}")):
        return beside
    spec = importlib.util.find_spec("models")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if any(Path(loc).glob(f"*{CARD_SUFFIX}")):
                return Path(loc)
    return beside


def card_file(directory: Path, name: str, suffix: str, who: str) -> Path:
    """``<directory>/<name><suffix>``, or a ConfigError naming the cards that are there."""
    path = directory / f"{name}{suffix}"
    if not path.exists():
        found = sorted(p.name.removesuffix(suffix) for p in directory.glob(f"*{suffix}"))
        raise ConfigError(
            f"{who} {name} {directory}: no card {path.name}: available: {found or 'none'}: "
            "fix the name or [models] dir"
        )
    return path


def plausibility_checker(section: ModelsSection) -> PlausibilityChecker:
    """The default rules with the config's overrides."""
    rules: dict[str, Rule] = dict(DEFAULT_RULES)
    for metric, r in section.plausibility.items():
        if not r.lo < r.hi:
            raise ConfigError(
                f"config [models.plausibility.{metric!r}]: lo {r.lo} >= hi {r.hi}: make lo smaller than hi"
            )
        rules[metric] = Rule(r.lo, r.hi, r.max_rate_per_s)
    return PlausibilityChecker(rules)


def build_models(
    section: ModelsSection,
    *,
    hop_s: float,
    state_dir: Path | None = None,
    fault_alarms: bool = True,
) -> list[AnomalyModel]:
    """Load, verify and open every model the section uses; refuse the first one that fails.

    ``hop_s`` turns a card's commissioning span into a number of windows.  Each model is scored
    on its card's ``window_s`` (or the entry's), whatever the pipeline's ``window_s``: the
    windower cuts every length its models need (:func:`model_lengths`).
    """
    checker = plausibility_checker(section)
    out: list[AnomalyModel] = []
    if not section.use:
        # Without models the runner, its backends (onnxruntime, LiteRT) and the cards stay unloaded.
        return out
    from gateway.inference.card import CARD_SUFFIX, load_card  # noqa: PLC0415 - only with models
    from gateway.inference.runner import AnomalyModel  # noqa: PLC0415 - only with models

    directory = section.dir or default_models_dir()
    seen: set[str] = set()
    for use in section.use:
        if use.name in seen:
            raise ConfigError(f"config [[models.use]] {use.name}: listed twice: keep one entry")
        seen.add(use.name)
        card = load_card(card_file(directory, use.name, CARD_SUFFIX, "models"))
        unknown = sorted(set(use.inputs) - {spec.metric for spec in card.inputs})
        if unknown:
            raise ConfigError(
                f"config [[models.use]] {use.name} inputs: {', '.join(unknown)} not inputs of the model: "
                f"map its inputs {', '.join(dict.fromkeys(s.metric for s in card.inputs))}"
            )
        if use.latency_budget_us is not None:
            card = card.model_copy(
                update={"health": card.health.model_copy(update={"latency_budget_us": use.latency_budget_us})}
            )
        span = use.commissioning_s or card.normalisation.commissioning_s
        windows = max(5, math.ceil(span / hop_s)) if span is not None else None
        out.append(
            AnomalyModel(
                card,
                directory,
                precision=use.precision,
                backend=use.backend or section.backend,
                threshold=use.threshold,
                commissioning_windows=windows,
                plausibility=checker,
                state_dir=state_dir,
                subjects=tuple(use.subjects),
                inputs=use.inputs,
                fault_alarms=fault_alarms,
                window_s=use.window_s,
                min_coverage=use.min_coverage,
            )
        )
    return out


def model_lengths(models: Sequence[object]) -> dict[str, list[float]]:
    """Per subject kind, the window lengths (s) its models are scored on (``window_s`` of each)."""
    out: dict[str, list[float]] = {}
    for model in models:
        length = getattr(model, "window_s", None)
        kind = getattr(model, "subject_kind", None)
        if length is not None and kind is not None:
            out.setdefault(kind, []).append(float(length))
    return out


def model_names(models: Sequence[AnomalyModel]) -> list[str]:
    """Names of built models, for logs and STATUS."""
    return [m.name for m in models]
