"""Contec CMS50D+/CMS50E live streams: the legacy 5-byte frames and the firmware-4.6 9-byte packets.

Both protocols were reverse-engineered by others (legacy: public repo atbrask/CMS50Dplus;
firmware 4.6: public repo headrotor/contec_data); field meanings beyond pulse rate, SpO2 and the
status bits below are uncertain, so the parsers decode only those.

**Legacy** (19200 baud, 8 data bits, odd parity, 1 stop, ~60 frames/s, no checksum): byte 1 has
bit 7 set, bytes 2-5 have it clear.  Byte 1: bit 6 beep, bit 5 SpO2 dropping, bit 4 finger out,
bits 3-0 signal strength.  Byte 2: pleth.  Byte 3: bit 6 pulse-rate bit 7, bit 5 searching,
bit 4 probe error, bits 3-0 bar graph.  Byte 4: pulse rate bits 6-0.  Byte 5: SpO2.

**Firmware 4.6** (115200 8N1): the host starts the stream with ``7D 81 A1 80 80 80 80 80 80`` and
keeps it going with ``7D 81 AF 80 ...``.  Every packet is a type byte with bit 7 clear followed by
bytes with bit 7 set; live data is type 01, nine bytes: status ``E0`` (valid), ``E1`` (pulse and
SpO2 not valid), ``E2`` (no valid data); pulse rate = byte 6 & 7F, SpO2 = byte 7 & 7F.

Framing.  Both formats delimit themselves by bit 7, so a frame is taken only once the first byte
of the next one has arrived and its length is exactly right: a lost or extra byte is seen.  With
no checksum a flipped value bit, or garbage that happens to have the right shape, cannot be seen
in a single frame, so readings are decided by vote: every :data:`GROUP` whole frames (about a
third of a second) give one reading, each value being the one more than half of those frames
carry.  A lone damaged frame never becomes a value; when no value has a majority the reading
leaves it out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import ClassVar

from drivers.serial.protocol import NAN, DropReason, LineSettings, Parser, Reading, Status

#: Frames per reading (each value is decided by majority over them).
GROUP = 20
_NONE = -1  # vote token of a missing value
# Plain ints: IntFlag arithmetic costs about a microsecond per operation on this path.
_FINGER_OUT = int(Status.FINGER_OUT)
_SEARCHING = int(Status.SEARCHING)
_PROBE = int(Status.SENSOR_FAULT)
SPO2_MAX = 100
PR_MAX = 250  # CMS50D+ pulse-rate range 30-250 /min

LEGACY_SETTINGS = LineSettings(19200, 8, "O", 1)
V46_SETTINGS = LineSettings(115200)

START_COMMAND = bytes((0x7D, 0x81, 0xA1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80))
KEEPALIVE_COMMAND = bytes((0x7D, 0x81, 0xAF, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80))


def _majority(values: Sequence[int]) -> int | None:
    """The value more than half of ``values`` hold, or None."""
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] * 2 > len(values) else None


def _vote(spo2: list[int], pulse: list[int], status: list[int]) -> Reading:
    s = _majority(spo2)
    p = _majority(pulse)
    half = len(status) / 2
    flags = 0
    bit = 1
    acc = 0
    for st in status:
        acc |= st
    while bit <= acc:
        if acc & bit and sum(1 for st in status if st & bit) > half:
            flags |= bit
        bit <<= 1
    return Reading(
        None if s is None else (NAN if s == _NONE else float(s)),
        None if p is None else (NAN if p == _NONE else float(p)),
        None,
        flags,
    )


def legacy_fields(frame: bytes | bytearray) -> tuple[int, int, int] | DropReason:
    """(SpO2, pulse rate, Status bits) of one legacy frame, -1 for a missing value; or why it is rejected."""
    if len(frame) != 5 or not frame[0] & 0x80 or (frame[1] | frame[2] | frame[3] | frame[4]) & 0x80:
        return DropReason.FRAMING
    b1, _pleth, b3, b4, b5 = frame
    pulse = ((b3 & 0x40) << 1) | b4
    spo2 = b5
    if (spo2 > SPO2_MAX and spo2 != 127) or (pulse > PR_MAX and pulse != 255):
        return DropReason.RANGE
    status = (
        (_FINGER_OUT if b1 & 0x10 else 0) | (_SEARCHING if b3 & 0x20 else 0) | (_PROBE if b3 & 0x10 else 0)
    )
    if status:
        return _NONE, _NONE, status
    return (_NONE if spo2 in (0, 127) else spo2, _NONE if pulse in (0, 255) else pulse, 0)


def v46_fields(frame: bytes | bytearray) -> tuple[int, int, int] | DropReason:
    """(SpO2, pulse rate, Status bits) of one firmware-4.6 live packet, -1 when missing; or why rejected."""
    if len(frame) != 9 or frame[0] != 0x01 or any(b < 0x80 for b in frame[1:]):
        return DropReason.FRAMING
    state = frame[1]
    if state & 0xF0 != 0xE0:
        return DropReason.FRAMING
    pulse = frame[5] & 0x7F
    spo2 = frame[6] & 0x7F
    if spo2 > SPO2_MAX and spo2 != 127:
        return DropReason.RANGE
    code = state & 0x0F
    if code:
        return _NONE, _NONE, _SEARCHING if code == 1 else _FINGER_OUT
    return (_NONE if spo2 in (0, 127) else spo2, _NONE if pulse in (0, 127) else pulse, 0)


def _reading(fields: tuple[int, int, int]) -> Reading:
    spo2, pulse, status = fields
    return Reading(
        NAN if spo2 == _NONE else float(spo2), NAN if pulse == _NONE else float(pulse), None, status
    )


def decode_legacy(frame: bytes) -> Reading | DropReason:
    """One legacy frame on its own (the stream parser votes over many)."""
    got = legacy_fields(frame)
    return got if isinstance(got, DropReason) else _reading(got)


def decode_v46(frame: bytes) -> Reading | DropReason:
    """One firmware-4.6 live packet on its own (the stream parser votes over many)."""
    got = v46_fields(frame)
    return got if isinstance(got, DropReason) else _reading(got)


_HIGH_HEAD = re.compile(rb"[\x80-\xff][\x00-\x7f]*")
_LOW_HEAD = re.compile(rb"[\x00-\x7f][\x80-\xff]*")


class _VotingParser(Parser):
    """Frames delimited by bit 7; one reading per GROUP whole frames, by majority."""

    _frames: ClassVar[re.Pattern[bytes]]  # one frame: its first byte and the run of bytes after it

    def __init__(self) -> None:
        super().__init__()
        self._rest = b""  # the frame still open (its end not seen yet), from its first byte
        self._spo2: list[int] = []
        self._pulse: list[int] = []
        self._status: list[int] = []

    def feed(self, data: bytes) -> list[Reading]:
        """Consume bytes; return one reading per GROUP whole frames."""
        self.bytes_in += len(data)
        out: list[Reading] = []
        buf = self._rest + data
        frames = self._frames.findall(buf)
        if not frames:
            self.skipped += len(data)
            self._rest = b""
            return out
        lead = len(buf) - sum(map(len, frames))
        if lead:
            # Bytes before the first frame start (only while hunting: an open frame starts buf).
            self.skipped += lead
        for frame in frames[:-1]:
            self._finish(frame, out)
        # The last frame is closed only by the next one's first byte; a frame longer than it may
        # be is cut short here, which keeps it wrong-sized and the buffer bounded.
        self._rest = frames[-1][: self.frame_len + 1]
        return out

    def _finish(self, frame: bytes, out: list[Reading]) -> None:
        if len(frame) != self.frame_len:
            self.drop_framing += 1
            self.skipped += len(frame)
            return
        got = self._fields(frame)
        if isinstance(got, DropReason):
            self._drop(got)
            return
        self.frames += 1
        self.good_bytes += self.frame_len
        self._spo2.append(got[0])
        self._pulse.append(got[1])
        self._status.append(got[2])
        if len(self._status) >= GROUP:
            out.append(_vote(self._spo2, self._pulse, self._status))
            self.readings += 1
            self._spo2.clear()
            self._pulse.clear()
            self._status.clear()

    _fields: Callable[[bytes], tuple[int, int, int] | DropReason]


class Cms50Legacy(_VotingParser):
    """Contec CMS50D+ legacy live stream: 5-byte frames at 19200 8O1."""

    name = "cms50"
    settings = LEGACY_SETTINGS
    frame_len = 5
    frame_period_s = 1 / 60
    reading_rate_hz = 60 / GROUP
    _frames = _HIGH_HEAD
    _fields = staticmethod(legacy_fields)


class Cms50V46(_VotingParser):
    """Contec CMS50D+ firmware 4.6: 9-byte packets at 115200 8N1, started by a command."""

    name = "cms50v46"
    settings = V46_SETTINGS
    frame_len = 9
    frame_period_s = 1 / 60
    reading_rate_hz = 60 / GROUP
    start_command = START_COMMAND
    keepalive_command = KEEPALIVE_COMMAND
    keepalive_s = 2.0
    _frames = _LOW_HEAD

    def _finish(self, frame: bytes, out: list[Reading]) -> None:
        if frame[0] != 0x01:
            # Replies to commands (other packet types) carry no measurement.
            self.ignored += 1
            return
        super()._finish(frame, out)

    _fields = staticmethod(v46_fields)


# ---- encoders (simulator and tests) --------------------------------------------------------------


def encode_legacy(pulse: float, spo2: float, status: int, pleth: int, strength: int = 6) -> bytes:
    """One legacy 5-byte frame; missing values are sent as the device does (0 with the status bits)."""
    missing = math.isnan(pulse) or math.isnan(spo2) or bool(status & (Status.FINGER_OUT | Status.SENSOR_OFF))
    p = 0 if missing else max(0, min(PR_MAX, round(pulse)))
    s = 0 if missing else max(0, min(SPO2_MAX, round(spo2)))
    b1 = 0x80 | (strength & 0x0F)
    b3 = (p & 0x80) >> 1 | min(15, (pleth & 0x7F) >> 3)
    if missing:
        b1 |= 0x10
        b3 |= 0x20
    if status & Status.SENSOR_FAULT:
        b3 |= 0x10
    return bytes((b1, pleth & 0x7F, b3, p & 0x7F, s))


def encode_v46(pulse: float, spo2: float, status: int, pleth: int) -> bytes:
    """One firmware-4.6 live packet."""
    if status & (Status.FINGER_OUT | Status.SENSOR_OFF):
        code = 2
    elif status & Status.SEARCHING or math.isnan(pulse) or math.isnan(spo2):
        code = 1
    else:
        code = 0
    p = 127 if code else max(1, min(126, round(pulse)))
    s = 127 if code else max(0, min(SPO2_MAX, round(spo2)))
    wave = pleth & 0x7F
    return bytes(
        (
            0x01,
            0xE0 | code,
            0x80 | wave,
            0x80 | (wave >> 1),
            0x80 | (wave >> 3),
            0x80 | p,
            0x80 | s,
            0xFF,
            0xFF,
        )
    )
