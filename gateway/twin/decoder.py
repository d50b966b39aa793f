"""Topic and payload decoding for messages published by gateways (``docs/records.md``).

Pure: a topic, a payload and the MQTT 5 user properties in, a :class:`TwinMessage` out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.records import CorruptRecordError, Record, StatusRecord, decode_batch, decode_status
from gateway.records.topics import DEFAULT_PREFIX, split_topic

#: The outbox lanes; a record topic's first part names its lane, or maps to it in LANE_OF.
LANES = ("alarms", "features", "diag")
#: The outbox lane each record topic's first part travels in (estimates share the features lane).
LANE_OF: Mapping[str, str] = {**{lane: lane for lane in LANES}, "estimates": "features"}


@dataclass(frozen=True, slots=True)
class TwinMessage:
    """One decoded message."""

    gateway: str  # the gateway's pseudonym
    topic: str  # relative topic, e.g. "features/<subject pseudonym>" or "status"
    kind: str  # "features", "estimates", "alarms", "diag" or "status"
    record: Record | StatusRecord
    seq: int | None = None
    epoch: int | None = None
    historical: bool = False
    batch_s: float | None = None  # the gateway may hold a window back this long (schema 4)

    @property
    def lane(self) -> str | None:
        """The outbox lane the record travelled in (None for the status topic)."""
        return LANE_OF.get(self.kind)


def decode_messages(
    topic: str,
    payload: bytes,
    properties: Mapping[str, str] | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> list[TwinMessage]:
    """Decode one MQTT message to its records (several of one subject with schema 4).

    Empty when the topic is not a gateway's records or status (the downlink's ``reported``,
    ``desired``, ``model``, ``chunk/...`` share the prefix); RecordError when the payload is bad.
    """
    parts = split_topic(topic, prefix)
    if parts is None:
        return []
    gateway, relative, props = parts
    props = {**props, **(properties or {})}
    kind = relative.split("/", 1)[0]
    if kind not in LANE_OF and kind != "status":
        return []
    if kind == "status":
        return [TwinMessage(gateway, relative, kind, decode_status(payload))]
    out = []
    for meta, record in decode_batch(payload):
        if meta is not None:
            msg = TwinMessage(
                gateway, relative, kind, record, meta.seq, meta.epoch, meta.historical, meta.batch_s
            )
        else:
            seq, epoch = _int(props.get("seq")), _int(props.get("ep"))
            msg = TwinMessage(gateway, relative, kind, record, seq, epoch, props.get("hist") == "1")
        out.append(msg)
    return out


def decode_message(
    topic: str,
    payload: bytes,
    properties: Mapping[str, str] | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> TwinMessage | None:
    """Decode a message of one record; None when the topic is not a gateway's; RecordError when bad."""
    messages = decode_messages(topic, payload, properties, prefix)
    if len(messages) > 1:
        raise CorruptRecordError(
            f"twin decoder {topic}: {len(messages)} records in one message: expected one: "
            "read it with decode_messages"
        )
    return messages[0] if messages else None


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


__all__ = [
    "DEFAULT_PREFIX",
    "LANES",
    "LANE_OF",
    "TwinMessage",
    "decode_message",
    "decode_messages",
    "split_topic",
]
