"""MQTT packets as bytes: the properties this uplink packs by hand, and a PUBLISH's exact size.

Pure functions, no I/O.  paho's ``Properties`` object costs more per message than the rest of the
publish path, so the MQTT 5 properties of a record are encoded here once per session (the head)
plus the per-record sequence number.  :func:`publish_size` is the size of the PUBLISH packet paho
writes for a topic, properties and payload - the number a broker's Maximum Packet Size (MQTT 5,
sent in CONNACK) is compared with, fixed header included (MQTT 5.0, sections 2.1, 3.3).
"""

from __future__ import annotations

import dataclasses

from gateway.records import CONTENT_TYPE as SENML_CBOR
from gateway.records import AlarmRecord, DiagnosticRecord, RecordError, decode, encode

CONTENT_TYPE = 0x03
MESSAGE_EXPIRY = 0x02
USER_PROPERTY = 0x26


def utf8(text: str) -> bytes:
    """An MQTT UTF-8 string: two-byte length, then the bytes."""
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def user(key: str, value: str) -> bytes:
    """One user property (identifier 0x26, key and value strings)."""
    return bytes([USER_PROPERTY]) + utf8(key) + utf8(value)


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (1-4 bytes)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


HISTORICAL = user("hist", "1")


def record_head(schema_version: str, epoch: int, expiry_s: int | None) -> bytes:
    """The properties every record of a session shares: content type, schema, epoch, expiry."""
    head = bytes([CONTENT_TYPE]) + utf8(SENML_CBOR) + user("sv", schema_version) + user("ep", str(epoch))
    if expiry_s is not None:
        head += bytes([MESSAGE_EXPIRY]) + expiry_s.to_bytes(4, "big")
    return head


class Packed:
    """MQTT 5 properties already encoded; stands in for paho's Properties (it only calls pack())."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def pack(self) -> bytes:
        """The encoded properties, length prefix included."""
        return self._data

    def __len__(self) -> int:
        return len(self._data)

    def __str__(self) -> str:
        return f"<{len(self._data)} bytes of properties>"


_SEQ_KEY = bytes([USER_PROPERTY]) + utf8("seq")


def record_properties(head: bytes, seq: int, historical: bool) -> Packed:
    """A record's properties: the session's head, its sequence number, the historical mark."""
    digits = str(seq).encode()
    body = b"".join(
        (head, _SEQ_KEY, len(digits).to_bytes(2, "big"), digits, HISTORICAL if historical else b"")
    )
    size = len(body)
    return Packed((bytes((size,)) if size < 128 else varint(size)) + body)


def publish_size(
    topic: str, payload_len: int, properties: Packed | None, *, qos: int = 1, v5: bool = True
) -> int:
    """Bytes of the PUBLISH packet for these parts, fixed header included.

    ``properties`` None with ``v5`` is an empty property list (one byte), as paho sends it.
    """
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + payload_len
    if v5:
        remaining += len(properties) if properties is not None else 1
    return 1 + len(varint(remaining)) + remaining


def trimmed(pack: bytes, over_by: int) -> bytes | None:
    """An alarm or diagnostic pack without its optional detail, with a note saying so; None if not one.

    The alarm's kind, subject, time, device and metric stay: what the twin needs to act on it.
    """
    try:
        record = decode(pack)
    except RecordError:
        return None  # cannot be trimmed; the caller moves it to the dead-letter lane
    if not isinstance(record, AlarmRecord | DiagnosticRecord):
        return None
    contrib = record.contrib if isinstance(record, AlarmRecord) else {}
    if not record.detail and not contrib:
        return None
    note = {"trimmed": f"detail removed: the record was {over_by} bytes over the broker's limit"}
    if isinstance(record, AlarmRecord):
        return encode(dataclasses.replace(record, detail=note, contrib={}))
    return encode(dataclasses.replace(record, detail=note))
