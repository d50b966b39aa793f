"""Record encoding for the outbox and the wire: SenML-CBOR packs (RFC 8428 over RFC 8949).

Records are plain maps built by ``gateway.anonymize``; this module only turns them into bytes and
back (``gateway.senml`` holds the layout).  The anonymizer scans exactly these bytes for
identities, so what is stored is what leaves; the uplink only prepends a sequence record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.senml import CONTENT_TYPE, decode_record, encode_record

__all__ = ["CONTENT_TYPE", "decode", "encode"]


def encode(payload: Mapping[str, Any]) -> bytes:
    """Encode a record map to a SenML-CBOR pack."""
    return encode_record(payload)


def decode(data: bytes) -> dict[str, Any]:
    """Decode a pack (or a plain CBOR map stored by an earlier version) to a record map.

    Raises CorruptDataError when the bytes are neither.
    """
    return decode_record(data)
