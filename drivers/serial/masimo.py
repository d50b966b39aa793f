"""Masimo Radical-7 / Rad-8 / Rad-87 serial ASCII output ("ASCII 1" lines and the "ASCII 2" trend form).

Source: Masimo Rad-8 Operator's Manual (2008) pp. 4-23, 4-24, 7-3, and lines captured from
devices in public repositories.  9600 baud 8N1, one line per second, ending in CR, LF or CR LF::

    02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% ... ALARM=0000 EXC=000800
    09/21/08 09:56:12 SpO2=097 PR=069 PI=04.69 EXC=800:SET

Lines are read as ``KEY=VALUE`` tokens after the date and time, never by column: the field set
and the widths of ALARM/EXC differ by model, unknown keys are ignored.  What is checked, so a
damaged line is dropped rather than misread:

* the line starts with ``MM/DD/YY HH:MM:SS``;
* SpO2 and the pulse rate are present, three digits or a run of ``-``; PI is ``dd.dd``;
* ALARM and EXC are hex of a width some model uses;
* a monitor writes lines of constant length (fixed-width fields), so once three lines running
  with the same keys and length have been seen, a line with those keys and another length lost
  or gained a byte and is dropped.  If the monitor really changes (three lines running agree on
  a new length), the parser follows.

``SN=`` is the monitor's serial number: it is returned in :attr:`Reading.serial` for the gateway's
local use (it becomes the stream's device identity, which is pseudonymised before anything leaves),
once two lines running agree on it.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from drivers.serial.protocol import (
    NAN,
    DropReason,
    LineParser,
    LineSettings,
    Reading,
    Status,
)

SETTINGS = LineSettings(9600)
SPO2_MAX = 100
PR_MAX = 240  # Radical-7 pulse-rate range 25-240 /min
PI_MAX = 20.0  # perfusion index range 0.02-20 %

EXC_NO_SENSOR = 0x001
EXC_DEFECTIVE = 0x002
EXC_LOW_PERFUSION = 0x004
EXC_PULSE_SEARCH = 0x008
EXC_INTERFERENCE = 0x010
EXC_SENSOR_OFF = 0x020
EXC_AMBIENT_LIGHT = 0x040
EXC_UNRECOGNISED = 0x080
EXC_LOW_SIQ = 0x400
EXC_SET = 0x800

_EXC_STATUS: tuple[tuple[int, Status], ...] = (
    (EXC_NO_SENSOR, Status.SENSOR_OFF),
    (EXC_DEFECTIVE, Status.SENSOR_FAULT),
    (EXC_LOW_PERFUSION, Status.LOW_PERFUSION),
    (EXC_PULSE_SEARCH, Status.SEARCHING),
    (EXC_INTERFERENCE, Status.INTERFERENCE),
    (EXC_SENSOR_OFF, Status.SENSOR_OFF),
    (EXC_AMBIENT_LIGHT, Status.INTERFERENCE),
    (EXC_UNRECOGNISED, Status.SENSOR_FAULT),
    (EXC_LOW_SIQ, Status.LOW_SIGNAL_IQ),
)

_HEAD = re.compile(rb"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d((?: +\S+)+) *$")
_THREE = re.compile(rb"^(\d{3}|---)%?$")
_PI = re.compile(rb"^(\d\d\.\d\d|--\.--|-+)%?$")
_ALARM = re.compile(rb"^[0-9A-Fa-f]{4}(?:[0-9A-Fa-f]{2})?$")
_EXC = re.compile(rb"^([0-9A-Fa-f]{3}|[0-9A-Fa-f]{6,8})(?::[A-Za-z0-9:_]*)?$")
_SN = re.compile(rb"^(?:[A-Za-z0-9]+|-+)$")
_KEY = re.compile(rb"^[A-Za-z][A-Za-z0-9]*$")

_SPO2_KEYS = (b"SPO2",)
_LOCK_LINES = 3  # lines running with one length that show what the monitor writes
_PR_KEYS = (b"BPM", b"PR")


def exc_status(exc: int) -> int:
    """Status bits of a Masimo EXC (exception) word."""
    s = 0
    for bit, flag in _EXC_STATUS:
        if exc & bit:
            s |= flag
    return int(s)


def _three(value: bytes) -> float | None:
    m = _THREE.match(value)
    if m is None:
        return None
    digits = m.group(1)
    return NAN if digits == b"---" else float(int(digits))


def decode_line(line: bytes) -> tuple[Reading, tuple[bytes, ...]] | DropReason | None:
    """One line: (reading, its key signature), why a data line is rejected, or None for other text."""
    m = _HEAD.match(line)
    if m is None:
        return DropReason.FRAMING if b"=" in line else None
    fields: dict[bytes, bytes] = {}
    keys: list[bytes] = []
    for token in m.group(1).split():
        key, sep, value = token.partition(b"=")
        # A second "=" means two tokens ran together: a separator was lost.
        if not sep or not _KEY.match(key) or b"=" in value:
            return DropReason.FRAMING
        key = key.upper()
        if key in fields:
            return DropReason.FRAMING
        fields[key] = value
        keys.append(key)
    spo2_raw = next((fields[k] for k in _SPO2_KEYS if k in fields), None)
    pr_raw = next((fields[k] for k in _PR_KEYS if k in fields), None)
    if spo2_raw is None or pr_raw is None:
        return DropReason.FRAMING
    spo2 = _three(spo2_raw)
    pulse = _three(pr_raw)
    if spo2 is None or pulse is None:
        return DropReason.FRAMING
    pi: float | None = None
    if b"PI" in fields:
        pm = _PI.match(fields[b"PI"])
        if pm is None:
            return DropReason.FRAMING
        text = pm.group(1)
        pi = NAN if text.startswith(b"-") else float(text)
    status = 0
    if b"EXC" in fields:
        em = _EXC.match(fields[b"EXC"])
        if em is None:
            return DropReason.FRAMING
        status = exc_status(int(em.group(1), 16))
    if b"ALARM" in fields and not _ALARM.match(fields[b"ALARM"]):
        return DropReason.FRAMING
    serial: str | None = None
    if b"SN" in fields:
        sn = fields[b"SN"]
        if not _SN.match(sn):
            return DropReason.FRAMING
        if not sn.startswith(b"-"):
            serial = sn.decode("ascii")
    if spo2 > SPO2_MAX or pulse > PR_MAX or (pi is not None and pi > PI_MAX):
        return DropReason.RANGE
    if math.isnan(spo2) and math.isnan(pulse) and not status:
        # "---" with no exception bit: the monitor is still searching.
        status = int(Status.SEARCHING)
    return Reading(spo2, pulse, pi, status, serial), tuple(keys)


class MasimoAscii(LineParser):
    """Masimo serial ASCII 1 / ASCII 2 lines, one a second."""

    name = "masimo"
    settings = SETTINGS
    frame_len = 150
    frame_period_s = 1.0
    reading_rate_hz = 1.0

    def __init__(self) -> None:
        super().__init__(max_len=400)
        self._locked: tuple[tuple[bytes, ...], int] | None = None  # (keys, length) of accepted lines
        self._candidate: tuple[tuple[bytes, ...], int] | None = None
        self._candidate_seen = 0
        self._serial: str | None = None  # serial number confirmed by two lines running
        self._last_serial: str | None = None

    def _decode(self, line: bytes) -> Reading | DropReason | None:
        got = decode_line(line)
        if got is None or isinstance(got, DropReason):
            return got
        reading, keys = got
        return reading if self._length_fits(keys, len(line)) else DropReason.FRAMING

    def _take(self, reading: Reading) -> Reading | None:
        # A serial number names the device: one damaged line must not rename it, and values
        # are not attributed to a device before its number is known.
        seen = reading.serial
        if seen is not None and seen == self._last_serial:
            self._serial = seen
        self._last_serial = seen
        if seen is not None and self._serial is None:
            return None
        if seen == self._serial:
            return reading
        return replace(reading, serial=self._serial)

    def _length_fits(self, keys: tuple[bytes, ...], length: int) -> bool:
        shape = (keys, length)
        if self._candidate == shape:
            self._candidate_seen += 1
        else:
            self._candidate, self._candidate_seen = shape, 1
        if self._candidate_seen >= _LOCK_LINES:
            self._locked = shape
            return True
        # Same fields as the locked shape but another length: a byte was lost or gained.
        return self._locked is None or self._locked[0] != keys or self._locked[1] == length


# ---- encoder (simulator and tests) ---------------------------------------------------------------


def encode_line(
    when: tuple[int, int, int, int, int, int],
    spo2: float,
    pulse: float,
    pi: float,
    exc: int,
    *,
    serial: str | None = "0000056661",
    form: int = 1,
) -> bytes:
    """One line: ``form`` 1 is a Rad-8 ASCII 1 line, 7 a Radical-7 one, 2 the ASCII 2 trend form."""
    year, mo, dd, hh, mi, ss = when
    stamp = f"{mo:02d}/{dd:02d}/{year % 100:02d} {hh:02d}:{mi:02d}:{ss:02d}"
    s = "---" if math.isnan(spo2) else f"{round(spo2):03d}"
    p = "---" if math.isnan(pulse) else f"{round(pulse):03d}"
    pi_txt = "--.--" if math.isnan(pi) else f"{pi:05.2f}"
    sn = serial or "----------"
    if form == 2:
        tag = ":SET" if exc & EXC_SET else ""
        return f"{stamp} SpO2={s} PR={p} PI={pi_txt} EXC={exc & 0xFFF:03X}{tag}\r\n".encode("ascii")
    if form == 7:
        return (
            f"{stamp} SN={sn} SPO2={s}% BPM={p} PI={pi_txt} SPCO=--% SPMET=--.-% SPHB=--.- SPOC=-- "
            f"RESVD=--- DESAT=-- PIDELTA=+-- PVI=--- ALARM=000000 EXC={exc:07X} EXC1=00000000\r\n"
        ).encode("ascii")
    return (
        f"{stamp} SN={sn} SPO2={s}% BPM={p} PI={pi_txt}% SPCO=--.-% SPMET=--.-% DESAT=-- "
        f"PIDELTA=+-- ALARM=0000 EXC={exc:06X}\r\n"
    ).encode("ascii")
