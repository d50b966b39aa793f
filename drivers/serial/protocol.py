"""What every pulse-oximeter wire format has in common: readings, status flags, counters, parsers.

Pure code only: bytes go in, :class:`Reading` objects come out, nothing here touches a port or a
clock.  The formats themselves live in :mod:`drivers.serial.nonin`, :mod:`drivers.serial.masimo`
and :mod:`drivers.serial.contec`; :mod:`drivers.serial.formats` names them.

Rules every parser keeps:

* ``feed`` never raises, whatever the bytes and however they are chunked;
* a missing value (Nonin HR 511 / SpO2 127, ``---``, Contec 0 or 127) becomes NaN, never a number;
* a value outside the device's documented range drops the frame (counted as ``range``);
* after garbage the parser hunts byte by byte and locks on the first whole frame again; every
  frame it rejects is counted by reason (``checksum``, ``framing``, ``range``).
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from gateway.sample import Quality

NAN = math.nan


class Status(enum.IntFlag):
    """Device status bits, normalised across vendors (a reading carries them as a plain int)."""

    SENSOR_OFF = 1 << 0  # sensor disconnected, no sensor, sensor off the patient
    FINGER_OUT = 1 << 1  # finger out of the sensor (Nonin SNSA, Contec "finger out")
    ARTIFACT = 1 << 2  # motion artifact flagged by the device
    OUT_OF_TRACK = 1 << 3  # Nonin OOT: the device lost the pulse
    LOW_PERFUSION = 1 << 4  # Nonin red perfusion / LPRF, Masimo low perfusion
    SEARCHING = 1 << 5  # pulse search, "searching too long"
    LOW_BATTERY = 1 << 6  # the monitor's battery is low: a device event, not a sample quality
    SENSOR_FAULT = 1 << 7  # defective or unrecognised sensor, probe error
    LOW_SIGNAL_IQ = 1 << 8  # Masimo low signal IQ: usable but doubtful
    INTERFERENCE = 1 << 9  # interference or ambient light
    MARGINAL_PERFUSION = 1 << 10  # Nonin yellow perfusion / MPRF: informational
    NO_MEASUREMENT = 1 << 11  # Nonin #13 NOMS: the record holds no measurement


_STATUS_BITS = 12
_TO_QUALITY: tuple[tuple[int, Quality], ...] = (
    (Status.SENSOR_OFF | Status.FINGER_OUT, Quality.SENSOR_OFF),
    (Status.ARTIFACT | Status.INTERFERENCE, Quality.ARTIFACT),
    (Status.LOW_PERFUSION, Quality.LOW_PERFUSION),
    (
        Status.OUT_OF_TRACK | Status.SEARCHING | Status.SENSOR_FAULT | Status.NO_MEASUREMENT,
        Quality.BAD_STATUS,
    ),
    (Status.LOW_SIGNAL_IQ, Quality.UNCERTAIN),
)


def quality_of(status: int) -> Quality:
    """The sample quality flags a set of device status bits stands for (low battery has none)."""
    q = Quality.GOOD
    for bits, flag in _TO_QUALITY:
        if status & bits:
            q |= flag
    return q


#: ``QUALITY[status]``: the quality of every status value, precomputed for the hot path.
QUALITY: tuple[Quality, ...] = tuple(quality_of(s) for s in range(1 << _STATUS_BITS))


@dataclass(frozen=True, slots=True)
class Reading:
    """One decoded measurement. NaN: the device said "no value"; None: not part of this reading."""

    spo2: float | None  # %
    pulse: float | None  # /min
    pi: float | None = None  # perfusion index, %
    status: int = 0  # Status bits
    serial: str | None = None  # the monitor's own serial number: identifying, local only
    device_time: str | None = None  # the device's clock as ISO text, when the frame carries it

    @property
    def quality(self) -> Quality:
        """Quality flags of the values in this reading."""
        return QUALITY[self.status & ((1 << _STATUS_BITS) - 1)]


class DropReason(enum.StrEnum):
    """Why a frame was rejected."""

    CHECKSUM = "checksum"
    FRAMING = "framing"
    RANGE = "range"


@dataclass(frozen=True, slots=True)
class LineSettings:
    """How a serial line is set up: speed and character framing."""

    baudrate: int
    bytesize: int = 8
    parity: str = "N"  # "N", "O" or "E"
    stopbits: int = 1

    def __str__(self) -> str:
        return f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"

    @property
    def bits_per_char(self) -> int:
        """Bits on the wire per character: start, data, parity, stop."""
        return 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits

    @property
    def bytes_per_s(self) -> float:
        """The most characters per second the line can carry."""
        return self.baudrate / self.bits_per_char


class Parser(abc.ABC):
    """Turns a byte stream into readings; one instance per connection (it keeps framing state)."""

    name: ClassVar[str]
    settings: ClassVar[LineSettings]
    frame_len: ClassVar[int]  # bytes of one frame on the wire (a typical line for text formats)
    frame_period_s: ClassVar[float]  # nominal time between frames
    reading_rate_hz: ClassVar[float | None]  # readings per second; None for spot checks
    start_command: ClassVar[bytes | None] = None  # sent once to start the stream (needs consent)
    keepalive_command: ClassVar[bytes | None] = None
    keepalive_s: ClassVar[float] = 0.0
    #: The format carries the monitor's low-battery bit; where it does not, a reading without the
    #: bit says nothing about the battery.
    reports_battery: ClassVar[bool] = False

    def __init__(self) -> None:
        self.bytes_in = 0
        self.frames = 0  # frames (or lines) that passed every check
        self.good_bytes = 0  # bytes inside those frames
        self.readings = 0
        self.drop_checksum = 0
        self.drop_framing = 0
        self.drop_range = 0
        self.skipped = 0  # bytes thrown away while hunting for a frame
        self.ignored = 0  # well-formed things that carry no measurement (headers, replies)

    @abc.abstractmethod
    def feed(self, data: bytes) -> list[Reading]:
        """Consume bytes; return the readings they completed. Never raises."""

    def idle(self) -> list[Reading]:
        """The line has been silent for a while; formats framed by silence finish a frame here."""
        return []

    @property
    def dropped(self) -> int:
        """Frames rejected, all reasons."""
        return self.drop_checksum + self.drop_framing + self.drop_range

    def counters(self) -> dict[str, int]:
        """The parser's counters, for diagnostics."""
        return {
            "bytes": self.bytes_in,
            "frames": self.frames,
            "readings": self.readings,
            "drop_checksum": self.drop_checksum,
            "drop_framing": self.drop_framing,
            "drop_range": self.drop_range,
            "skipped_bytes": self.skipped,
            "ignored": self.ignored,
        }

    def _drop(self, reason: DropReason) -> None:
        if reason is DropReason.CHECKSUM:
            self.drop_checksum += 1
        elif reason is DropReason.RANGE:
            self.drop_range += 1
        else:
            self.drop_framing += 1

    @classmethod
    def line_frame_rate(cls) -> float:
        """Frames per second the line could carry at its speed, back to back."""
        return cls.settings.bytes_per_s / cls.frame_len


def value_or_nan(raw: int, missing: int | Sequence[int]) -> float:
    """A raw integer as a float, NaN when it is a missing-value marker."""
    if isinstance(missing, int):
        return NAN if raw == missing else float(raw)
    return NAN if raw in missing else float(raw)


class LineSplitter:
    """Splits a byte stream into lines ending in CR, LF or CR LF; overlong lines are discarded."""

    __slots__ = ("_buf", "_discarding", "max_len", "overlong")

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self._buf = b""
        self._discarding = False
        self.overlong = 0  # lines thrown away for being longer than max_len

    def feed(self, data: bytes) -> list[bytes]:
        """Consume bytes; return the complete, non-empty lines without their terminators."""
        buf = self._buf + data
        if b"\n" not in data and b"\r" not in data:
            if len(buf) > self.max_len:
                if not self._discarding:
                    self.overlong += 1
                self._discarding = True
                buf = b""
            self._buf = buf
            return []
        parts = buf.splitlines(keepends=True)
        rest = parts.pop() if parts and not parts[-1].endswith((b"\n", b"\r")) else b""
        lines: list[bytes] = []
        for part in parts:
            line = part.rstrip(b"\r\n")
            if self._discarding:
                # The tail of a line that was already too long: not a line of its own.
                self._discarding = False
                continue
            if not line:
                continue
            if len(line) > self.max_len:
                self.overlong += 1
                continue
            lines.append(line)
        if len(rest) > self.max_len:
            self.overlong += 1
            self._discarding = True
            rest = b""
        self._buf = rest
        return lines


class LineParser(Parser):
    """A parser of text lines, one reading per data line; subclasses decode a line."""

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self._lines = LineSplitter(max_len=max_len)

    @abc.abstractmethod
    def _decode(self, line: bytes) -> Reading | DropReason | None:
        """One line: a reading, why a data line is rejected, or None for a line with no data."""

    def _take(self, reading: Reading) -> Reading | None:
        """The reading of a whole line as handed on, or None to hold it back (counted as ignored)."""
        return reading

    def feed(self, data: bytes) -> list[Reading]:
        """Consume bytes; return one reading per data line."""
        self.bytes_in += len(data)
        before = self._lines.overlong
        out: list[Reading] = []
        for line in self._lines.feed(data):
            got = self._decode(line)
            if got is None:
                self.ignored += 1
            elif isinstance(got, DropReason):
                self._drop(got)
            else:
                self.frames += 1
                self.good_bytes += len(line) + 2
                taken = self._take(got)
                if taken is None:
                    self.ignored += 1
                else:
                    self.readings += 1
                    out.append(taken)
        self.drop_framing += self._lines.overlong - before
        return out
