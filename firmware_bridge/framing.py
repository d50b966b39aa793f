"""Frames on the wire: COBS around ``version type seq payload crc16``, a 0x00 after each frame.

Pure and synchronous: :class:`FrameDecoder` takes whatever bytes a read returned and yields the
valid frames among them, counting every dropped frame by reason and resynchronising on the next
delimiter.  See ``PROTOCOL.md`` for the layout and test vectors; the C library in ``firmware/``
implements the same thing byte for byte.
"""

from __future__ import annotations

import binascii
import enum
import struct
from collections import Counter
from dataclasses import dataclass

PROTO_VERSION = 1
HEADER_LEN = 4
CRC_LEN = 2
MAX_PAYLOAD = 240
MAX_FRAME = HEADER_LEN + MAX_PAYLOAD + CRC_LEN  # 246
MAX_COBS = MAX_FRAME + MAX_FRAME // 254 + 1  # 247: one code byte per 254 bytes, plus the first
MAX_WIRE = MAX_COBS + 1  # with the delimiter

_HEADER = struct.Struct("<BBH")


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor)."""
    # binascii's CRC-CCITT is this very CRC when seeded with 0xFFFF, at C speed.
    return binascii.crc_hqx(data, 0xFFFF)


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing of ``data`` (no delimiter added)."""
    out = bytearray(b"\x00")
    code_at = 0
    code = 1
    last = len(data) - 1
    for i, b in enumerate(data):
        if b == 0:
            out[code_at] = code
            code_at = len(out)
            out.append(0)
            code = 1
        else:
            out.append(b)
            code += 1
            # A full block of 254 bytes carries no implied zero; start another only if input follows.
            if code == 0xFF and i != last:
                out[code_at] = code
                code_at = len(out)
                out.append(0)
                code = 1
    out[code_at] = code
    return bytes(out)


class CobsError(ValueError):
    """The bytes between two delimiters are not valid COBS."""


def cobs_decode(data: bytes) -> bytes:
    """Undo :func:`cobs_encode`; raise :class:`CobsError` on an invalid encoding."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        i += 1
        if code == 0:
            raise CobsError("a zero byte inside a COBS block")
        end = i + code - 1
        if end > n:
            raise CobsError(f"block of {code - 1} bytes runs past the end ({n - i} left)")
        block = data[i:end]
        if 0 in block:
            raise CobsError("a zero byte inside a COBS block")
        out += block
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


class DropReason(enum.StrEnum):
    """Why received bytes did not make a frame."""

    OVERSIZE = "oversize"  # more than MAX_COBS bytes without a delimiter
    COBS = "cobs"  # not a valid COBS encoding
    SHORT = "short"  # shorter than a header and a CRC
    CRC = "crc"  # checksum mismatch
    VERSION = "version"  # a protocol version this gateway does not speak


@dataclass(frozen=True, slots=True)
class Frame:
    """One valid frame: its type, sequence number and payload."""

    type: int
    seq: int
    payload: bytes


class FrameError(ValueError):
    """A frame cannot be built (payload too long, field out of range)."""


def encode_frame(type_: int, seq: int, payload: bytes = b"") -> bytes:
    """The wire bytes of one frame, delimiter included."""
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes exceeds the maximum of {MAX_PAYLOAD}")
    if not (0 <= type_ <= 0xFF and 0 <= seq <= 0xFFFF):
        raise FrameError(f"type {type_} or seq {seq} out of range")
    raw = _HEADER.pack(PROTO_VERSION, type_, seq) + payload
    raw += crc16(raw).to_bytes(2, "little")
    return cobs_encode(raw) + b"\x00"


def decode_frame(encoded: bytes) -> Frame | DropReason:
    """One frame from the bytes between two delimiters, or why it was dropped."""
    if len(encoded) > MAX_COBS:
        return DropReason.OVERSIZE
    try:
        raw = cobs_decode(encoded)
    except CobsError:
        return DropReason.COBS
    if len(raw) < HEADER_LEN + CRC_LEN:
        return DropReason.SHORT
    if crc16(raw[:-CRC_LEN]) != int.from_bytes(raw[-CRC_LEN:], "little"):
        return DropReason.CRC
    version, type_, seq = _HEADER.unpack_from(raw)
    if version != PROTO_VERSION:
        return DropReason.VERSION
    return Frame(type_, seq, raw[HEADER_LEN:-CRC_LEN])


class FrameDecoder:
    """Turns a byte stream into frames; resynchronises on the next 0x00 after anything invalid."""

    __slots__ = ("_buf", "_discarding", "drops", "frames")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._discarding = False
        self.frames = 0
        self.drops: Counter[DropReason] = Counter()

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by ``data``, in order."""
        out: list[Frame] = []
        parts = data.split(b"\x00")
        # Every part but the last ended with a delimiter; the last one is still open.
        for i, part in enumerate(parts):
            closed = i < len(parts) - 1
            if self._discarding:
                if closed:
                    self._discarding = False
                continue
            if len(self._buf) + len(part) > MAX_COBS:
                self._buf.clear()
                self.drops[DropReason.OVERSIZE] += 1
                self._discarding = not closed
                continue
            self._buf += part
            if not closed:
                continue
            if not self._buf:
                continue  # empty frames are flush markers
            got = decode_frame(bytes(self._buf))
            self._buf.clear()
            if isinstance(got, Frame):
                self.frames += 1
                out.append(got)
            else:
                self.drops[got] += 1
        return out
