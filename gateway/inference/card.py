"""Model cards: what a model file needs as input, what it outputs, how it was trained and checked.

A card is a JSON file beside its model files.  Loading a card checks its shape (pydantic, strict);
opening a model file checks its sha256 against the card before any byte reaches a backend, so a
truncated, swapped or tampered file is refused with a clear error instead of scoring silently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ConfigError, CorruptDataError

__all__ = [
    "CARD_SUFFIX",
    "FallbackSpec",
    "HealthSpec",
    "InputSpec",
    "ModelCard",
    "ModelFile",
    "NormalisationSpec",
    "file_sha256",
    "input_matches",
    "load_card",
    "read_verified",
]

#: A model's card is ``<name>.card.json`` in the models directory.
CARD_SUFFIX = ".card.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """One model input: a feature of a stream, picked by metric name (exact or a ``/``-suffix)."""

    metric: str  # e.g. "Pump1/RateRMS" or "RateRMS" to match any ".../RateRMS"
    feature: str  # a StreamFeatures key: mean, std, min, max, slope, rmssd, ...


class NormalisationSpec(_Strict):
    """How raw features become model inputs ``z = (x - mean) / std``, clipped to ``+-clip``."""

    kind: Literal["commissioning", "fixed"]
    # commissioning: per subject, learned from its first ``windows`` complete windows
    windows: int = Field(27, ge=5, le=100_000)
    # When set, the runtime derives ``windows`` from the pipeline hop: ceil(commissioning_s / hop_s).
    commissioning_s: float | None = Field(None, gt=0)
    # fixed: learned at training time, one per input
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    min_std_rel: float = Field(1e-3, ge=0)  # std floor relative to |mean|, so a flat signal is not /0
    min_std_abs: float = Field(1e-6, gt=0)
    clip: float = Field(30.0, gt=0)
    # commissioning: the baseline of the ``mean`` inputs follows slow wander after commissioning
    # (time constant ``track_s`` once ``track_guard_s`` of windows in a row were normal, the slower
    # ``track_flagged_s`` otherwise, frozen when None) but never leaves the commissioning mean by
    # more than ``track_cap`` commissioning spreads, so a fault is not learnt as normal.  None: the
    # commissioning mean is the baseline for good.
    track_s: float | None = Field(None, gt=0)
    track_flagged_s: float | None = Field(None, gt=0)
    track_guard_s: float = Field(30.0, ge=0)
    track_cap: float = Field(3.0, gt=0)


class ModelFile(_Strict):
    """One file of a model in one precision, with the sha256 it must have."""

    path: str  # relative to the card's directory
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(gt=0)


class FallbackSpec(_Strict):
    """The statistical stand-in: anomaly when the largest ``|z|`` of the inputs exceeds ``z``."""

    z: float = Field(6.0, gt=0)


class HealthSpec(_Strict):
    """When the runtime demotes a model to its fallback (or reports it over budget), and back."""

    latency_budget_us: float = Field(200.0, gt=0)  # per window, model call plus pre/post-processing
    # Consecutive batches over budget that report it ``over_budget`` (the name is older: no demotion).
    overruns_to_demote: int = Field(3, ge=1)
    ood_z: float = Field(200.0, gt=0)  # |z| beyond this is far outside the training statistics
    healthy_to_promote: int = Field(5, ge=1)  # consecutive healthy probes (or batches under budget)


class ModelCard(_Strict):
    """Everything the runtime and a reviewer need to know about one model."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    version: str
    task: str  # e.g. "pump multivariate anomaly"
    subject_kind: Literal["medical", "industrial"]
    window_s: float = Field(gt=0)  # the window length the model was trained on
    inputs: tuple[InputSpec, ...] = Field(min_length=1)
    input_name: str
    output_name: str
    output: str  # what the output means
    normalisation: NormalisationSpec
    threshold: float  # anomaly when score > threshold
    calibration: str  # how the threshold was chosen
    files: dict[Literal["fp32", "int8"], ModelFile]
    default_precision: Literal["fp32", "int8"]
    # The same model as .tflite for the LiteRT backend, where a converter was available.
    tflite_files: dict[Literal["fp32", "int8"], ModelFile] = Field(default_factory=dict)
    # The dense layers' weights and reference scores (.dense.npz) for the numpy backend, written
    # where the graph is dense layers only; fp32 only (numpy has no honest int8 path here).
    dense_files: dict[Literal["fp32"], ModelFile] = Field(default_factory=dict)
    # The runtime that serves the model unless the config says otherwise, chosen by the recipe from
    # measured batch-1 latency and process memory (evaluation.backends.choice).
    backend: Literal["onnxruntime", "litert", "numpy"] = "onnxruntime"
    fallback: FallbackSpec = FallbackSpec()
    health: HealthSpec = HealthSpec()
    training: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)
    # When this version replaces another over the downlink: take the subjects' commissioning
    # statistics of the version serving now (same inputs needed) or learn them again.
    commissioning_on_update: Literal["carry", "redo"] = "carry"

    @property
    def n_inputs(self) -> int:
        """Width of the model's input vector."""
        return len(self.inputs)

    def feature_keys(self) -> tuple[str, ...]:
        """``<metric>.<feature>`` of every input, the names explanations use."""
        return tuple(f"{i.metric}.{i.feature}" for i in self.inputs)


def input_matches(card_metric: str, mapped: str | None, stream_metric: str) -> bool:
    """True when a stream's metric name is the one a card input (or its configured mapping) names."""
    want = mapped or card_metric
    return stream_metric == want or stream_metric.endswith("/" + want)


_Card = TypeVar("_Card", bound=BaseModel)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_card(path: Path, schema: type[_Card], who: str, *, unreadable: str, malformed: str) -> _Card:
    """Read a card file and validate it against ``schema``.

    ConfigError when it cannot be read (``unreadable`` says what to do), CorruptDataError when it
    is not JSON or not a valid card (``malformed`` says what to do); ``who`` starts each message.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{who} {path}: cannot read the model card: {exc.strerror}: {unreadable}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptDataError(
            f"{who} {path}: not valid JSON: {exc}: restore the card from the release"
        ) from exc
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CorruptDataError(f"{who} {path}: key {where or '(top)'}: {first['msg']}: {malformed}") from exc


def load_card(path: Path) -> ModelCard:
    """Read and validate a model card; refuse one that is missing, not JSON or malformed."""
    card = read_card(
        path,
        ModelCard,
        "models card",
        unreadable="check the models directory setting",
        malformed="restore the card from the release or re-run its training recipe",
    )
    norm = card.normalisation
    if norm.kind == "fixed" and not (len(norm.mean) == len(norm.std) == card.n_inputs):
        raise CorruptDataError(
            f"models card {path}: normalisation: {len(norm.mean)} means and {len(norm.std)} stds for "
            f"{card.n_inputs} inputs: re-run the model's training recipe"
        )
    if card.default_precision not in card.files:
        raise CorruptDataError(
            f"models card {path}: default_precision {card.default_precision}: no such file listed: "
            "re-run the model's training recipe"
        )
    return card


def read_verified(
    card: ModelCard, card_dir: Path, precision: str, *, kind: Literal["onnx", "litert", "numpy"] = "onnx"
) -> bytes:
    """The bytes of the card's ``kind`` of model file in ``precision``, refused unless its sha256 matches."""
    files: dict[Any, ModelFile]
    if kind == "litert":
        files = dict(card.tflite_files)
    elif kind == "numpy":
        files = dict(card.dense_files)
    else:
        files = dict(card.files)
    spec = next((f for key, f in files.items() if key == precision), None)
    if spec is None:
        what = {"onnx": "", "litert": " as .tflite", "numpy": " as numpy weights"}[kind]
        raise ConfigError(
            f"models {card.name}: precision {precision!r}: the card lists only {sorted(files)}{what}: "
            "pick one of those"
        )
    path = card_dir / spec.path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"models {card.name} {path}: cannot read the model file: {exc.strerror}: "
            "reinstall the models or fix the models directory"
        ) from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise CorruptDataError(
            f"models {card.name} {path}: sha256 {digest[:12]}... does not match the card's "
            f"{spec.sha256[:12]}...: the file is corrupt or not the one the card describes: "
            "restore it from the release or re-run the training recipe"
        )
    return data
