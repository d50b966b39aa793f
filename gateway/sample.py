"""What a driver emits: :class:`Sample` (one value) and :class:`SampleBlock` (many, columnar).

A *stream* is one metric from one device attached to one subject (a patient/bed or a machine).
Stream objects are created once per stream by the driver and shared by every sample of it, so a
sample costs one small object and no string work on the hot path.

Identities (``Stream.subject``, ``Stream.device``, ``Stream.source``) are real identifiers -
bed ids, MAC addresses, serial numbers - and never leave the gateway: ``gateway.anonymize``
replaces them with keyed pseudonyms before anything is encoded.

Medical metrics are named by their IEEE 11073-10101 code with a UCUM unit (:data:`MDC`);
industrial metrics by source path (an OPC UA browse path, say) and engineering unit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from math import isfinite

import numpy as np
import numpy.typing as npt

from gateway.records.model import Shape
from gateway.records.units import MDC_TERMS


class Quality(enum.IntFlag):
    """Quality flags of a sample; ``GOOD`` is the empty set."""

    GOOD = 0
    SENSOR_OFF = 1  # probe off the finger, electrode detached: a sensor fault, not the patient
    ARTIFACT = 2  # motion or noise flagged by the device
    LOW_PERFUSION = 4  # signal too weak to trust
    BAD_STATUS = 8  # device or server said the value is bad (OPC UA Bad_*, device error bit)
    IMPUTED = 16  # value filled in by the device, not measured
    UNCERTAIN = 32  # device says the value is usable but doubtful (OPC UA Uncertain_*)


#: Flags that make a sample unusable as a measurement of the subject: it says the sensor, not
#: the patient or machine, is at fault.
FAULT_FLAGS = Quality.SENSOR_OFF | Quality.BAD_STATUS
#: Flags that make a sample no measurement of the subject (IMPUTED values were filled in, not
#: measured): such a sample, like one with no value, is invalid (:func:`valid_sample`,
#: :func:`valid_rows`): kept out of the features, the plausibility rules, the limits and the
#: detectors (an estimator weighs its own flags: a fused rate counts an artifact's, inflated).
UNUSABLE_FLAGS = int(Quality.SENSOR_OFF | Quality.BAD_STATUS | Quality.ARTIFACT | Quality.IMPUTED)
#: A stream silent this long is lost (``[pipeline] sensor_lost_s``, unless the config says otherwise).
SENSOR_LOST_S = 15.0


@dataclass(frozen=True, slots=True)
class Metric:
    """What is measured: a stable name, its unit, and for medical metrics the MDC code."""

    name: str  # e.g. "MDC_PULS_OXIM_SAT_O2" or "Pump1/Motor/Current"
    unit: str  # UCUM for medical metrics ("%", "/min", "ms"), engineering unit otherwise
    mdc: int | None = None  # IEEE 11073-10101 32-bit code, partition * 65536 + term
    rr: bool = False  # an RR-interval series: gets HRV features (RMSSD, SDNN, pNN50)
    # How the values behave, which decides the features: "level", "waveform" (AC current,
    # vibration: RMS, peak, crest factor, dominant frequency), "interval" (RR) or "state".
    shape: Shape = "level"

    def __post_init__(self) -> None:
        if self.rr and self.shape == "level":
            object.__setattr__(self, "shape", "interval")


#: IEEE 11073-10101 metrics with UCUM units (the table lives with the record contract).
MDC: dict[str, Metric] = {t.name: Metric(t.name, t.unit, t.code, rr=t.rr) for t in MDC_TERMS.values()}


def industrial_metric(path: str, unit: str, shape: Shape = "level") -> Metric:
    """A metric named by its source path (e.g. an OPC UA browse path) and engineering unit."""
    return Metric(path, unit, shape=shape)


@dataclass(frozen=True, slots=True)
class Stream:
    """One metric of one device on one subject. Create once, share across samples."""

    source: str  # the config's source name (local; may itself be identifying)
    subject: str  # patient/bed id or machine id - identifying, never sent
    device: str  # MAC address, serial number, endpoint - identifying, never sent
    metric: Metric
    kind: str = "medical"  # "medical" or "industrial"
    rate_hz: float | None = None  # nominal rate, for the missing fraction; None for event series
    # Reports only when its value changes (a Boolean, a state): silence is not a loss.
    on_change: bool = False
    key: str = field(init=False)  # local key "source/device/metric" for maps and logs

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.source}/{self.device}/{self.metric.name}")


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured value. ``t_mono`` orders and windows; ``t_wall`` is kept for the record."""

    stream: Stream
    t_mono: float  # seconds, time.monotonic() of the gateway when the value was taken/received
    t_wall: float  # seconds since the epoch (UTC), device time if trusted, else gateway time
    value: float  # NaN when the device reported "no value"
    quality: Quality = Quality.GOOD


@dataclass(frozen=True, slots=True)
class SampleBlock:
    """Many samples of one stream, columnar. High-rate drivers hand these off to skip per-sample cost."""

    stream: Stream
    t_mono: npt.NDArray[np.float64]
    t_wall: npt.NDArray[np.float64]
    value: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]

    def __post_init__(self) -> None:
        n = len(self.t_mono)
        if not (len(self.t_wall) == len(self.value) == len(self.quality) == n):
            raise ValueError(
                f"SampleBlock {self.stream.key}: columns differ in length "
                f"(t_mono {n}, t_wall {len(self.t_wall)}, value {len(self.value)}, "
                f"quality {len(self.quality)}): build all four from the same samples"
            )

    def __len__(self) -> int:
        return len(self.t_mono)


def valid_sample(sample: Sample) -> bool:
    """Whether one sample measures the subject: no unusable flag and a value (:func:`valid_rows` for a block)."""
    q = sample.quality  # a truth test of GOOD (0) costs ~30 ns, an IntFlag `&` ~1 us
    return not (q and q & UNUSABLE_FLAGS) and isfinite(sample.value)


def valid_values(
    quality: npt.NDArray[np.uint8],
    value: npt.NDArray[np.float64],
    implausible: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.bool_]:
    """Which rows of these columns measure the subject: no unusable flag, a value, not ``implausible``."""
    unflagged = (np.asarray(quality, np.uint8) & UNUSABLE_FLAGS) == 0
    usable: npt.NDArray[np.bool_] = unflagged & np.isfinite(value)
    return usable if implausible is None else usable & ~implausible


def valid_rows(block: SampleBlock, implausible: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.bool_]:
    """Which samples of ``block`` measure the subject: no unusable flag, a value, not ``implausible``."""
    return valid_values(block.quality, block.value, implausible)
