"""The protocol's test vectors, built from field values with the Python codec.

``firmware/vectors.txt`` holds the expected wire bytes (``name hex`` per line); PROTOCOL.md shows
the same file, and the C unit tests build every vector from the same field values with the C
codec and compare byte for byte.  Run ``python -m firmware_bridge.vectors`` to print the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from firmware_bridge.framing import encode_frame
from firmware_bridge.messages import (
    Ack,
    BeginReply,
    BootState,
    Cap,
    Channel,
    ErrorReport,
    Health,
    Hello,
    Manifest,
    MsgType,
    Nack,
    Samples,
    TimeSyncReply,
    begin_body,
    channel_req_body,
    chunk_body,
    reboot_body,
    time_sync_body,
    u32_body,
)

VECTORS_FILE = Path(__file__).parent / "firmware" / "vectors.txt"

#: RFC 8032 section 7.1 TEST 1 key pair: the fw_begin vector is signed with it.
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")

VECTOR_MANIFEST = Manifest(
    "edgetwin-sim-adc3", 0x01030000, 40000, hashlib.sha256(b"edgetwin test image").digest()
)
#: Ed25519 signature of ``VECTOR_MANIFEST.encode()`` by the RFC 8032 TEST 1 key (deterministic).
VECTOR_SIGNATURE = bytes.fromhex(
    "69a88dfcd08dd458ac6448c2340d70ae779d26adfe2411e1f8dd05d251b8e545"
    "1bce0868a13d6305511dad2713151e89d46e46a07510c3094289e60b29875b01"
)


def build_vectors() -> dict[str, bytes]:
    """Every named vector's wire bytes (COBS-encoded frame and its delimiter)."""
    hello = Hello(
        Cap(0x0F),
        1_000_000,
        0x01020003,
        1,
        BootState.TRIAL,
        Health.OK,
        3,
        240,
        "SIM-0001",
        "edgetwin-sim-adc3",
    )
    vib = Channel(2, 0, 250_000, 0.0005, 0.0, "vibration", "g")
    return {
        "hello": encode_frame(MsgType.HELLO, 0, hello.encode()),
        "hello_req": encode_frame(MsgType.HELLO_REQ, 0x1234),
        "channel_req": encode_frame(MsgType.CHANNEL_REQ, 0x1235, channel_req_body(2)),
        "ack_channel": encode_frame(MsgType.ACK, 7, Ack(0x1235, vib.encode()).encode()),
        "samples": encode_frame(
            MsgType.SAMPLES, 8, Samples(0, 1000, 0xFFFFFF00, (0, 1, -1, -32768)).encode()
        ),
        "time_sync": encode_frame(MsgType.TIME_SYNC, 0x1236, time_sync_body(0x1234567890)),
        "ack_time_sync": encode_frame(
            MsgType.ACK, 9, Ack(0x1236, TimeSyncReply(0x1234567890, 0x89ABCDEF).encode()).encode()
        ),
        "fw_begin": encode_frame(MsgType.FW_BEGIN, 0x1237, begin_body(VECTOR_MANIFEST, VECTOR_SIGNATURE)),
        "ack_fw_begin": encode_frame(MsgType.ACK, 10, Ack(0x1237, BeginReply(1792, 224).encode()).encode()),
        "fw_chunk": encode_frame(MsgType.FW_CHUNK, 0x1238, chunk_body(1792, bytes(range(16)))),
        "ack_fw_chunk": encode_frame(MsgType.ACK, 11, Ack(0x1238, u32_body(1808)).encode()),
        "nack": encode_frame(MsgType.NACK, 12, Nack(0x1239, 4, 1808).encode()),
        "error": encode_frame(MsgType.ERROR, 13, ErrorReport(1, 3, "self-test failed").encode()),
        "fw_verify": encode_frame(MsgType.FW_VERIFY, 0x123A),
        "fw_commit": encode_frame(MsgType.FW_COMMIT, 0x123B),
        "ack_fw_commit": encode_frame(MsgType.ACK, 14, Ack(0x123B, u32_body(0x01030000)).encode()),
        "fw_abort": encode_frame(MsgType.FW_ABORT, 0x123C),
        "reboot": encode_frame(MsgType.REBOOT, 0x123D, reboot_body(0)),
    }


def vectors_text() -> str:
    """The contents of ``firmware/vectors.txt``."""
    lines = ["# name wire-bytes-hex (COBS(frame) + 00); field values in PROTOCOL.md, section Test vectors"]
    lines += [f"{name} {wire.hex()}" for name, wire in build_vectors().items()]
    return "\n".join(lines) + "\n"


def read_vectors(path: Path = VECTORS_FILE) -> dict[str, bytes]:
    """Parse a vectors file."""
    out: dict[str, bytes] = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line.strip() and not line.startswith("#"):
            name, hexs = line.split()
            out[name] = bytes.fromhex(hexs)
    return out


if __name__ == "__main__":
    import sys

    sys.stdout.write(vectors_text())
