"""Nonin serial formats: Data Formats #2, #7, #8, #13 and the ASCII line of the older monitors.

Sources: Nonin OEM specifications (Onyx II 9560, doc 6470-000-01; OEM III status bits) and the
operator manuals of the 8500, 2500, 7500FO, Avant 9600 and BT4000 (ASCII output).  All at
9600 baud, 8N1.  The encoders at the bottom write the same formats; the simulator and the tests
use them.

Framing, per format:

* **#2 / #7** - 5-byte frames, 75 per second, 25 to a packet; frame 1 carries the SYNC bit.
  A frame is whole when its status byte has bit 7 set, its checksum holds and (for #2) it starts
  with 01.  Values are taken only from a packet of 25 consecutive whole frames that starts with
  the SYNC frame, so a frame made up by a slipped byte never yields a value.
* **#8** - 4 bytes once a second, no checksum: bit 7 is set in byte 1 only and the reserved bits
  are zero.  A frame is complete when the next frame's first byte arrives (or the line falls
  silent: :meth:`DataFormat8.idle`).  Every frame must agree with a neighbour the way readings a
  second apart do (steps under 25 /min and 6 %, values present in both or missing in both): in
  sync, a frame that jumps from the previous one is held until the next one confirms it; while
  hunting, a candidate needs a confirming frame behind it.  Random bytes still pass now and then
  - the format has no checksum - but far more rarely.
* **#13** - one message per spot check: ``00 02 00 0D``, length, payload, checksum, ``03``.
* **ASCII** - ``[HH:MM:SS ]SPO2=XXX HR=YYY`` with an optional ``F``, ``*`` or ``B`` after it;
  fields are exactly three characters, so a lost digit is seen.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from drivers.serial.protocol import (
    NAN,
    DropReason,
    LineParser,
    LineSettings,
    Parser,
    Reading,
    Status,
)

SETTINGS = LineSettings(9600)
HR_MISSING = 511
SPO2_MISSING = 127
HR_MAX = 321  # Nonin's documented pulse-rate range ends at 321 /min
SPO2_MAX = 100
PACKET_FRAMES = 25

#: Selects the output format on the 9560 (``fmt`` 0x0D, 0x08, 0x07 or 0x02); the device answers
#: ACK 06 or NAK 15.  Never sent by the driver: the operator sets the monitor up.
FORMAT_COMMAND = b"\x02\x70\x02\x02%c\x03"

_SYNC = 0x01
_STATUS_SNSD = 0x40
_STATUS_ARTF = 0x20
_STATUS_OOT = 0x10
_STATUS_SNSA = 0x08
_STATUS_RPRF = 0x04
_STATUS_GPRF = 0x02


def _df2_status(byte: int) -> int:
    s = 0
    if byte & _STATUS_SNSD:
        s |= Status.SENSOR_OFF
    if byte & _STATUS_ARTF:
        s |= Status.ARTIFACT
    if byte & _STATUS_OOT:
        s |= Status.OUT_OF_TRACK
    if byte & _STATUS_SNSA:
        s |= Status.FINGER_OUT
    red, green = byte & _STATUS_RPRF, byte & _STATUS_GPRF
    if red and not green:
        s |= Status.LOW_PERFUSION
    elif red and green:
        s |= Status.MARGINAL_PERFUSION
    return int(s)


#: Status byte of a #2/#7 frame -> Status bits.
DF2_STATUS: tuple[int, ...] = tuple(_df2_status(b) for b in range(256))


def hr_from(msb: int, lsb: int) -> int:
    """The 9-bit pulse rate of #2/#7/#8: two bits of the MSB byte, seven of the LSB byte."""
    return ((msb & 0x03) << 7) | (lsb & 0x7F)


def _check_values(hr: int, spo2: int) -> DropReason | None:
    if (hr > HR_MAX and hr != HR_MISSING) or (spo2 > SPO2_MAX and spo2 != SPO2_MISSING):
        return DropReason.RANGE
    # An oximeter computes SpO2 from the pulsatile signal: a measured SpO2 beside a pulse rate of 0
    # is no reading a monitor sends (it reports both missing), only damaged bytes that still add up.
    if hr == 0 and spo2 != SPO2_MISSING:
        return DropReason.RANGE
    return None


def _hr_value(hr: int) -> float:
    return NAN if hr == HR_MISSING else float(hr)


def _spo2_value(spo2: int) -> float:
    return NAN if spo2 == SPO2_MISSING else float(spo2)


# ---- Data Formats #2 and #7 ----------------------------------------------------------------------


def check_packet_frame(frame: bytes, *, start: int | None) -> DropReason | None:
    """Why a 5-byte #2 (``start=1``) or #7 (``start=None``) frame is rejected, or None if whole."""
    if len(frame) != 5:
        return DropReason.FRAMING
    status = frame[1] if start is not None else frame[0]
    if (start is not None and frame[0] != start) or not status & 0x80:
        return DropReason.FRAMING
    if (frame[0] + frame[1] + frame[2] + frame[3]) & 0xFF != frame[4]:
        return DropReason.CHECKSUM
    return None


@dataclass(frozen=True, slots=True)
class PacketFrame:
    """One whole #2/#7 frame: its status bits, whether it opens a packet, pleth and FLOAT byte."""

    status: int  # Status bits
    sync: bool
    pleth: int
    value: int


def decode_packet_frame(frame: bytes, *, start: int | None) -> PacketFrame | DropReason:
    """A #2 (``start=1``) or #7 (``start=None``) frame on its own, or why it is rejected."""
    bad = check_packet_frame(frame, start=start)
    if bad is not None:
        return bad
    if start is not None:
        return PacketFrame(DF2_STATUS[frame[1]], bool(frame[1] & _SYNC), frame[2], frame[3])
    return PacketFrame(DF2_STATUS[frame[0]], bool(frame[0] & _SYNC), (frame[1] << 8) | frame[2], frame[3])


class _PacketParser(Parser):
    """#2 and #7: 25 checksummed frames to a packet; one reading per whole packet."""

    settings = SETTINGS
    frame_len = 5
    frame_period_s = 1 / 75
    reading_rate_hz = 3.0
    reports_battery = True
    _start: ClassVar[int]  # first byte of every frame, or -1 when the format has none
    _status_at: ClassVar[int]

    def __init__(self) -> None:
        super().__init__()
        self._buf = bytearray()
        self._locked = False
        self._loss_counted = True  # a fresh parser hunts without a loss to report
        self._pos = 0  # frames of the current packet so far; 0 = waiting for a SYNC frame
        self._floats = [0] * PACKET_FRAMES
        self._acc = 0  # Status bits seen in the current packet

    def feed(self, data: bytes) -> list[Reading]:
        """Consume bytes; return one reading per completed packet."""
        self.bytes_in += len(data)
        buf = self._buf
        buf += data
        n = len(buf)
        i = 0
        out: list[Reading] = []
        start = self._start
        si = self._status_at
        floats = self._floats
        while i + 5 <= n:
            b0 = buf[i]
            status = buf[i + si]
            ok = (start < 0 or b0 == start) and status & 0x80
            if ok and (b0 + buf[i + 1] + buf[i + 2] + buf[i + 3]) & 0xFF == buf[i + 4]:
                if not self._locked:
                    self._locked = True
                    if not self._loss_counted:
                        self.drop_framing += 1
                self._loss_counted = False
                self.frames += 1
                self.good_bytes += 5
                pos = self._pos
                if status & _SYNC:
                    if pos:
                        # A SYNC frame before frame 25: frames of this packet went missing.
                        self.drop_framing += 1
                    pos = 1
                    self._acc = 0
                elif pos:
                    pos += 1
                if pos:
                    floats[pos - 1] = buf[i + 3]
                    self._acc |= DF2_STATUS[status]
                    if pos == PACKET_FRAMES:
                        reading = self._packet_reading()
                        if reading is not None:
                            out.append(reading)
                        pos = 0
                self._pos = pos
                i += 5
                continue
            if self._locked:
                self._locked = False
                self._loss_counted = True
                self._pos = 0
                if ok:
                    self.drop_checksum += 1
                else:
                    self.drop_framing += 1
            self.skipped += 1
            i += 1
        del buf[:i]
        return out

    def _packet_reading(self) -> Reading | None:
        f = self._floats
        hr = hr_from(f[0], f[1])
        spo2 = f[2] & 0x7F
        if _check_values(hr, spo2) is not None:
            self.drop_range += 1
            return None
        status = self._acc
        if f[7] & 0x01:
            status |= Status.LOW_BATTERY
        self.readings += 1
        return Reading(_spo2_value(spo2), _hr_value(hr), None, int(status))


class DataFormat2(_PacketParser):
    """Nonin Data Format #2: ``[01][STATUS][PLETH][FLOAT][CHK]``."""

    name = "nonin2"
    _start = _SYNC
    _status_at = 1


class DataFormat7(_PacketParser):
    """Nonin Data Format #7: ``[STATUS][PLETH MSB][PLETH LSB][FLOAT][CHK]``."""

    name = "nonin7"
    _start = -1
    _status_at = 0


# ---- Data Format #8 ------------------------------------------------------------------------------

_DF8_RESERVED_1 = 0x40
_DF8_RESERVED_4 = 0x56  # bits 6, 4, 2, 1 of byte 4


def decode_df8(frame: bytes) -> Reading | DropReason:
    """One #8 frame: the reading, or why it is rejected."""
    if len(frame) != 4:
        return DropReason.FRAMING
    b0, b1, b2, b3 = frame
    if not b0 & 0x80 or (b1 | b2 | b3) & 0x80 or b0 & _DF8_RESERVED_1 or b3 & _DF8_RESERVED_4:
        return DropReason.FRAMING
    hr = hr_from(b0, b1)
    bad = _check_values(hr, b2)
    if bad is not None:
        return bad
    s = 0
    if b0 & 0x20:
        s |= Status.OUT_OF_TRACK
    if b0 & 0x10:
        s |= Status.LOW_PERFUSION
    if b0 & 0x08:
        s |= Status.MARGINAL_PERFUSION
    if b0 & 0x04:
        s |= Status.ARTIFACT
    if b3 & 0x08:
        s |= Status.FINGER_OUT
    if b3 & 0x01:
        s |= Status.LOW_BATTERY
    return Reading(_spo2_value(b2), _hr_value(hr), None, int(s))


#: Largest change between two readings a second apart that still confirms a resync.
_CONFIRM_HR = 25.0
_CONFIRM_SPO2 = 6.0


def _plausible_pair(a: Reading, b: Reading) -> bool:
    """Two readings a second apart that could both be true: same values present, small steps."""
    for x, y, tol in ((a.pulse, b.pulse, _CONFIRM_HR), (a.spo2, b.spo2, _CONFIRM_SPO2)):
        if x is None or y is None:
            continue
        if math.isnan(x) != math.isnan(y) or abs(x - y) > tol:
            return False
    return True


class DataFormat8(Parser):
    """Nonin Data Format #8: four bytes once a second, no checksum."""

    name = "nonin8"
    settings = SETTINGS
    frame_len = 4
    frame_period_s = 1.0
    reading_rate_hz = 1.0
    reports_battery = True

    def __init__(self) -> None:
        super().__init__()
        self._buf = bytearray()
        self._locked = False
        self._loss_counted = True
        self._idle = False
        self._last: Reading | None = None  # the last frame taken
        self._pending: Reading | None = None  # a frame in sync that jumps from the last one

    def idle(self) -> list[Reading]:
        """The line fell silent: a whole frame waiting for the next one's first byte is complete."""
        self._idle = True
        try:
            return self.feed(b"")
        finally:
            self._idle = False

    def feed(self, data: bytes) -> list[Reading]:
        """Consume bytes; return one reading per whole frame."""
        self.bytes_in += len(data)
        buf = self._buf
        buf += data
        n = len(buf)
        i = 0
        out: list[Reading] = []
        while i + 4 <= n:
            got = decode_df8(bytes(buf[i : i + 4]))
            if self._locked:
                if i + 4 == n and not self._idle:
                    # The frame is taken once the next frame's first byte shows it ended where
                    # it should (or the line fell silent after it): an extra byte is seen.
                    break
                nxt = buf[i + 4] if i + 4 < n else 0x80
                if isinstance(got, Reading) and nxt & 0xC0 == 0x80:
                    self._locked_frame(got, out)
                    i += 4
                    continue
                if got is DropReason.RANGE and nxt & 0xC0 == 0x80:
                    # Aligned (the framing bits hold) but a value is impossible: drop it, stay locked.
                    self.drop_range += 1
                    i += 4
                    continue
                self._locked = False
                self._loss_counted = True
                self._drop(DropReason.FRAMING if isinstance(got, Reading) else got)
                if self._pending is not None:
                    self._pending = None
                    self.drop_framing += 1
                self.skipped += 1
                i += 1
                continue
            # Hunting: with no checksum, random bytes pass the framing checks about once in a
            # thousand; a candidate is trusted only when the next frame is whole too and agrees
            # with it the way two readings a second apart do.
            if i + 8 > n:
                break
            if isinstance(got, Reading):
                after = decode_df8(bytes(buf[i + 4 : i + 8]))
                if isinstance(after, Reading) and _plausible_pair(got, after):
                    self._locked = True
                    if not self._loss_counted:
                        self.drop_framing += 1
                    self._loss_counted = False
                    self._last = None
                    self._accept(got, out)
                    i += 4
                    continue
            self.skipped += 1
            i += 1
        del buf[:i]
        return out

    def _locked_frame(self, got: Reading, out: list[Reading]) -> None:
        """A whole frame in sync: taken when it agrees with a neighbour, else held one frame."""
        pending = self._pending
        if pending is not None:
            self._pending = None
            if _plausible_pair(pending, got):
                self._accept(pending, out)
            else:
                self.drop_framing += 1
        if self._last is None or _plausible_pair(self._last, got):
            self._accept(got, out)
        else:
            # A jump, or values appearing or vanishing: true if the next frame agrees with it.
            self._pending = got

    def _accept(self, reading: Reading, out: list[Reading]) -> None:
        self.frames += 1
        self.good_bytes += 4
        self.readings += 1
        self._last = reading
        out.append(reading)


# ---- Data Format #13 -----------------------------------------------------------------------------

DF13_HEADER = b"\x00\x02\x00\x0d"
_DF13_MIN_LEN = 14
_DF13_MAX_LEN = 64


def _bcd(byte: int) -> int | None:
    hi, lo = byte >> 4, byte & 0x0F
    if hi > 9 or lo > 9:
        return None
    return hi * 10 + lo


def decode_df13_payload(payload: bytes) -> Reading | DropReason:
    """The payload of a #13 message (date-time, status, HR, SpO2): the reading or why it is rejected."""
    if len(payload) < _DF13_MIN_LEN:
        return DropReason.FRAMING
    # An 8-bit checksum passes one damaged run of bytes in 256, so the message's fixed structure is
    # checked too: a BCD date-time of this century that is a real date, the zero byte after it, and
    # the HR MSB byte carrying only HR bit 8. A monitor always sends these; shifted or inserted
    # bytes rarely keep them all.
    digits = [_bcd(b) for b in payload[:7]]
    if any(d is None for d in digits) or payload[0] != 0x20 or payload[7] != 0 or payload[10] & 0xFE:
        return DropReason.FRAMING
    cc, yy, mo, dd, hh, mi, ss = (int(d or 0) for d in digits)
    if not (1 <= mo <= 12 and 1 <= dd <= 31 and hh < 24 and mi < 60 and ss < 60):
        return DropReason.FRAMING
    device_time = f"{cc:02d}{yy:02d}-{mo:02d}-{dd:02d}T{hh:02d}:{mi:02d}:{ss:02d}"
    stat_msb, stat_lsb = payload[8], payload[9]
    hr = ((payload[10] & 0x01) << 8) | payload[11]
    spo2 = payload[13]
    bad = _check_values(hr, spo2)
    if bad is not None:
        return bad
    s = 0
    if stat_msb & 0x01:
        s |= Status.NO_MEASUREMENT
    if stat_lsb & 0x01:
        s |= Status.LOW_BATTERY
    return Reading(_spo2_value(spo2), _hr_value(hr), None, int(s), None, device_time)


class DataFormat13(Parser):
    """Nonin Data Format #13: one checksummed message per spot check."""

    name = "nonin13"
    settings = SETTINGS
    frame_len = 22
    frame_period_s = 1.0  # messages come when a spot check ends; this is the fastest they follow
    reading_rate_hz = None
    reports_battery = True

    def __init__(self) -> None:
        super().__init__()
        self._buf = bytearray()
        self._loss_counted = True

    def feed(self, data: bytes) -> list[Reading]:
        """Consume bytes; return one reading per whole message."""
        self.bytes_in += len(data)
        buf = self._buf
        buf += data
        out: list[Reading] = []
        i = 0
        while True:
            j = buf.find(DF13_HEADER, i)
            if j < 0:
                # Keep a tail that may be the start of a header split across reads.
                keep = max(i, len(buf) - (len(DF13_HEADER) - 1))
                self._skip(keep - i)
                i = keep
                break
            self._skip(j - i)
            i = j
            if len(buf) - j < 6:
                break
            length = (buf[j + 4] << 8) | buf[j + 5]
            if not _DF13_MIN_LEN <= length <= _DF13_MAX_LEN:
                self.drop_framing += 1
                self._loss_counted = True
                self._skip(1)
                i = j + 1
                continue
            end = j + 6 + length + 2
            if len(buf) < end:
                break
            payload = bytes(buf[j + 6 : j + 6 + length])
            bad: DropReason | None = None
            if sum(payload) & 0xFF != buf[j + 6 + length]:
                bad = DropReason.CHECKSUM
            elif buf[end - 1] != 0x03:
                bad = DropReason.FRAMING
            got = bad if bad is not None else decode_df13_payload(payload)
            if isinstance(got, DropReason):
                self._drop(got)
                self._loss_counted = True
                self._skip(1)
                i = j + 1
                continue
            self._loss_counted = False
            self.frames += 1
            self.good_bytes += end - j
            self.readings += 1
            out.append(got)
            i = end
        del buf[:i]
        return out

    def _skip(self, count: int) -> None:
        if count > 0:
            if not self._loss_counted:
                self.drop_framing += 1
                self._loss_counted = True
            self.skipped += count


# ---- ASCII ---------------------------------------------------------------------------------------

_ASCII_LINE = re.compile(
    rb"^(?:\d\d:\d\d:\d\d +)?SPO2=(\d{3}| \d\d|  \d|---) HR=(\d{3}| \d\d|  \d|---)(?P<tail>[ FB*]*)$"
)


def decode_ascii(line: bytes) -> Reading | DropReason | None:
    """One ASCII line: a reading, why a data line is rejected, or None for other lines (headers)."""
    m = _ASCII_LINE.match(line)
    if m is None:
        return DropReason.FRAMING if b"SPO2=" in line or b"HR=" in line else None
    spo2_txt, hr_txt = m.group(1), m.group(2)
    spo2 = NAN if spo2_txt == b"---" else float(int(spo2_txt))
    hr = NAN if hr_txt == b"---" else float(int(hr_txt))
    if spo2 > SPO2_MAX or hr > HR_MAX:
        return DropReason.RANGE
    return Reading(spo2, hr)


class NoninAscii(LineParser):
    """The ASCII line of Nonin 8500, 2500, 7500FO, Avant 9600, BT4000: once a second."""

    name = "nonin_ascii"
    settings = SETTINGS
    frame_len = 17  # "SPO2=097 HR=072\r\n"
    frame_period_s = 1.0
    reading_rate_hz = 1.0

    def __init__(self) -> None:
        super().__init__(max_len=80)

    def _decode(self, line: bytes) -> Reading | DropReason | None:
        return decode_ascii(line)


# ---- encoders (simulator and tests) --------------------------------------------------------------


def _raw_hr(value: float) -> int:
    return HR_MISSING if math.isnan(value) else max(0, min(HR_MAX, round(value)))


def _raw_spo2(value: float) -> int:
    return SPO2_MISSING if math.isnan(value) else max(0, min(SPO2_MAX, round(value)))


def status_byte(status: int) -> int:
    """The #2/#7 status byte (without SYNC) for a set of Status bits."""
    b = 0x80
    if status & Status.SENSOR_OFF:
        b |= _STATUS_SNSD
    if status & Status.ARTIFACT:
        b |= _STATUS_ARTF
    if status & Status.OUT_OF_TRACK:
        b |= _STATUS_OOT
    if status & Status.FINGER_OUT:
        b |= _STATUS_SNSA
    if status & Status.LOW_PERFUSION:
        b |= _STATUS_RPRF
    elif status & Status.MARGINAL_PERFUSION:
        b |= _STATUS_RPRF | _STATUS_GPRF
    else:
        b |= _STATUS_GPRF
    return b


def encode_packet(fmt: int, hr: float, spo2: float, status: int, pleth: Sequence[int]) -> bytes:
    """A whole #2 (``fmt=2``) or #7 (``fmt=7``) packet: 25 frames with the values in their slots."""
    if len(pleth) != PACKET_FRAMES:
        raise ValueError(f"nonin encoder: {len(pleth)} pleth samples: a packet needs {PACKET_FRAMES}")
    raw_hr, raw_spo2 = _raw_hr(hr), _raw_spo2(spo2)
    floats = [0] * PACKET_FRAMES
    floats[0] = (raw_hr >> 7) & 0x03
    floats[1] = raw_hr & 0x7F
    floats[2] = raw_spo2
    floats[3] = 0x31  # SREV: firmware revision byte
    floats[7] = 0x01 if status & Status.LOW_BATTERY else 0x00
    floats[8] = raw_spo2  # SpO2-D, the displayed value
    floats[19] = (raw_hr >> 7) & 0x03  # HR-D
    floats[20] = raw_hr & 0x7F
    sbyte = status_byte(status)
    out = bytearray()
    for k in range(PACKET_FRAMES):
        st = sbyte | (_SYNC if k == 0 else 0)
        if fmt == 2:
            head = [0x01, st, pleth[k] & 0xFF, floats[k]]
        else:
            p = pleth[k] & 0xFFFF
            head = [st, p >> 8, p & 0xFF, floats[k]]
        out += bytes(head)
        out.append(sum(head) & 0xFF)
    return bytes(out)


def encode_df8(hr: float, spo2: float, status: int) -> bytes:
    """One #8 frame."""
    raw_hr, raw_spo2 = _raw_hr(hr), _raw_spo2(spo2)
    b0 = 0x80 | ((raw_hr >> 7) & 0x03)
    if status & Status.OUT_OF_TRACK:
        b0 |= 0x20
    if status & Status.LOW_PERFUSION:
        b0 |= 0x10
    if status & Status.MARGINAL_PERFUSION:
        b0 |= 0x08
    if status & Status.ARTIFACT:
        b0 |= 0x04
    b3 = 0x00
    if status & (Status.FINGER_OUT | Status.SENSOR_OFF):
        b3 |= 0x08
    if status & Status.LOW_BATTERY:
        b3 |= 0x01
    return bytes((b0, raw_hr & 0x7F, raw_spo2, b3))


def _to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def encode_df13(hr: float, spo2: float, status: int, when: tuple[int, int, int, int, int, int]) -> bytes:
    """One #13 message; ``when`` is (year, month, day, hour, minute, second)."""
    year, mo, dd, hh, mi, ss = when
    raw_hr, raw_spo2 = _raw_hr(hr), _raw_spo2(spo2)
    stat_msb = 0x02 | (0x01 if status & Status.NO_MEASUREMENT else 0)
    stat_lsb = 0x01 if status & Status.LOW_BATTERY else 0
    stamp = [_to_bcd(v) for v in (year // 100, year % 100, mo, dd, hh, mi, ss)]
    payload = bytes([*stamp, 0x00, stat_msb, stat_lsb, (raw_hr >> 8) & 0x01, raw_hr & 0xFF, 0x00, raw_spo2])
    return DF13_HEADER + len(payload).to_bytes(2, "big") + payload + bytes((sum(payload) & 0xFF, 0x03))


def encode_ascii(hr: float, spo2: float, clock: str | None = None) -> bytes:
    """One ASCII line with CR LF; ``clock`` is an optional ``HH:MM:SS`` prefix."""
    s = "---" if math.isnan(spo2) else f"{_raw_spo2(spo2):03d}"
    h = "---" if math.isnan(hr) else f"{_raw_hr(hr):03d}"
    prefix = f"{clock} " if clock else ""
    return f"{prefix}SPO2={s} HR={h}\r\n".encode("ascii")
