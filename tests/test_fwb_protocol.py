"""Firmware bridge protocol, Python side: CRC, COBS, frames, messages, vectors, decoder fuzzing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.framing import (
    MAX_COBS,
    MAX_PAYLOAD,
    CobsError,
    DropReason,
    Frame,
    FrameDecoder,
    FrameError,
    cobs_decode,
    cobs_encode,
    crc16,
    decode_frame,
    encode_frame,
)
from firmware_bridge.messages import (
    MAX_SAMPLES,
    Ack,
    BootState,
    Cap,
    Channel,
    ErrorReport,
    Health,
    Hello,
    Manifest,
    MessageError,
    MsgType,
    Nack,
    Samples,
    TimeSyncReply,
    decode_begin,
    decode_chunk,
    format_version,
    parse_version,
)
from firmware_bridge.vectors import (
    RFC8032_PUBLIC,
    VECTOR_MANIFEST,
    VECTOR_SIGNATURE,
    VECTORS_FILE,
    read_vectors,
    vectors_text,
)

PROTOCOL_MD = Path(__file__).resolve().parents[1] / "firmware_bridge" / "PROTOCOL.md"

# Published COBS examples (input, encoding without the delimiter).
COBS_EXAMPLES = [
    ("00", "0101"),
    ("0000", "010101"),
    ("001100", "01021101"),
    ("11220033", "0311220233"),
    ("11223344", "0511223344"),
    ("11000000", "0211010101"),
    (bytes(range(1, 255)).hex(), "ff" + bytes(range(1, 255)).hex()),
    ("00" + bytes(range(1, 255)).hex(), "01ff" + bytes(range(1, 255)).hex()),
    (bytes(range(1, 256)).hex(), "ff" + bytes(range(1, 255)).hex() + "02ff"),
    (bytes(range(2, 256)).hex() + "00", "ff" + bytes(range(2, 256)).hex() + "0101"),
    (bytes(range(3, 256)).hex() + "0001", "fe" + bytes(range(3, 256)).hex() + "0201"),
]


def test_crc16_ccitt_false_check_value() -> None:
    assert crc16(b"123456789") == 0x29B1
    assert crc16(b"") == 0xFFFF


@pytest.mark.parametrize(("raw", "encoded"), COBS_EXAMPLES)
def test_cobs_published_examples(raw: str, encoded: str) -> None:
    assert cobs_encode(bytes.fromhex(raw)).hex() == encoded
    assert cobs_decode(bytes.fromhex(encoded)).hex() == raw


@pytest.mark.parametrize("bad", ["031100", "051122", "00", "0211000102"])
def test_cobs_rejects_invalid_encodings(bad: str) -> None:
    with pytest.raises(CobsError):
        cobs_decode(bytes.fromhex(bad))


def test_vectors_file_is_what_the_python_codec_builds() -> None:
    assert VECTORS_FILE.read_text(encoding="ascii") == vectors_text()
    assert len(read_vectors()) == 18


def test_protocol_md_shows_the_same_vectors() -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    block = re.search(r"<!-- vectors -->\n```text\n(.*?)```", text, re.DOTALL)
    assert block is not None, "PROTOCOL.md lost its vectors block"
    assert block.group(1) == VECTORS_FILE.read_text(encoding="ascii")


def test_vectors_decode_to_their_fields_and_reencode_identically() -> None:
    vectors = read_vectors()
    decoded: dict[str, Frame] = {}
    for name, wire in vectors.items():
        dec = FrameDecoder()
        frames = dec.feed(wire)
        assert len(frames) == 1, name
        f = frames[0]
        assert encode_frame(f.type, f.seq, f.payload) == wire, name
        decoded[name] = f
    hello = Hello.decode(decoded["hello"].payload)
    assert hello == Hello(
        Cap(15), 1_000_000, 0x01020003, 1, BootState.TRIAL, Health.OK, 3, 240, "SIM-0001", "edgetwin-sim-adc3"
    )
    ack = Ack.decode(decoded["ack_channel"].payload)
    assert ack.ack_seq == 0x1235
    ch = Channel.decode(ack.body)
    assert (ch.name, ch.unit, ch.rate_hz) == ("vibration", "g", 250.0)
    assert ch.scale == pytest.approx(0.0005)
    s = Samples.decode(decoded["samples"].payload)
    assert s == Samples(0, 1000, 0xFFFFFF00, (0, 1, -1, -32768))
    ts = TimeSyncReply.decode(Ack.decode(decoded["ack_time_sync"].payload).body)
    assert ts == TimeSyncReply(0x1234567890, 0x89ABCDEF)
    manifest, sig = decode_begin(decoded["fw_begin"].payload)
    assert manifest == VECTOR_MANIFEST
    assert sig == VECTOR_SIGNATURE
    assert decode_chunk(decoded["fw_chunk"].payload) == (1792, bytes(range(16)))
    assert Nack.decode(decoded["nack"].payload) == Nack(0x1239, 4, 1808)
    assert ErrorReport.decode(decoded["error"].payload).text == "self-test failed"
    assert decoded["reboot"].type == MsgType.REBOOT


def test_vector_signature_is_the_rfc8032_test_key_signing_the_manifest() -> None:
    Ed25519PublicKey.from_public_bytes(RFC8032_PUBLIC).verify(VECTOR_SIGNATURE, VECTOR_MANIFEST.encode())


def test_decoder_counts_each_kind_of_bad_frame_and_resyncs() -> None:
    good = encode_frame(MsgType.SAMPLES, 5, b"\x01\x02\x00\x03")
    raw = bytearray(b"\x01\x10\x07\x00abc")
    raw += (crc16(bytes(raw)) ^ 1).to_bytes(2, "little")
    bad_crc = cobs_encode(bytes(raw)) + b"\x00"
    raw2 = bytearray(b"\x02\x10\x07\x00")
    raw2 += crc16(bytes(raw2)).to_bytes(2, "little")
    bad_version = cobs_encode(bytes(raw2)) + b"\x00"
    stream = (
        b"\x55" * 400  # no delimiter for far longer than a frame
        + b"\x00"
        + good
        + bad_crc
        + b"\x05\x01\x00"  # COBS block running past the end
        + cobs_encode(b"\x01\x02")
        + b"\x00"  # too short
        + bad_version
        + b"\x00\x00"  # flush markers
        + good
    )
    dec = FrameDecoder()
    frames: list[Frame] = []
    for i in range(0, len(stream), 7):  # arbitrary read boundaries
        frames += dec.feed(stream[i : i + 7])
    assert frames == [Frame(MsgType.SAMPLES, 5, b"\x01\x02\x00\x03")] * 2
    assert dec.drops == {
        DropReason.OVERSIZE: 1,
        DropReason.CRC: 1,
        DropReason.COBS: 1,
        DropReason.SHORT: 1,
        DropReason.VERSION: 1,
    }


def test_frame_limits() -> None:
    assert len(encode_frame(1, 0, bytes(MAX_PAYLOAD))) <= MAX_COBS + 1
    with pytest.raises(FrameError):
        encode_frame(1, 0, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(FrameError):
        encode_frame(1, 70000)


def test_message_decoders_refuse_what_does_not_fit() -> None:
    body = Samples(1, 0, 0, (1, 2, 3)).encode()
    with pytest.raises(MessageError):
        Samples.decode(body[:-1])
    with pytest.raises(MessageError):
        Samples.encode(Samples(1, 0, 0, tuple(range(MAX_SAMPLES + 1))))
    hello = Hello(Cap(1), 1000, 1, 0, BootState.CONFIRMED, Health.OK, 1, 240, "N", "T").encode()
    with pytest.raises(MessageError):
        Hello.decode(hello + b"\x00")
    with pytest.raises(MessageError):
        Hello.decode(hello[:11] + b"\x07" + hello[12:])  # boot state 7 does not exist
    with pytest.raises(MessageError):
        Manifest.decode(b"XXXX" + VECTOR_MANIFEST.encode()[4:])


def test_versions() -> None:
    assert parse_version("1.3.0") == 0x01030000
    assert parse_version("2") == 0x02000000
    assert format_version(parse_version("4.5.600")) == "4.5.600"
    for bad in ("1.x", "256.0.0", "1.2.3.4", "-1"):
        with pytest.raises(ValueError, match="version"):
            parse_version(bad)


# -- property tests and fuzzing --------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_cobs_round_trips_and_never_contains_zero(data: bytes) -> None:
    enc = cobs_encode(data)
    assert 0 not in enc
    assert len(enc) <= len(data) + len(data) // 254 + 1
    assert cobs_decode(enc) == data


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=1200), max_size=8))
def test_decoder_never_raises_on_arbitrary_bytes(chunks: list[bytes]) -> None:
    dec = FrameDecoder()
    for chunk in chunks:
        for f in dec.feed(chunk):
            assert len(f.payload) <= MAX_PAYLOAD
            assert 0 <= f.type <= 0xFF


frame_st = st.builds(Frame, st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(max_size=MAX_PAYLOAD))


@settings(max_examples=200, deadline=None)
@given(st.lists(frame_st, min_size=1, max_size=10), st.data())
def test_frames_survive_any_read_boundaries_and_noise(frames: list[Frame], data: st.DataObject) -> None:
    stream = bytearray()
    for f in frames:
        noise = data.draw(st.binary(max_size=20))
        stream += noise + b"\x00" + encode_frame(f.type, f.seq, f.payload)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder()
    got: list[Frame] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        got += dec.feed(bytes(stream[last:cut]))
        last = cut
    # Noise may, rarely, form a valid frame of its own; every real frame must come through in order.
    it = iter(got)
    assert all(any(g == f for g in it) for f in frames)


@settings(max_examples=300, deadline=None)
@given(frame_st, st.integers(0, 10_000), st.integers(1, 255))
def test_a_damaged_frame_is_one_drop_or_one_frame_never_more(frame: Frame, where: int, flip: int) -> None:
    wire = bytearray(encode_frame(frame.type, frame.seq, frame.payload))
    at = where % (len(wire) - 1)
    if wire[at] ^ flip == 0:
        flip ^= 0x80 if flip != 0x80 else 0x01
    wire[at] ^= flip
    dec = FrameDecoder()
    frames = dec.feed(bytes(wire))
    assert len(frames) + sum(dec.drops.values()) == 1
    assert decode_frame(bytes(wire[:-1])) != frame  # the damage never goes unnoticed as the same frame


hello_st = st.builds(
    Hello,
    st.sampled_from([Cap(c) for c in range(16)]),
    st.integers(1, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 1),
    st.sampled_from(list(BootState)),
    st.sampled_from(list(Health)),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.text(st.characters(codec="ascii", min_codepoint=33, max_codepoint=126), min_size=1, max_size=32),
    st.text(st.characters(codec="ascii", min_codepoint=33, max_codepoint=126), min_size=1, max_size=32),
)


@settings(max_examples=200, deadline=None)
@given(hello_st, st.lists(st.integers(-32768, 32767), min_size=1, max_size=MAX_SAMPLES))
def test_messages_round_trip(hello: Hello, raw: list[int]) -> None:
    assert Hello.decode(hello.encode()) == hello
    s = Samples(3, 2**32 - 1, 17, tuple(raw))
    assert Samples.decode(s.encode()) == s
    assert len(encode_frame(MsgType.SAMPLES, 1, s.encode())) <= MAX_COBS + 1
