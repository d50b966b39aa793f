"""The small contracts every source, stage and uplink plugs into.

* A **driver** turns one kind of device into :class:`~gateway.sample.Sample` objects:
  ``async run(sink, *, started)`` connects, calls ``started()`` once it delivers data, and streams
  into ``sink`` until cancelled.  It raises :mod:`gateway.errors` types (transient / auth / config)
  and never sleeps-and-retries on its own: the supervisor owns retry policy.  A driver may expose
  ``pulse`` (a :class:`gateway.liveness.Pulse`): it beats on progress and declares its bounded
  waits, and the supervisor restarts it when it does neither (see ``gateway.liveness``).
* The **sink** is synchronous on purpose: a driver hands samples over without an ``await`` and
  without a queue hop, so per-sample cost stays a function call (see PERFORMANCE.md).
* **Window records**, **alarms** and **diagnostics** are what the pipeline produces; they still
  carry raw identities and become anonymous only in ``gateway.anonymize``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from gateway.sample import Sample, SampleBlock, Stream

#: Share of a window's expected samples each input stream must hold for a model to judge it
#: (``min_coverage`` of a model's settings).  In steady state a regular stream holds all of them
#: (every stream with a nominal rate in ``edgetwin demo``) but for a sample at an edge, a dropped
#: notification or a few flagged samples; right after a start, or a stream's return from an outage,
#: a window holds only the seconds since (README, "Models").
DEFAULT_MIN_COVERAGE = 0.8


class Lane(enum.IntEnum):
    """Outbox priority lanes; a lower value is delivered first."""

    ALARMS = 0
    FEATURES = 1
    DIAGNOSTICS = 2


class AlarmKind(enum.StrEnum):
    """Why an alarm was raised. Sensor faults are told apart from patient or machine events."""

    SENSOR_LOST = "sensor_lost"  # no data from a stream for longer than its timeout
    SENSOR_RESTORED = "sensor_restored"  # data flows again after a loss or fault
    SENSOR_FAULT = "sensor_fault"  # the device flags its own measurement as unusable
    ANOMALY = "anomaly"  # a model or rule says the subject, not the sensor, is abnormal
    ANOMALY_CLEARED = "anomaly_cleared"  # the same model finds the subject normal again
    # Inside an episode the model cannot judge (gap, implausible input, ...): not a clearance.
    ANOMALY_INDETERMINATE = "anomaly_indeterminate"
    LIMIT = "limit"  # a value beyond a configured limit for the alarm condition delay
    LIMIT_CLEARED = "limit_cleared"  # back inside the limit (by the deadband, for the off-delay)
    DEVICE_LOST = "device_lost"  # every stream of one device lost at once: one outage, one alarm
    DEVICE_RESTORED = "device_restored"  # data flows again from that device


#: Kinds that concern the equipment, never the patient or the process (IEC 60601-1-8 "technical").
TECHNICAL_KINDS = frozenset(
    {
        AlarmKind.SENSOR_LOST,
        AlarmKind.SENSOR_RESTORED,
        AlarmKind.SENSOR_FAULT,
        AlarmKind.DEVICE_LOST,
        AlarmKind.DEVICE_RESTORED,
    }
)


class AlarmPriority(enum.StrEnum):
    """How soon someone must act: IEC 60601-1-8 high / medium / low (ISA-18.2 uses the same three)."""

    HIGH = "high"  # immediate response
    MEDIUM = "medium"  # prompt response
    LOW = "low"  # awareness


class AlarmClass(enum.StrEnum):
    """What an alarm is about: the equipment, a patient or a process."""

    TECHNICAL = "technical"
    PHYSIOLOGICAL = "physiological"
    PROCESS = "process"


def alarm_class(kind: AlarmKind, subject_kind: str | None) -> AlarmClass:
    """Technical for sensor and device kinds, else process for a machine, physiological otherwise."""
    if kind in TECHNICAL_KINDS:
        return AlarmClass.TECHNICAL
    return AlarmClass.PROCESS if subject_kind == "industrial" else AlarmClass.PHYSIOLOGICAL


@dataclass(frozen=True, slots=True)
class Node:
    """A configured item of a source that has no stream (an OPC UA node that never resolved)."""

    source: str
    address: str  # as configured (a browse path, a node id): its place in the list may change

    @property
    def identity(self) -> str:
        """``<source>/<address>``: one per node of the gateway (a source's name holds no ``/``)."""
        return f"{self.source}/{self.address}"


@dataclass(frozen=True, slots=True)
class Alarm:
    """An event that bypasses windowing and travels in the alarms lane."""

    kind: AlarmKind
    subject: str  # raw subject id (anonymized later)
    t_mono: float
    t_wall: float
    stream: Stream | None = None
    detail: Mapping[str, float | str] = field(default_factory=dict)  # numbers and short tokens only
    # For anomalies: "<metric>.<feature>" -> share of the score, the explanation sent with it.
    contributions: Mapping[str, float] = field(default_factory=dict)
    priority: AlarmPriority | None = None
    limit: float | None = None  # the limit crossed, in the stream's unit
    value: float | None = None  # the value that holds the condition, in the stream's unit
    held_s: float | None = None  # how long the condition has held when this was raised
    subject_kind: str | None = None  # "medical" / "industrial" when there is no stream to say it
    node: Node | None = None  # with no stream: the configured item it is about (sent as a pseudonym)

    @property
    def alarm_class(self) -> AlarmClass:
        """Technical for sensor and device kinds, else physiological or process by subject kind."""
        return alarm_class(
            self.kind, self.subject_kind or (self.stream.kind if self.stream is not None else None)
        )


@dataclass(frozen=True, slots=True)
class StreamFeatures:
    """The features of one stream over one window, or a gap when it had no usable sample."""

    stream: Stream
    count: int  # usable samples in the window
    missing: float  # fraction of expected samples absent or unusable, 0..1
    features: Mapping[str, float]  # NaN-free: a feature that cannot be computed is absent
    # Samples of the window left out of ``count`` and the features: with an unusable device flag
    # or no value, and out of a plausibility rule's range (no body or machine reads so).
    flagged: int = 0
    implausible: int = 0
    # The lowest and highest value left out as implausible: a model's own plausibility check
    # still sees the breach the features no longer show.  Local to the gateway: never published.
    implausible_span: tuple[float, float] | None = None

    @property
    def gap(self) -> bool:
        """True when the window held no usable sample of this stream."""
        return self.count == 0

    def partial(self, min_coverage: float) -> bool:
        """True when the window holds usable samples of this stream, but fewer than ``min_coverage`` of those expected.

        A stream without a nominal rate (an event series, a report-on-change tag) expects no count:
        its ``missing`` is 0 whenever it has a sample, so being sparse never makes it partial.  A
        gap (no usable sample) is not partial: models treat an absent input on its own terms.
        """
        return self.count > 0 and 1.0 - self.missing < min_coverage - 1e-9


@dataclass(frozen=True, slots=True)
class WindowRecord:
    """Aligned features of every stream of one subject for one window ``[end - length, end)``."""

    subject: str
    kind: str  # "medical" or "industrial"
    index: int  # window number on the subject's grid: end = index * hop (monotonic seconds)
    end_mono: float
    end_wall: float
    length_s: float
    streams: tuple[StreamFeatures, ...]
    scores: Mapping[str, float] = field(default_factory=dict)  # model outputs, by model name
    # The same streams (same order) over other lengths ending at ``end_mono``, for models trained
    # on their own window: length (s) -> features.  Local to the gateway: never published.
    tails: Mapping[float, tuple[StreamFeatures, ...]] = field(default_factory=dict)

    def over(self, length_s: float | None) -> WindowRecord:
        """The window as a model of ``length_s`` sees it: the features over that tail, if cut.

        None, the record's own length, or a length the windower did not cut (a record built
        without it) give the record itself.
        """
        if length_s is None or not self.tails:
            return self
        streams = self.tails.get(length_s)
        if streams is None:
            return self
        return WindowRecord(
            self.subject, self.kind, self.index, self.end_mono, self.end_wall, length_s, streams, self.scores
        )


@dataclass(frozen=True, slots=True)
class Estimate:
    """A state estimate of one subject (fused heart rate, battery charge, ...) with its uncertainty.

    ``state``: "measured" (a full-weight source within the estimator's horizon), "bridged" (carried
    over a gap of every source), "untrusted" (only flagged or disagreeing sources) or "lost" (no
    estimate: ``value`` and ``sd`` are NaN).  ``sources`` names the streams that fed it with the
    share of each; see ``gateway.estimation``.
    """

    subject: str  # raw subject id (anonymized later)
    kind: str  # "medical" or "industrial"
    name: str  # short token: "hr", "spo2", "soc", "soh"...
    unit: str
    t_mono: float
    t_wall: float
    value: float
    sd: float
    state: str
    sources: tuple[tuple[Stream, float], ...] = ()
    detail: Mapping[str, float | str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """Gateway health and ground-truth labels from simulators; lowest priority lane."""

    kind: str  # e.g. "sim_label", "unit_state", "counters"
    subject: str | None
    t_wall: float
    detail: Mapping[str, float | str]


@dataclass(frozen=True, slots=True)
class ModelResult:
    """One model's verdict on one window."""

    score: float  # higher = more anomalous; comparable to the model's threshold
    anomaly: bool  # score crossed the calibrated threshold
    contributions: Mapping[str, float] = field(default_factory=dict)  # feature -> share of the score
    fallback: bool = False  # produced by the statistical fallback, not the model
    # Non-empty when the window could not be judged: "gap", "partial" (an input stream holds fewer
    # than the model's min_coverage of its expected samples: after a start or an outage),
    # "implausible_input", "missing_inputs", "commissioning", "unit_changed" (learning a subject again
    # after a unit change while its anomaly was open), "demoted". Such a verdict is
    # indeterminate, neither anomalous nor normal.
    reason: str = ""

    @property
    def verdict(self) -> str:
        """``"anomalous"``, ``"normal"`` or ``"indeterminate"``."""
        if self.anomaly:
            return "anomalous"
        return "indeterminate" if self.reason else "normal"


class WindowModel(Protocol):
    """A model scoring window records. ``score_batch`` runs in a worker thread, never on the loop."""

    name: str  # short token, e.g. "pump_ae"; becomes the key in WindowRecord.scores

    def applies_to(self, record: WindowRecord) -> bool:
        """True if this model scores this subject's windows (cheap; called on the loop)."""

    def score_batch(self, records: Sequence[WindowRecord]) -> Sequence[ModelResult]:
        """Score several windows at once; one result per record, same order."""


class SampleSink(Protocol):
    """Where a driver hands its data. All methods are synchronous and cheap."""

    def put(self, sample: Sample) -> None:
        """Accept one sample."""

    def put_block(self, block: SampleBlock) -> None:
        """Accept many samples of one stream at once."""

    def alarm(self, alarm: Alarm) -> None:
        """Report a device-level event now (device lost, sensor fault), bypassing windows."""

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        """Report something worth knowing that is not a measurement (labels, device info)."""


class Driver(Protocol):
    """A source of samples. See the module docstring for the contract."""

    async def run(self, sink: SampleSink, *, started: Callable[[], None]) -> None:
        """Connect, call ``started()`` once data flows, stream into ``sink`` until cancelled."""


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """The keys every ``[[sources]]`` table has, whatever its driver."""

    name: str  # unique source name from the config (local only)
    subject: str  # patient/bed id or machine id this source measures (local only)
    kind: str  # "medical" or "industrial"


@dataclass(frozen=True, slots=True)
class DriverSpec:
    """One entry of the driver registry (``drivers/__init__.py``)."""

    name: str  # the ``driver = "..."`` value in a source's config
    config_model: type[BaseModel]  # validates the driver's own keys of a ``[[sources]]`` table
    factory: Callable[[SourceInfo, Any], Driver]  # (common keys, validated driver config) -> driver
    summary: str
