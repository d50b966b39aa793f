"""Topic and payload decoding for messages published by gateways (``docs/records.md``).

Pure: a topic, a payload and the MQTT 5 user properties in, a :class:`TwinMessage` out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.contracts import Lane
from gateway.errors import CorruptDataError
from gateway.senml import decode_pack
from gateway.uplink.profiles import parse_azure_topic

DEFAULT_PREFIX = "edgetwin/v1"
LANE_BY_KIND: Mapping[str, Lane] = {
    "alarms": Lane.ALARMS,
    "features": Lane.FEATURES,
    "estimates": Lane.FEATURES,
    "diag": Lane.DIAGNOSTICS,
}


@dataclass(frozen=True, slots=True)
class TwinMessage:
    """One decoded message."""

    gateway: str  # the gateway's pseudonym
    topic: str  # relative topic, e.g. "features/<subject pseudonym>" or "status"
    kind: str  # "features", "estimates", "alarms", "diag" or "status"
    record: Mapping[str, Any]  # the record map (for "status", the status document)
    seq: int | None = None
    epoch: int | None = None
    historical: bool = False

    @property
    def lane(self) -> Lane | None:
        """The outbox lane the record travelled in (None for the status topic)."""
        return LANE_BY_KIND.get(self.kind)


def split_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str, dict[str, str]] | None:
    """(gateway, relative topic, properties from the topic) or None if it is not a gateway topic."""
    azure = parse_azure_topic(topic)
    if azure is not None:
        device, props = azure
        relative = props.pop("topic", "")
        return (device, relative, props) if relative else None
    head = prefix.rstrip("/") + "/"
    if not topic.startswith(head):
        return None
    gateway, _, relative = topic[len(head) :].partition("/")
    if not gateway or not relative:
        return None
    return gateway, relative, {}


def decode_message(
    topic: str,
    payload: bytes,
    properties: Mapping[str, str] | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> TwinMessage | None:
    """Decode one message; None when the topic is not a gateway's; CorruptDataError when the payload is bad."""
    parts = split_topic(topic, prefix)
    if parts is None:
        return None
    gateway, relative, props = parts
    props = {**props, **(properties or {})}
    kind = relative.split("/", 1)[0]
    if kind == "status":
        try:
            status = json.loads(payload) if payload else {"state": "cleared"}
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptDataError(f"twin decoder {topic}: status is not JSON: {exc}: ignored") from exc
        if not isinstance(status, dict):
            raise CorruptDataError(f"twin decoder {topic}: status is a {type(status).__name__}: ignored")
        return TwinMessage(gateway, relative, kind, status)
    meta, record = decode_pack(payload)
    seq: int | None
    epoch: int | None
    if meta is not None:
        seq, epoch, historical = meta.seq, meta.epoch, meta.historical
    else:
        seq = _int(props.get("seq"))
        epoch = _int(props.get("ep"))
        historical = props.get("hist") == "1"
    return TwinMessage(gateway, relative, kind, record, seq, epoch, historical)


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None
