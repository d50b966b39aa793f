"""The identity scan of Sparkplug B payloads: an identity counts inside one field, never across a tag.

A Sparkplug payload is protobuf: field tags, lengths and varints lie between the names, texts and
numbers a reader gets.  Scanned as whole bytes, a form could span them: every NBIRTH of a node
with no node metrics ends with ``Node Control/Rebirth = false`` and the payload's ``seq`` 0, the
bytes 20 0B 70 00 18 00 (datatype Boolean, the boolean value tag 0x70 and its value, the seq tag
and its value) - the 6 bytes of a device with MAC 20:0B:70:00:18:00, which stopped the node from
ever being born.  ``codec.field_spans`` says where each field's own bytes lie, at any depth, and
``Anonymizer.check_within`` confirms a hit inside one.  The node itself, with mosquitto and Tahu,
is in test_sparkplug.py.
"""

from __future__ import annotations

import base64
import itertools
import random
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.errors import AnonymizationError
from gateway.uplink.sparkplug import codec
from gateway.uplink.sparkplug.codec import Point

SPANNING_MAC = "20:0B:70:00:18:00"  # the tail of every NBIRTH without node metrics
# The bdSeq metric's datatype (Int64), value (0) and the next metric's tag and length: at its start.
SPANNING_TOO = "20:04:58:00:12:21"
DEVICE = "SN-PLC-20931"
TS = 1_764_870_000_000


def _anon(*identities: str) -> Anonymizer:
    anon = Anonymizer(Pseudonymizer(b"k" * 32), time_mode="relative", start_wall=1000.0)
    for identity in identities:
        anon.register(identity)
    return anon


def _birth(*points: Point) -> bytes:
    payload = codec.nbirth_head(0, TS)
    for alias, point in enumerate(points, start=2):
        codec.add_metric(payload, point, alias=alias, ts_ms=TS, birth=True)
    data: bytes = payload.SerializeToString()
    return data


def _leaves(message: Any) -> list[bytes | None]:
    """The fields protobuf's own parser read, in wire order: text and bytes as encoded, a number as None."""
    out: list[bytes | None] = []
    for field, value in message.ListFields():
        for item in value if field.is_repeated else [value]:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                out += _leaves(item)
            elif field.type == FieldDescriptor.TYPE_STRING:
                out.append(item.encode())
            elif field.type == FieldDescriptor.TYPE_BYTES:
                out.append(item)
            else:
                out.append(None)
    return out


def test_field_spans_are_the_fields_protobuf_reads() -> None:
    data = _birth(
        Point("Pump/Pressure/mean", codec.DOUBLE, 4.2, "bar", codec.GOOD, 0.0, 10.0),
        Point("Estimates/flow/state", codec.STRING, "measured"),
        Point("Alarms/limit/Pump/Pressure/Active", codec.BOOLEAN, True),
        Point("Pump/Pressure/max", codec.DOUBLE, None, "bar", codec.BAD, status="bad_sensorfailure"),
    )
    spans = codec.field_spans(data)
    expected = _leaves(codec.decode(data))
    assert len(spans) == len(expected)
    for (start, end), leaf in zip(spans, expected, strict=True):
        assert end > start
        if leaf is not None:
            assert data[start:end] == leaf
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # sorted, apart


def test_an_nbirth_spelling_a_mac_across_its_last_fields_passes() -> None:
    anon = _anon(SPANNING_MAC)
    data = _birth()
    assert bytes.fromhex("200b70001800") in data  # what the whole-bytes scan matched
    with pytest.raises(AnonymizationError):
        anon.check(data)
    anon.check_within(data, codec.field_spans)


@pytest.mark.parametrize(
    "place",
    ["name", "string value", "property key", "property text", "uuid", "body", "dataset column", "template"],
)
def test_an_identity_inside_any_field_is_refused(place: str) -> None:
    anon = _anon(DEVICE, SPANNING_MAC)
    payload = codec.new_payload(TS, 1)
    m = payload.metrics.add()
    m.name, m.datatype, m.double_value = "Pump/Pressure/mean", codec.DOUBLE, 4.2
    if place == "name":
        m.name = "Line2/sn-plc-20931/Pressure"  # another letter case, inside a longer name
    elif place == "string value":
        m.string_value = '{"serial": "SNPLC20931"}'  # compacted, inside a JSON text
    elif place == "property key":
        m.properties.keys.append("SN-PLC-20931")
    elif place == "property text":
        m.properties.keys.append("engUnit")
        m.properties.values.add(type=codec.STRING, string_value="sn-plc-20931")
    elif place == "uuid":
        payload.uuid = base64.b64encode(b"SN-PLC-20931").decode()  # base64 of the serial
    elif place == "body":
        payload.body = b"\x00" + bytes.fromhex("200b70001800") + b"\x00"  # the MAC's own bytes
    elif place == "dataset column":
        m.dataset_value.columns.append("SN-PLC-20931")
    else:
        m.template_value.parameters.add(name="serial", string_value="SN-PLC-20931")
    data = payload.SerializeToString()
    with pytest.raises(AnonymizationError, match="appears in an outgoing record"):
        anon.check_within(data, codec.field_spans)


def test_the_field_scan_refuses_exactly_what_scanning_each_field_alone_refuses() -> None:
    rng = random.Random(7)
    anon = _anon(DEVICE, SPANNING_MAC, "ward7-hub")
    pieces = ["SN-PLC", "-20931", "sn", "plc20931", "ward7", "-hub", "Ward7Hub", "Pump/", "mean", "\x0b", "p"]
    refused = 0
    for _ in range(3000):
        points = []
        for k in range(rng.randrange(1, 5)):
            name = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 4))) + f"/{k}"
            candidates: list[tuple[int, codec.Value]] = [
                (codec.DOUBLE, rng.choice((4.2, 0.0, 1.0e-300))),
                (codec.BOOLEAN, rng.random() < 0.5),
                (codec.STRING, "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 3)))),
                (codec.INT32, rng.randrange(0, 300)),
            ]
            kind, value = rng.choice(candidates)
            points.append(Point(name, kind, value, rng.choice((None, "bar", "%"))))
        data = _birth(*points)
        alone = 0
        for start, end in codec.field_spans(data):
            try:
                anon.check(data[start:end])
            except AnonymizationError:
                alone += 1
        try:
            anon.check_within(data, codec.field_spans)
        except AnonymizationError:
            assert alone, data
            refused += 1
        else:
            assert not alone, data
    assert 300 < refused < 2700  # both sides of the comparison were exercised


@pytest.mark.parametrize(
    "data",
    [
        _birth()[:-1],  # cut inside the last varint
        _birth()[:40],  # cut inside a name
        _birth() + b"\x1b\x00",  # a group (wire type 3): the schema has none
    ],
)
def test_a_payload_the_scan_cannot_read_field_by_field_is_refused(data: bytes) -> None:
    # A form across two fields is what makes the scan read the fields: it cannot, and refuses.
    anon = _anon(SPANNING_TOO)
    with pytest.raises(AnonymizationError, match="Sparkplug payload"):
        anon.check_within(data, codec.field_spans)


def test_names_are_scanned_one_by_one() -> None:
    # The node scans a record's names and units before it learns them; joined with spaces, the
    # last name and the first unit read "max bar": a source of that name.
    anon = _anon("Max Bar")
    texts = ["k3j2x7q9m4t8vbaa", "Pump/Pressure/mean", "Pump/Pressure/max", "bar", "bar"]
    with pytest.raises(AnonymizationError):
        anon.check(" ".join(texts).encode())
    anon.check_texts(texts)
    with pytest.raises(AnonymizationError):
        anon.check_texts([*texts, "Line2/MAX BAR/flow"])
