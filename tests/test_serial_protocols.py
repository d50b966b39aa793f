"""Serial oximeter parsers: every test vector of PROTOCOLS.md, more from the specs, framing rules."""

from __future__ import annotations

import math
import random

import pytest

from drivers.serial import contec, masimo, nonin
from drivers.serial.formats import PARSERS, make_parser, settings_groups
from drivers.serial.protocol import QUALITY, DropReason, LineSettings, LineSplitter, Reading, Status
from gateway.sample import Quality


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def is_nan(v: float | None) -> bool:
    return v is not None and math.isnan(v)


# ---- Nonin Data Format #2 ------------------------------------------------------------------------

FILLER = h("01 80 01 00 82")  # a whole frame, no SYNC, float 0


def packet(*frames: bytes) -> bytes:
    """Frames 1..n as given, the rest of the 25 filled with whole empty frames."""
    return b"".join(frames) + FILLER * (25 - len(frames))


def test_df2_vectors() -> None:
    sync = nonin.decode_packet_frame(h("01 81 01 00 83"), start=1)
    assert isinstance(sync, nonin.PacketFrame)
    assert sync.sync
    assert sync.value == 0  # HR MSB
    lsb = nonin.decode_packet_frame(h("01 80 01 48 CA"), start=1)
    assert isinstance(lsb, nonin.PacketFrame)
    assert not lsb.sync
    assert lsb.value == 0x48
    spo2 = nonin.decode_packet_frame(h("01 80 01 61 E3"), start=1)
    assert isinstance(spo2, nonin.PacketFrame)
    assert spo2.value & 0x7F == 97
    assert nonin.decode_packet_frame(h("01 81 01 00 CB"), start=1) is DropReason.CHECKSUM
    alarm = nonin.decode_packet_frame(h("01 98 00 7F 18"), start=1)
    assert isinstance(alarm, nonin.PacketFrame)
    assert alarm.status == Status.FINGER_OUT | Status.OUT_OF_TRACK
    assert alarm.value == 127


def test_df2_packet_of_the_vectors_gives_72_bpm_97_percent() -> None:
    p = make_parser("nonin2")
    out = p.feed(packet(h("01 81 01 00 83"), h("01 80 01 48 CA"), h("01 80 01 61 E3")))
    assert out == [Reading(97.0, 72.0, None, 0)]
    assert p.frames == 25
    assert p.dropped == 0


def test_df2_missing_values_are_nan_with_their_status() -> None:
    # HR 511 = MSB 3, LSB 7F; SpO2 127; status SNSA + OOT on every frame.
    frames = [
        bytes([1, st, 0, v, (1 + st + v) & 0xFF]) for st, v in ((0x99, 0x03), (0x98, 0x7F), (0x98, 0x7F))
    ]
    frames += [bytes([1, 0x98, 0, 0, (1 + 0x98) & 0xFF])] * 22
    (r,) = make_parser("nonin2").feed(b"".join(frames))
    assert is_nan(r.spo2)
    assert is_nan(r.pulse)
    assert r.status & Status.FINGER_OUT
    assert r.quality & Quality.SENSOR_OFF
    assert r.quality & Quality.BAD_STATUS


def test_df2_out_of_range_packet_is_dropped_and_counted() -> None:
    p = make_parser("nonin2")
    # HR MSB 3, LSB 0x10 = 400 /min: beyond the 321 the device can report.
    frames = [
        bytes([1, 0x81, 0, 3, (1 + 0x81 + 3) & 0xFF]),
        bytes([1, 0x80, 0, 0x10, (1 + 0x80 + 0x10) & 0xFF]),
    ]
    assert p.feed(packet(*frames)) == []
    assert p.drop_range == 1


def test_df2_low_battery_from_stat2_and_perfusion_colours() -> None:
    stat2 = bytes([1, 0x80, 0, 0x01, (1 + 0x80 + 1) & 0xFF])
    frames = [h("01 81 01 00 83"), h("01 80 01 48 CA"), h("01 80 01 61 E3")] + [FILLER] * 4 + [stat2]
    (r,) = make_parser("nonin2").feed(packet(*frames))
    assert r.status == Status.LOW_BATTERY
    assert QUALITY[r.status] == Quality.GOOD  # a flat battery is not a bad measurement
    assert nonin.DF2_STATUS[0x84] == Status.LOW_PERFUSION  # red only
    assert nonin.DF2_STATUS[0x86] == Status.MARGINAL_PERFUSION  # yellow: both
    assert nonin.DF2_STATUS[0x82] == 0  # green


def test_df2_resyncs_after_garbage_within_one_frame() -> None:
    good = nonin.encode_packet(2, 72, 97, 0, list(range(25)))
    p = make_parser("nonin2")
    assert p.feed(good) == [Reading(97.0, 72.0, None, 0)]
    out = p.feed(h("01 80 05 17 ff 13 37 00 01") + good * 2)
    assert out == [Reading(97.0, 72.0, None, 0)] * 2
    assert p.drop_framing + p.drop_checksum >= 1
    assert p.skipped == 9


def test_df2_lost_frame_loses_only_its_packet() -> None:
    good = nonin.encode_packet(2, 80, 95, 0, [10] * 25)
    damaged = good[:52] + good[53:]  # one byte of frame 11 lost
    p = make_parser("nonin2")
    assert p.feed(good + damaged + good) == [Reading(95.0, 80.0, None, 0)] * 2
    assert p.dropped >= 1


# ---- Nonin Data Format #7 ------------------------------------------------------------------------


def test_df7_vector_sync_and_16_bit_pleth() -> None:
    f = nonin.decode_packet_frame(h("81 12 34 00 C7"), start=None)
    assert isinstance(f, nonin.PacketFrame)
    assert f.sync
    assert f.pleth == 4660
    assert nonin.decode_packet_frame(h("81 12 34 00 C8"), start=None) is DropReason.CHECKSUM
    assert nonin.decode_packet_frame(h("01 12 34 00 47"), start=None) is DropReason.FRAMING  # bit 7 clear


def test_df7_packet_round_trip() -> None:
    data = nonin.encode_packet(7, 150, 88, int(Status.ARTIFACT), [40000] * 25)
    assert data[:5] == bytes([0x83 | 0x20, 40000 >> 8, 40000 & 0xFF, 1, (0xA3 + 0x9C + 0x40 + 1) & 0xFF])
    assert make_parser("nonin7").feed(data) == [Reading(88.0, 150.0, None, int(Status.ARTIFACT))]


# ---- Nonin Data Format #8 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "spo2", "pulse", "status"),
    [
        ("80 48 61 00", 97.0, 72.0, 0),
        ("81 16 61 00", 97.0, 150.0, 0),
        ("83 7F 7F 08", math.nan, math.nan, Status.FINGER_OUT),
        ("B0 48 61 00", 97.0, 72.0, Status.OUT_OF_TRACK | Status.LOW_PERFUSION),
    ],
)
def test_df8_vectors(frame: str, spo2: float, pulse: float, status: int) -> None:
    r = nonin.decode_df8(h(frame))
    assert isinstance(r, Reading)
    assert (is_nan(r.spo2) and math.isnan(spo2)) or r.spo2 == spo2
    assert (is_nan(r.pulse) and math.isnan(pulse)) or r.pulse == pulse
    assert r.status == status


def test_df8_framing_bits_and_range() -> None:
    assert nonin.decode_df8(h("00 48 61 00")) is DropReason.FRAMING  # no start bit
    assert nonin.decode_df8(h("C0 48 61 00")) is DropReason.FRAMING  # reserved bit of byte 1
    assert nonin.decode_df8(h("80 48 61 40")) is DropReason.FRAMING  # reserved bit of byte 4
    assert nonin.decode_df8(h("80 48 E1 00")) is DropReason.FRAMING  # bit 7 of a data byte
    assert nonin.decode_df8(h("80 48 70 00")) is DropReason.RANGE  # SpO2 112
    assert nonin.decode_df8(h("82 60 61 00")) is DropReason.RANGE  # HR 352


def test_df8_stream_confirms_before_locking_and_releases_on_silence() -> None:
    frames = [nonin.encode_df8(70 + k, 96, 0) for k in range(4)]
    p = make_parser("nonin8")
    assert p.feed(frames[0]) == []  # hunting: needs a second frame behind it
    assert [r.pulse for r in p.feed(frames[1])] == [70.0]
    assert [r.pulse for r in p.feed(frames[2])] == [71.0]  # in sync: the next start byte ends it
    assert [r.pulse for r in p.idle()] == [72.0]  # or the line going quiet does
    assert [r.pulse for r in p.feed(frames[3]) + p.idle()] == [73.0]


def test_df8_inserted_bytes_do_not_become_a_reading() -> None:
    p = make_parser("nonin8")
    p.feed(nonin.encode_df8(35, 71, 0) * 3)
    # Two bytes slipped into a frame: 84 21 42 29 looks whole on its own (HR 33, SpO2 66).
    out = p.feed(h("84 21 42 29 46 00") + nonin.encode_df8(36, 71, 0) * 3) + p.idle()
    assert all(r.spo2 == 71.0 for r in out)
    assert p.dropped >= 1


def test_df8_a_real_jump_is_held_one_frame_then_taken() -> None:
    p = make_parser("nonin8")
    p.feed(nonin.encode_df8(70, 97, 0) * 3)
    out = p.feed(nonin.encode_df8(math.nan, math.nan, int(Status.FINGER_OUT)) * 3) + p.idle()
    assert [is_nan(r.spo2) for r in out] == [False, True, True, True]


# ---- Nonin Data Format #13 -----------------------------------------------------------------------

DF13 = h("00 02 00 0D 00 0E 20 24 01 15 10 30 00 00 02 00 00 48 00 61 45 03")


def test_df13_vector() -> None:
    (r,) = make_parser("nonin13").feed(DF13)
    assert (r.spo2, r.pulse, r.status) == (97.0, 72.0, 0)
    assert r.device_time == "2024-01-15T10:30:00"


def test_df13_checksum_end_byte_and_split_reads() -> None:
    p = make_parser("nonin13")
    bad = bytearray(DF13)
    bad[20] ^= 0x01
    assert p.feed(bytes(bad)) == []
    assert p.drop_checksum == 1
    no_end = DF13[:-1] + b"\x04"
    assert p.feed(no_end) == []
    assert p.drop_framing >= 1
    out = []
    for k in range(len(DF13)):
        out += p.feed(DF13[k : k + 1])
    assert [r.pulse for r in out] == [72.0]


def test_df13_encoder_and_missing_values() -> None:
    data = nonin.encode_df13(math.nan, math.nan, int(Status.NO_MEASUREMENT), (2025, 6, 1, 8, 5, 9))
    (r,) = make_parser("nonin13").feed(b"\x06" + data)  # an ACK byte before it is skipped
    assert is_nan(r.spo2)
    assert is_nan(r.pulse)
    assert r.quality & Quality.BAD_STATUS
    assert r.device_time == "2025-06-01T08:05:09"
    assert data[:6] == h("00 02 00 0D 00 0E")


def _df13(payload: bytes) -> bytes:
    """A #13 message around ``payload`` whose length, checksum and end byte are all right."""
    return nonin.DF13_HEADER + len(payload).to_bytes(2, "big") + payload + bytes((sum(payload) & 0xFF, 0x03))


def test_df13_refuses_messages_whose_checksum_adds_up_but_no_monitor_sends() -> None:
    good = DF13[6:20]
    # A measured SpO2 of 86 % beside a pulse rate of 0: bytes that add up, not a reading.
    no_pulse = good[:10] + bytes((0x00, 0x00, 0x00, 86))
    # The date-time shifted by one lost byte (month 0x01 -> 0x15 is no month), a stray byte after
    # the seconds, the HR MSB byte with bits HR has not, another century: each rebuilt to a right sum.
    shifted = good[:2] + good[3:8] + b"\x00" + good[8:]
    stray = good[:7] + b"\x40" + good[8:]
    msb = good[:10] + b"\x80" + good[11:]
    century = b"\x19" + good[1:]
    p = make_parser("nonin13")
    assert p.feed(b"".join(_df13(x) for x in (no_pulse, shifted, stray, msb, century))) == []
    assert (p.drop_range, p.drop_checksum) == (1, 0)
    assert p.drop_framing >= 4
    (r,) = p.feed(DF13)  # and it still reads the next whole message
    assert (r.spo2, r.pulse) == (97.0, 72.0)


def test_df13_random_payloads_with_a_right_checksum_are_refused() -> None:
    # What a resync on damaged bytes can hand the decoder: a header, a length and a sum that match
    # by chance. The old decoder read 27 of these 100,000 as readings; the structure checks none.
    rng = random.Random("df13-structure")
    accepted = 0
    for _ in range(100_000):
        accepted += len(make_parser("nonin13").feed(_df13(rng.randbytes(14))))
    assert accepted == 0


# ---- Nonin ASCII ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "spo2", "pulse"),
    [
        (b"SPO2=097 HR=072", 97.0, 72.0),
        (b"10:30:00 SPO2=097 HR=072", 97.0, 72.0),
        (b"SPO2=097 HR=072 F", 97.0, 72.0),
        (b"SPO2=097 HR=072*", 97.0, 72.0),
        (b"12:00:01 SPO2=100 HR=123 B", 100.0, 123.0),
        (b"SPO2=--- HR=---", math.nan, math.nan),
        (b"SPO2= 97 HR= 72", 97.0, 72.0),
    ],
)
def test_ascii_lines(line: bytes, spo2: float, pulse: float) -> None:
    r = nonin.decode_ascii(line)
    assert isinstance(r, Reading)
    assert (is_nan(r.spo2) and math.isnan(spo2)) or r.spo2 == spo2
    assert (is_nan(r.pulse) and math.isnan(pulse)) or r.pulse == pulse


def test_ascii_damaged_lines_and_headers() -> None:
    assert nonin.decode_ascii(b"SPO2=97 HR=072") is DropReason.FRAMING  # a digit lost
    assert nonin.decode_ascii(b"SPO2=097 HR=0072") is DropReason.FRAMING
    assert nonin.decode_ascii(b"SPO2=101 HR=072") is DropReason.RANGE
    assert nonin.decode_ascii(b"NONIN 8500 V2.1 01/15/24 10:30") is None  # a header: ignored
    p = make_parser("nonin_ascii")
    out = p.feed(b"NONIN 8500\r\nSPO2=097 HR=072\r\nSPO2=09\r\nSPO2=096 HR=071\n\rSPO2=--- HR=---\r")
    assert [(r.spo2, r.pulse) for r in out[:2]] == [(97.0, 72.0), (96.0, 71.0)]
    assert is_nan(out[2].spo2)
    assert p.ignored == 1
    assert p.drop_framing == 1


# ---- Masimo --------------------------------------------------------------------------------------

RAD8 = (
    b"02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- "
    b"PIDELTA=+-- ALARM=0000 EXC=000800"
)
RADICAL7 = (
    b"03/17/16 19:19:36 SN=---------- SPO2=098% BPM=123 PI=00.55 SPCO=--% SPMET=--.-% SPHB=--.- SPOC=-- "
    b"RESVD=--- DESAT=-- PIDELTA=+-- PVI=--- ALARM=000000 EXC=0000C00 EXC1=00000000"
)
ASCII2 = b"09/21/08 09:56:12 SpO2=097 PR=069 PI=04.69 EXC=800:SET"
NO_SENSOR = (
    b"02/22/16 22:47:46 SN=0000056661 SPO2=---% BPM=--- PI=--.--% SPCO=--.-% SPMET=--.-% DESAT=-- "
    b"PIDELTA=+-- ALARM=0000 EXC=000001"
)


def test_masimo_vectors() -> None:
    got = masimo.decode_line(RAD8)
    assert isinstance(got, tuple)
    r = got[0]
    assert (r.spo2, r.pulse, r.pi, r.status, r.serial) == (98.0, 97.0, 3.60, 0, "0000056661")
    got = masimo.decode_line(RADICAL7)
    assert isinstance(got, tuple)
    r = got[0]
    assert (r.spo2, r.pulse, r.pi, r.serial) == (98.0, 123.0, 0.55, None)
    assert r.status == Status.LOW_SIGNAL_IQ
    assert r.quality == Quality.UNCERTAIN
    got = masimo.decode_line(ASCII2)
    assert isinstance(got, tuple)
    assert (got[0].spo2, got[0].pulse, got[0].pi, got[0].status) == (97.0, 69.0, 4.69, 0)
    got = masimo.decode_line(NO_SENSOR)
    assert isinstance(got, tuple)
    r = got[0]
    assert is_nan(r.spo2)
    assert is_nan(r.pulse)
    assert is_nan(r.pi)
    assert r.status == Status.SENSOR_OFF
    assert r.quality & Quality.SENSOR_OFF


def test_masimo_exception_bits() -> None:
    assert masimo.exc_status(0x004) == Status.LOW_PERFUSION
    assert masimo.exc_status(0x008) == Status.SEARCHING
    assert masimo.exc_status(0x010 | 0x040) == Status.INTERFERENCE
    assert masimo.exc_status(0x020) == Status.SENSOR_OFF
    assert masimo.exc_status(0x002) == masimo.exc_status(0x080) == Status.SENSOR_FAULT
    assert masimo.exc_status(0x800) == 0


def test_masimo_rejects_damaged_lines() -> None:
    assert masimo.decode_line(RAD8.replace(b"SPO2=098%", b"SPO2=98%")) is DropReason.FRAMING
    assert (
        masimo.decode_line(RAD8.replace(b"BPM=097 ", b"BPM=097")) is DropReason.FRAMING
    )  # tokens ran together
    assert masimo.decode_line(RAD8.replace(b"EXC=000800", b"EXC=00800")) is DropReason.FRAMING
    assert masimo.decode_line(RAD8.replace(b"ALARM=0000", b"ALARM=000")) is DropReason.FRAMING
    assert masimo.decode_line(RAD8.replace(b"02/22/16", b"02/2216")) is DropReason.FRAMING
    assert masimo.decode_line(RAD8.replace(b"BPM=097", b"BPM=250")) is DropReason.RANGE
    assert masimo.decode_line(b"Masimo Rad-8 V7.1") is None


def test_masimo_stream_identity_and_length_lock() -> None:
    p = make_parser("masimo")
    line = RAD8 + b"\r\n"
    # The serial number is trusted once two lines agree; values wait for it.
    assert p.feed(line) == []
    out = p.feed(line + line)
    assert [r.serial for r in out] == ["0000056661"] * 2
    # One byte lost in a field that is not read: the line is the wrong length, so dropped.
    short = line.replace(b"SPCO=--.-%", b"SPCO=--.%")
    assert p.feed(short) == []
    # A damaged serial number does not rename the device.
    renamed = line.replace(b"SN=0000056661", b"SN=0000056669")
    (r,) = p.feed(renamed)
    assert r.serial == "0000056661"
    assert [r.spo2 for r in p.feed(ASCII2 + b"\n" + line)] == [97.0, 98.0]


# ---- Contec --------------------------------------------------------------------------------------


def test_cms50_legacy_vectors() -> None:
    r = contec.decode_legacy(h("C5 3C 05 48 61"))
    assert isinstance(r, Reading)
    assert (r.spo2, r.pulse, r.status) == (97.0, 72.0, 0)
    r = contec.decode_legacy(h("82 50 43 16 5F"))
    assert isinstance(r, Reading)
    assert (r.spo2, r.pulse) == (95.0, 150.0)
    r = contec.decode_legacy(h("90 00 30 00 00"))
    assert isinstance(r, Reading)
    assert is_nan(r.spo2)
    assert is_nan(r.pulse)
    assert r.status == Status.FINGER_OUT | Status.SEARCHING | Status.SENSOR_FAULT
    assert contec.decode_legacy(h("C5 BC 05 48 61")) is DropReason.FRAMING
    assert contec.decode_legacy(h("C5 3C 05 48 70")) is DropReason.RANGE


def test_cms50_stream_votes_and_lone_damage_never_shows() -> None:
    frames = [contec.encode_legacy(72, 97, 0, k) for k in range(40)]
    frames[5] = h("C5 3C 05 10 61")  # a flipped bit: pulse 16 in one frame only
    p = make_parser("cms50")
    out = p.feed(b"".join(frames) + frames[0])
    assert [(r.spo2, r.pulse) for r in out] == [(97.0, 72.0)] * 2
    assert p.frames == 40


def test_cms50_wrong_length_frames_are_dropped() -> None:
    p = make_parser("cms50")
    frame = contec.encode_legacy(72, 97, 0, 9)
    p.feed(frame + frame[:4] + frame + frame[:3] + b"\x11" + frame[3:] + frame)
    assert p.drop_framing == 2
    assert p.frames == 2  # the last one waits for the next frame's first byte


def test_cms50v46_vector_replies_and_commands() -> None:
    r = contec.decode_v46(h("01 E0 85 B3 96 C1 E1 FF FF"))
    assert isinstance(r, Reading)
    assert (r.spo2, r.pulse, r.status) == (97.0, 65.0, 0)
    r = contec.decode_v46(h("01 E1 85 B3 96 C1 E1 FF FF"))
    assert isinstance(r, Reading)
    assert is_nan(r.pulse)
    assert r.status == Status.SEARCHING
    r = contec.decode_v46(h("01 E2 80 80 80 FF FF FF FF"))
    assert isinstance(r, Reading)
    assert r.status == Status.FINGER_OUT
    p = make_parser("cms50v46")
    live = h("01 E0 85 B3 96 C1 E1 FF FF")
    out = p.feed(h("0C 80") + h("06 80 80 87") + live * 20 + h("0C 80"))
    assert [(r.spo2, r.pulse) for r in out] == [(97.0, 65.0)]
    assert p.ignored == 2
    assert h("7D 81 A1 80 80 80 80 80 80") == contec.START_COMMAND
    assert h("7D 81 AF 80 80 80 80 80 80") == contec.KEEPALIVE_COMMAND


# ---- common --------------------------------------------------------------------------------------


def test_quality_mapping_separates_sensor_faults() -> None:
    assert QUALITY[Status.FINGER_OUT] == Quality.SENSOR_OFF
    assert QUALITY[Status.SENSOR_OFF] == Quality.SENSOR_OFF
    assert QUALITY[Status.ARTIFACT] == Quality.ARTIFACT
    assert QUALITY[Status.OUT_OF_TRACK] == Quality.BAD_STATUS
    assert QUALITY[Status.SEARCHING] == Quality.BAD_STATUS
    assert QUALITY[Status.LOW_PERFUSION] == Quality.LOW_PERFUSION
    assert QUALITY[Status.LOW_BATTERY | Status.MARGINAL_PERFUSION] == Quality.GOOD


def test_line_splitter_handles_split_terminators_and_overlong_lines() -> None:
    s = LineSplitter(max_len=10)
    assert s.feed(b"abc\r") == [b"abc"]
    assert s.feed(b"\ndef") == []
    assert s.feed(b"\n") == [b"def"]
    assert s.feed(b"x" * 30) == []
    assert s.feed(b"yyy\nok\n") == [b"ok"]
    assert s.overlong == 1


def test_registry_and_line_settings() -> None:
    assert set(PARSERS) == {
        "nonin2",
        "nonin7",
        "nonin8",
        "nonin13",
        "nonin_ascii",
        "masimo",
        "cms50",
        "cms50v46",
    }
    groups = settings_groups()
    assert list(groups) == [LineSettings(9600), LineSettings(19200, 8, "O", 1), LineSettings(115200)]
    assert str(LineSettings(19200, 8, "O", 1)) == "19200 8O1"
    assert LineSettings(19200, 8, "O", 1).bits_per_char == 11
    assert PARSERS["cms50v46"].start_command is not None
    assert all(PARSERS[n].start_command is None for n in groups[LineSettings(9600)])
