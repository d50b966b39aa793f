"""Message bodies of the firmware bridge protocol: typed values to bytes and back.

Every request from the gateway is answered by ``ACK`` (its body starts with the request's
sequence number, then a body that depends on the request) or ``NACK`` (sequence number, code,
detail).  The node sends ``HELLO`` when it boots, ``SAMPLES`` continuously and ``ERROR`` when
something goes wrong.  All integers are little-endian; strings are a length byte and UTF-8.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from firmware_bridge.framing import MAX_PAYLOAD

MAX_STR = 32
MAX_UNIT = 16
MAX_TEXT = 64
MAX_SAMPLES = 115
MAX_CHUNK = 224
SIG_LEN = 64
SHA_LEN = 32
SAMPLE_INVALID = -32768  # raw value a node sends for "no valid sample"


class MsgType(enum.IntEnum):
    """The frame's type byte."""

    HELLO = 0x01
    HELLO_REQ = 0x02
    CHANNEL_REQ = 0x03
    SAMPLES = 0x10
    ACK = 0x20
    NACK = 0x21
    ERROR = 0x22
    TIME_SYNC = 0x30
    FW_BEGIN = 0x40
    FW_CHUNK = 0x41
    FW_VERIFY = 0x42
    FW_COMMIT = 0x43
    FW_ABORT = 0x44
    REBOOT = 0x50


class Cap(enum.IntFlag):
    """Capabilities a node announces in its hello."""

    SAMPLES = 1
    TIME_SYNC = 2
    FW_UPDATE = 4
    ED25519 = 8  # the node verifies manifest signatures itself


class BootState(enum.IntEnum):
    """Which image the node runs and how it got there."""

    CONFIRMED = 0
    TRIAL = 1  # a new image on probation: it must be committed or the node rolls back
    ROLLED_BACK = 2  # the last trial image was not committed; the previous image runs again


class Health(enum.IntEnum):
    """The node's self-test result."""

    UNKNOWN = 0
    OK = 1
    FAILED = 2


class NackCode(enum.IntEnum):
    """Why the node refused a request; ``detail`` says more for some codes."""

    BAD_REQUEST = 1
    UNKNOWN_TYPE = 2  # detail: the type
    BAD_STATE = 3  # detail: transfer progress where relevant
    BAD_OFFSET = 4  # detail: the offset the node expects next
    TOO_LARGE = 5  # detail: the limit
    WRONG_TARGET = 6
    DOWNGRADE = 7  # detail: the lowest version the node accepts
    BAD_SIGNATURE = 8
    HASH_MISMATCH = 9
    FLASH = 10
    BAD_CHANNEL = 11  # detail: the number of channels
    NOT_HEALTHY = 12


class ErrorCode(enum.IntEnum):
    """What an unsolicited ERROR reports."""

    SELFTEST = 1
    OVERRUN = 2
    TX_FULL = 3


class MessageError(ValueError):
    """A body does not match its type's layout."""


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise MessageError(f"body too short: wanted {n} bytes at {self.pos}, {len(self.data)} in all")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct) -> tuple[int | float, ...]:
        return fmt.unpack(self.take(fmt.size))

    def read_int(self, fmt: struct.Struct) -> int:
        (v,) = self.unpack(fmt)
        assert isinstance(v, int)
        return v

    def read_str(self, max_len: int) -> str:
        n = self.take(1)[0]
        if n > max_len:
            raise MessageError(f"string of {n} bytes exceeds {max_len}")
        raw = self.take(n)
        if 0 in raw:
            raise MessageError("NUL byte in a string")
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise MessageError(f"string is not UTF-8: {exc}") from exc

    def end(self) -> None:
        if self.pos != len(self.data):
            raise MessageError(f"{len(self.data) - self.pos} unexpected trailing bytes")


def _str(s: str, max_len: int) -> bytes:
    raw = s.encode()
    if len(raw) > max_len or "\x00" in s:
        raise MessageError(f"string {s!r} longer than {max_len} bytes or holds NUL")
    return bytes([len(raw)]) + raw


_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HELLO = struct.Struct("<HIIBBBBH")
_CHANNEL = struct.Struct("<BBIff")
_SAMPLES_HEAD = struct.Struct("<BBII")
_NACK = struct.Struct("<HBI")
_ERROR = struct.Struct("<BI")
_TS_ACK = struct.Struct("<QI")
_BEGIN_ACK = struct.Struct("<IH")
_MANIFEST_TAIL = struct.Struct("<II")
MANIFEST_MAGIC = b"ETFM"


@dataclass(frozen=True, slots=True)
class Hello:
    """Who the node is and what it runs (HELLO, and the ACK body of HELLO_REQ)."""

    caps: Cap
    tick_hz: int
    fw_version: int
    active_slot: int
    boot_state: BootState
    health: Health
    n_channels: int
    max_payload: int
    node_id: str
    target: str

    def encode(self) -> bytes:
        """Body bytes."""
        return (
            _HELLO.pack(
                int(self.caps),
                self.tick_hz,
                self.fw_version,
                self.active_slot,
                int(self.boot_state),
                int(self.health),
                self.n_channels,
                self.max_payload,
            )
            + _str(self.node_id, MAX_STR)
            + _str(self.target, MAX_STR)
        )

    @classmethod
    def decode(cls, body: bytes) -> Hello:
        """Parse a body; raise MessageError when it does not fit."""
        r = _Reader(body)
        caps, tick_hz, fw_version, slot, state, health, n_ch, max_payload = r.unpack(_HELLO)
        node_id = r.read_str(MAX_STR)
        target = r.read_str(MAX_STR)
        r.end()
        try:
            return cls(
                Cap(int(caps)),
                int(tick_hz),
                int(fw_version),
                int(slot),
                BootState(int(state)),
                Health(int(health)),
                int(n_ch),
                int(max_payload),
                node_id,
                target,
            )
        except ValueError as exc:
            raise MessageError(f"hello field out of range: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Channel:
    """One ADC channel: value = raw * scale + offset, at ``rate_mhz`` millihertz."""

    channel: int
    format: int  # 0: int16 raw
    rate_mhz: int
    scale: float
    offset: float
    name: str
    unit: str

    @property
    def rate_hz(self) -> float:
        """Sample rate in hertz."""
        return self.rate_mhz / 1000.0

    def encode(self) -> bytes:
        """Body bytes."""
        return (
            _CHANNEL.pack(self.channel, self.format, self.rate_mhz, self.scale, self.offset)
            + _str(self.name, MAX_STR)
            + _str(self.unit, MAX_UNIT)
        )

    @classmethod
    def decode(cls, body: bytes) -> Channel:
        """Parse a body; raise MessageError when it does not fit."""
        r = _Reader(body)
        ch, fmt, rate, scale, offset = r.unpack(_CHANNEL)
        name = r.read_str(MAX_STR)
        unit = r.read_str(MAX_UNIT)
        r.end()
        return cls(int(ch), int(fmt), int(rate), float(scale), float(offset), name, unit)


@dataclass(frozen=True, slots=True)
class Samples:
    """A batch of consecutive raw samples of one channel."""

    channel: int
    first_index: int  # the node's sample counter of this channel (u32, wraps)
    first_tick: int  # the node's tick counter at the first sample (u32, wraps)
    raw: tuple[int, ...]

    def encode(self) -> bytes:
        """Body bytes."""
        n = len(self.raw)
        if not 1 <= n <= MAX_SAMPLES:
            raise MessageError(f"a batch holds 1 to {MAX_SAMPLES} samples, not {n}")
        try:
            return _SAMPLES_HEAD.pack(self.channel, n, self.first_index, self.first_tick) + struct.pack(
                f"<{n}h", *self.raw
            )
        except struct.error as exc:
            raise MessageError(f"samples: a field is out of range: {exc}") from exc

    @classmethod
    def decode(cls, body: bytes) -> Samples:
        """Parse a body; raise MessageError when it does not fit."""
        ch, n, first_index, first_tick = _Reader(body).unpack(_SAMPLES_HEAD)
        n = int(n)
        if not 1 <= n <= MAX_SAMPLES or len(body) != _SAMPLES_HEAD.size + 2 * n:
            raise MessageError(f"samples: count {n} does not match a body of {len(body)} bytes")
        raw = struct.unpack_from(f"<{n}h", body, _SAMPLES_HEAD.size)
        return cls(int(ch), int(first_index), int(first_tick), raw)


@dataclass(frozen=True, slots=True)
class Nack:
    """A refused request."""

    ack_seq: int
    code: int  # a NackCode, kept as int so unknown future codes still decode
    detail: int

    def encode(self) -> bytes:
        """Body bytes."""
        return _NACK.pack(self.ack_seq, self.code, self.detail)

    @classmethod
    def decode(cls, body: bytes) -> Nack:
        """Parse a body; raise MessageError when it does not fit."""
        r = _Reader(body)
        seq, code, detail = r.unpack(_NACK)
        r.end()
        return cls(int(seq), int(code), int(detail))


@dataclass(frozen=True, slots=True)
class Ack:
    """An accepted request: its sequence number and a request-specific body."""

    ack_seq: int
    body: bytes

    def encode(self) -> bytes:
        """Body bytes."""
        return _U16.pack(self.ack_seq) + self.body

    @classmethod
    def decode(cls, body: bytes) -> Ack:
        """Parse a body; raise MessageError when it does not fit."""
        r = _Reader(body)
        seq = r.read_int(_U16)
        return cls(seq, body[2:])


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """Something the node wants the gateway to know (self-test failed, ADC overrun)."""

    code: int
    detail: int
    text: str

    def encode(self) -> bytes:
        """Body bytes."""
        return _ERROR.pack(self.code, self.detail) + _str(self.text, MAX_TEXT)

    @classmethod
    def decode(cls, body: bytes) -> ErrorReport:
        """Parse a body; raise MessageError when it does not fit."""
        r = _Reader(body)
        code, detail = r.unpack(_ERROR)
        text = r.read_str(MAX_TEXT)
        r.end()
        return cls(int(code), int(detail), text)


@dataclass(frozen=True, slots=True)
class TimeSyncReply:
    """ACK body of TIME_SYNC: the gateway's time echoed and the node's tick when it answered."""

    gateway_us: int
    node_tick: int

    def encode(self) -> bytes:
        """Body bytes."""
        return _TS_ACK.pack(self.gateway_us, self.node_tick)

    @classmethod
    def decode(cls, body: bytes) -> TimeSyncReply:
        """Parse a body; raise MessageError when it does not fit."""
        r = _Reader(body)
        gw, tick = r.unpack(_TS_ACK)
        r.end()
        return cls(int(gw), int(tick))


@dataclass(frozen=True, slots=True)
class BeginReply:
    """ACK body of FW_BEGIN: where to (re)start and the largest chunk the node takes."""

    resume_offset: int
    chunk_max: int

    def encode(self) -> bytes:
        """Body bytes."""
        return _BEGIN_ACK.pack(self.resume_offset, self.chunk_max)

    @classmethod
    def decode(cls, body: bytes) -> BeginReply:
        """Parse a body; raise MessageError when it does not fit."""
        r = _Reader(body)
        off, cmax = r.unpack(_BEGIN_ACK)
        r.end()
        return cls(int(off), int(cmax))


def u32_body(value: int) -> bytes:
    """A body holding one u32 (FW_CHUNK and FW_COMMIT replies)."""
    return _U32.pack(value)


def decode_u32(body: bytes) -> int:
    """The u32 of a FW_CHUNK or FW_COMMIT reply."""
    r = _Reader(body)
    v = r.read_int(_U32)
    r.end()
    return v


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a firmware image is: the board it targets, its version, size and SHA-256."""

    target: str
    version: int
    size: int
    sha256: bytes

    def encode(self) -> bytes:
        """The canonical bytes that are signed and sent in FW_BEGIN."""
        if len(self.sha256) != SHA_LEN:
            raise MessageError("manifest sha256 must be 32 bytes")
        return (
            MANIFEST_MAGIC
            + b"\x01"
            + _str(self.target, MAX_STR)
            + _MANIFEST_TAIL.pack(self.version, self.size)
            + self.sha256
        )

    @classmethod
    def decode_prefix(cls, data: bytes) -> tuple[Manifest, int]:
        """A manifest at the start of ``data`` and its length in bytes."""
        r = _Reader(data)
        if r.take(4) != MANIFEST_MAGIC or r.take(1) != b"\x01":
            raise MessageError("not a format-1 firmware manifest")
        target = r.read_str(MAX_STR)
        version, size = r.unpack(_MANIFEST_TAIL)
        sha = r.take(SHA_LEN)
        return cls(target, int(version), int(size), sha), r.pos

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Parse exactly one manifest."""
        m, used = cls.decode_prefix(data)
        if used != len(data):
            raise MessageError(f"{len(data) - used} unexpected trailing bytes after the manifest")
        return m


def begin_body(manifest: Manifest, signature: bytes) -> bytes:
    """FW_BEGIN body: the manifest's canonical bytes and its Ed25519 signature."""
    if len(signature) != SIG_LEN:
        raise MessageError(f"an Ed25519 signature is {SIG_LEN} bytes, not {len(signature)}")
    return manifest.encode() + signature


def decode_begin(body: bytes) -> tuple[Manifest, bytes]:
    """The manifest and signature of a FW_BEGIN body."""
    m, used = Manifest.decode_prefix(body)
    if len(body) - used != SIG_LEN:
        raise MessageError("FW_BEGIN: the manifest must be followed by a 64-byte signature")
    return m, body[used:]


def chunk_body(offset: int, data: bytes) -> bytes:
    """FW_CHUNK body: offset and data."""
    if not 1 <= len(data) <= MAX_CHUNK:
        raise MessageError(f"a chunk holds 1 to {MAX_CHUNK} bytes, not {len(data)}")
    return _U32.pack(offset) + data


def decode_chunk(body: bytes) -> tuple[int, bytes]:
    """Offset and data of a FW_CHUNK body."""
    r = _Reader(body)
    off = r.read_int(_U32)
    data = body[4:]
    if not 1 <= len(data) <= MAX_CHUNK:
        raise MessageError(f"a chunk holds 1 to {MAX_CHUNK} bytes, not {len(data)}")
    return off, data


def time_sync_body(gateway_us: int) -> bytes:
    """TIME_SYNC body: the gateway's monotonic clock in microseconds."""
    return _U64.pack(gateway_us)


def channel_req_body(channel: int) -> bytes:
    """CHANNEL_REQ body."""
    return _U8.pack(channel)


def reboot_body(mode: int = 0) -> bytes:
    """REBOOT body (mode 0: normal boot; a staged image starts in trial)."""
    return _U8.pack(mode)


assert _SAMPLES_HEAD.size + 2 * MAX_SAMPLES <= MAX_PAYLOAD
assert 4 + MAX_CHUNK <= MAX_PAYLOAD


def format_version(v: int) -> str:
    """``MAJOR.MINOR.PATCH`` of a packed version (8, 8 and 16 bits)."""
    return f"{v >> 24}.{(v >> 16) & 0xFF}.{v & 0xFFFF}"


def parse_version(text: str) -> int:
    """Pack ``MAJOR.MINOR.PATCH`` (each part optional after the first) into a u32."""
    parts = text.strip().split(".")
    try:
        nums = [int(p) for p in parts]
    except ValueError as exc:
        raise ValueError(f"version {text!r} is not MAJOR.MINOR.PATCH: {exc}") from exc
    if not 1 <= len(nums) <= 3 or any(n < 0 for n in nums):
        raise ValueError(f"version {text!r} is not MAJOR.MINOR.PATCH")
    nums += [0] * (3 - len(nums))
    major, minor, patch = nums
    if major > 255 or minor > 255 or patch > 65535:
        raise ValueError(f"version {text!r}: major and minor go to 255, patch to 65535")
    return (major << 24) | (minor << 16) | patch
