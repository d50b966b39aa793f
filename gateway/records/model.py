"""The typed records that leave a gateway, and the metadata that travels with them.

Frozen value objects: the gateway's anonymizer builds them from allow-listed fields only, the
codec (:mod:`gateway.records.codec`) turns them into SenML-CBOR packs and back, and the twin reads
them.  ``docs/records.md`` is the reference for every field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

#: Major schema version: a reader refuses a record of a newer major version.
SCHEMA_MAJOR = 4
#: Minor schema version: additions a reader of the same major version may ignore.
SCHEMA_MINOR = 0

#: What ``t`` counts: "site" - seconds since the gateway's per-site origin (monotonic across its
#: runs); "unix" - seconds since 1970 (privacy.time = "coarse" or "exact"); "start" - seconds
#: since the process started (schema 1 only, read for backlog written by older gateways).
Clock = Literal["site", "unix", "start"]
CLOCKS: tuple[Clock, ...] = ("site", "unix", "start")

#: How a stream's values behave, which decides its features (see ``docs/records.md``).
Shape = Literal["level", "waveform", "interval", "state"]
SHAPES: tuple[Shape, ...] = ("level", "waveform", "interval", "state")

Detail = Mapping[str, float | int | str | bool]


@dataclass(frozen=True, slots=True)
class StreamWindow:
    """The features of one stream over one window (a gap when it had no usable sample)."""

    metric: str  # MDC reference id or the source path of an industrial metric
    unit: str  # UCUM code
    dev: str  # the device's pseudonym
    n: int  # usable samples in the window
    missing: float = 0.0  # fraction of expected samples absent or unusable, 0..1
    mdc: int | None = None  # IEEE 11073-10101 code (implied by an MDC metric name)
    gap: bool = False
    features: Mapping[str, float] = field(default_factory=dict)  # named features, e.g. "mean", "rmssd"
    shape: Shape | None = None  # None: not stated (schema 1)
    # Decimal exponent of the features' resolution on the wire (schema 3): values in the stream's
    # unit are sent as integers of 10**res; None: single precision.
    res: int | None = None
    # Schema 3: the features are as in this stream's last record that carried them (at ``res``);
    # a decoded record holds none until :func:`gateway.records.thin.carry` fills them in.
    unchanged: bool = False
    # Samples of the window left out of ``n`` and the features: flagged unusable by the device or
    # without a value, and out of a plausibility rule's range.  Absent on the wire when 0.
    flagged: int = 0
    implausible: int = 0


@dataclass(frozen=True, slots=True)
class FeaturesWindow:
    """One window of features of one subject (patient or machine)."""

    TYPE: ClassVar[str] = "features"
    subject: str  # pseudonym
    kind: str  # "medical" or "industrial"
    t: float  # end of the window, see ``clock``
    win: float  # window length, seconds
    streams: tuple[StreamWindow, ...] = ()
    scores: Mapping[str, float] = field(default_factory=dict)  # model outputs by model name
    run: int = 0  # the gateway's run (boot counter) that made the record; 0: not stated (schema 1)
    clock: Clock = "site"
    sv: int = SCHEMA_MAJOR
    # Heartbeat (schema 3): this subject's next window record follows within ``hb`` seconds unless
    # it is lost or the gateway stops; windows in between were unchanged.  None: every window is sent.
    hb: float | None = None


@dataclass(frozen=True, slots=True)
class AlarmRecord:
    """An alarm: a sensor lost, faulted or restored; an anomaly raised or cleared."""

    TYPE: ClassVar[str] = "alarm"
    alarm: str  # kind token, e.g. "sensor_lost", "anomaly"
    subject: str
    t: float
    dev: str | None = None
    metric: str | None = None
    detail: Detail = field(default_factory=dict)
    contrib: Mapping[str, float] = field(default_factory=dict)  # "<metric>.<feature>" -> share
    # IEC 60601-1-8 / ISA-18.2 semantics: "technical" (the equipment), "physiological" or "process".
    alarm_class: str | None = None
    priority: str | None = None  # "high", "medium", "low"; None on kinds that end a condition
    limit: float | None = None  # the limit crossed, in the stream's unit
    value: float | None = None  # the value that holds the condition, in the stream's unit
    held_s: float | None = None  # how long the condition has held
    run: int = 0
    clock: Clock = "site"
    sv: int = SCHEMA_MAJOR


def fault_origin(detail: Mapping[str, object]) -> str:
    """Which judge a ``sensor_fault`` (or its ending) is of: ``rule``, ``driver`` or ``quality``."""
    # A stream's faults from different judges are different conditions: one's ending leaves the
    # others on.  A plausibility rule is one judge, whether the sample check or a model's window
    # check applies it: a value plausible again ends it.
    if "rule" in detail:
        return "rule"
    if "cause" in detail or "status" in detail:
        return "driver"
    return "quality"  # the device's sample flags (the windower), the only other judge


@dataclass(frozen=True, slots=True)
class DiagnosticRecord:
    """Gateway health, counters, clock steps, simulator ground truth."""

    TYPE: ClassVar[str] = "diag"
    diag: str  # kind token
    t: float
    subject: str | None = None  # None: about the gateway itself
    detail: Detail = field(default_factory=dict)
    run: int = 0
    clock: Clock = "site"
    sv: int = SCHEMA_MAJOR


@dataclass(frozen=True, slots=True)
class EstimateSource:
    """One stream that fed an estimate, with the share of the weight it had."""

    dev: str  # the device's pseudonym
    metric: str  # MDC reference id or the source path of an industrial metric
    w: float  # share of the weight within the estimator's horizon, 0..1 (shares sum to 1)


@dataclass(frozen=True, slots=True)
class EstimateRecord:
    """A state estimate of one subject (fused heart rate, battery SoC/SoH) with its uncertainty."""

    TYPE: ClassVar[str] = "estimate"
    subject: str
    kind: str  # "medical" or "industrial"
    t: float
    est: str  # estimate name token: "hr", "spo2", "soc", "soh"...
    unit: str  # UCUM code
    # "measured" (a full-weight source spoke within stale_s), "bridged" (carried over a gap of every
    # source), "untrusted" (only flagged or disagreeing sources), "lost" (no estimate).
    state: str
    value: float | None = None  # None when there is no estimate ("lost")
    sd: float | None = None  # standard deviation, in ``unit``
    src: tuple[EstimateSource, ...] = ()
    detail: Detail = field(default_factory=dict)
    run: int = 0
    clock: Clock = "site"
    sv: int = SCHEMA_MAJOR


Record = FeaturesWindow | AlarmRecord | DiagnosticRecord | EstimateRecord


@dataclass(frozen=True, slots=True)
class SeqMeta:
    """The sequence record the uplink puts in front of a pack at publish time."""

    seq: int  # the outbox row id: per gateway, persisted, never reused within an epoch
    epoch: int  # id of the gateway's sequence; a new one means the sequence restarted
    historical: bool = False  # replayed from the backlog after an outage
    # Schema 4: the gateway may hold a features window back this many seconds before publishing it
    # (several windows of one subject share a message); None: published as soon as it is stored.
    batch_s: float | None = None


@dataclass(frozen=True, slots=True)
class StatusLoss:
    """The newest loss at the gateway: which lane, why (a drop reason), how many records, when."""

    lane: str
    reason: str  # budget, age, corrupt, disk_full, queue_full, oversize, dead_letter
    n: int
    t: float  # in the clock of the gateway's records (``site`` unless privacy.time is exact)


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """The retained status document (JSON): online, or offline through the Will or an orderly stop."""

    state: str  # "online", "offline" or "cleared" (an empty retained message)
    ep: int = 0  # the epoch the gateway publishes under
    sv: int = SCHEMA_MAJOR
    run: int | None = None  # the gateway's boot counter
    clean: bool | None = None  # offline only: True for an orderly stop, False from the Will
    dropped: Mapping[str, int] = field(default_factory=dict)  # records dropped at the gateway, by lane
    drops: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # the same by lane and reason
    degraded: str | None = None  # why the gateway refuses lower lanes: disk_full, write_failing
    loss: StatusLoss | None = None  # the newest loss


def order_key(record: Record) -> tuple[int, float]:
    """Where a record stands in its gateway's time: (run, t); compare within one epoch only."""
    t = record.t if math.isfinite(record.t) else -math.inf
    return record.run, t
