"""The record contract between a gateway and every consumer of what it publishes.

Typed, frozen record classes, their SenML-CBOR codec, the schema version, the sequence / epoch /
run metadata, topics, units and the one renderer every view uses.  This package imports nothing
else of the gateway (and neither pydantic nor numpy), so a twin or any other consumer can use it
alone; ``docs/records.md`` is its reference.
"""

from gateway.records.batch import Joiner, join
from gateway.records.codec import (
    CONTENT_TYPE,
    as_map,
    decode,
    decode_batch,
    decode_pack,
    decode_status,
    encode,
    encode_status,
    on_wire,
    resolved,
    status_map,
    stream_map,
    wire_number,
    wrap,
)
from gateway.records.conditions import ORIGIN_WORDS, condition_key, origin_words
from gateway.records.errors import CorruptRecordError, RecordError, UnsupportedVersionError
from gateway.records.model import (
    SCHEMA_MAJOR,
    SCHEMA_MINOR,
    AlarmRecord,
    Clock,
    DiagnosticRecord,
    EstimateRecord,
    EstimateSource,
    FeaturesWindow,
    Record,
    SeqMeta,
    Shape,
    StatusLoss,
    StatusRecord,
    StreamWindow,
    fault_origin,
    order_key,
)

__all__ = [
    "CONTENT_TYPE",
    "ORIGIN_WORDS",
    "SCHEMA_MAJOR",
    "SCHEMA_MINOR",
    "AlarmRecord",
    "Clock",
    "CorruptRecordError",
    "DiagnosticRecord",
    "EstimateRecord",
    "EstimateSource",
    "FeaturesWindow",
    "Joiner",
    "Record",
    "RecordError",
    "SeqMeta",
    "Shape",
    "StatusLoss",
    "StatusRecord",
    "StreamWindow",
    "UnsupportedVersionError",
    "as_map",
    "condition_key",
    "decode",
    "decode_batch",
    "decode_pack",
    "decode_status",
    "encode",
    "encode_status",
    "fault_origin",
    "join",
    "on_wire",
    "order_key",
    "origin_words",
    "resolved",
    "status_map",
    "stream_map",
    "wire_number",
    "wrap",
]
