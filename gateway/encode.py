"""Record encoding for the outbox: CBOR (RFC 8949), compact and schema-versioned.

Records are plain maps built by ``gateway.anonymize``; this module only turns them into bytes and
back.  Floats are written in the shortest form that keeps their value (cbor2 canonical rules).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cbor2

from gateway.errors import CorruptDataError

CONTENT_TYPE = "application/cbor"


def encode(payload: Mapping[str, Any]) -> bytes:
    """Encode a record map to CBOR bytes."""
    return bytes(cbor2.dumps(dict(payload), canonical=True))


def decode(data: bytes) -> dict[str, Any]:
    """Decode CBOR bytes to a record map; CorruptDataError if they are not one."""
    try:
        value = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, EOFError) as exc:
        raise CorruptDataError(f"decoder: record of {len(data)} bytes is not valid CBOR: {exc}") from exc
    if not isinstance(value, dict):
        raise CorruptDataError(f"decoder: record is a CBOR {type(value).__name__}, expected a map")
    return value
