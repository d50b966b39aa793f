"""BLE GATT health profiles: every PROTOCOLS.md test vector and our own, decoded exactly; parsers fuzzed."""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction

import pytest
from data_support import DATA
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.ble import protocol as p
from drivers.ble.protocol import (
    BpStatus,
    DateTime,
    GattFormatError,
    PlxMeasurementStatus,
    PlxSensorStatus,
    Special,
    TemperatureType,
)
from drivers.ble.testbed.wearables import (
    HeartRateStrap,
    beats_from_annotations,
    make_wearable,
    read_mit_annotations,
    synthetic_beats,
)
from gateway.errors import CorruptDataError
from gateway.sample import MDC, Quality

TS = DateTime(2024, 1, 15, 10, 30, 0)


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


# -- SFLOAT / FLOAT ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value", "mantissa", "exponent"),
    [(0xF014, 2.0, 20, -1), (0xE0C8, 2.0, 200, -2), (0x1002, 20.0, 2, 1), (0x0B2E, -1234.0, -1234, 0),
     (0xFFFF, -0.1, -1, -1)],
)  # fmt: skip
def test_sfloat_vectors(raw: int, value: float, mantissa: int, exponent: int) -> None:
    v = p.sfloat(raw)
    assert (v.value, v.mantissa, v.exponent, v.special) == (value, mantissa, exponent, None)


def test_sfloat_is_little_endian_on_the_wire() -> None:
    assert p.parse_plx_continuous(h("00 14 F0 14 F0")).spo2.value == 2.0


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(0x07FF, Special.NAN), (0x0800, Special.NRES), (0x07FE, Special.POS_INF), (0x0802, Special.NEG_INF),
     (0x0801, Special.RESERVED)],
)  # fmt: skip
def test_sfloat_special_values_are_missing_with_a_reason(raw: int, reason: Special) -> None:
    v = p.sfloat(raw)
    assert math.isnan(v.value)
    assert v.special is reason


@pytest.mark.parametrize(
    ("raw", "value"), [(0xFF000014, 2.0), (0x00FFFB2E, -1234.0), (0xFF00016E, 36.6), (0xFE000E4C, 36.6)]
)
def test_float_vectors(raw: int, value: float) -> None:
    assert p.float32(raw).value == value


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(0x007FFFFF, Special.NAN), (0x00800000, Special.NRES), (0x007FFFFE, Special.POS_INF),
     (0x00800002, Special.NEG_INF), (0x00800001, Special.RESERVED)],
)  # fmt: skip
def test_float_special_values(raw: int, reason: Special) -> None:
    v = p.float32(raw)
    assert math.isnan(v.value)
    assert v.special is reason


def test_exponent_has_no_bias() -> None:
    # A decoder with an exponent bias of 8 reads 0x8014 as 20; it is 20 x 10^-8.
    assert p.sfloat(0x8014).value == pytest.approx(2e-7)
    assert p.sfloat(0x7014).value == 200000000.0


@given(st.integers(-2048, 2047), st.integers(-8, 7))
def test_sfloat_round_trips(mantissa: int, exponent: int) -> None:
    raw = int.from_bytes(p.encode_sfloat(mantissa, exponent), "little")
    v = p.sfloat(raw)
    if v.special is None:
        assert (v.mantissa, v.exponent) == (mantissa, exponent)
        assert Fraction(v.value) == pytest.approx(v.exact)
    else:
        assert exponent == 0
        assert mantissa in (2047, -2048, 2046, -2046, -2047)


@given(st.integers(-(1 << 23), (1 << 23) - 1), st.integers(-128, 127))
def test_float_round_trips(mantissa: int, exponent: int) -> None:
    v = p.float32(int.from_bytes(p.encode_float32(mantissa, exponent), "little"))
    if v.special is None:
        assert (v.mantissa, v.exponent) == (mantissa, exponent)
    else:
        assert exponent == 0


# -- Heart Rate Measurement -------------------------------------------------------------------------


def test_heart_rate_vector_contact() -> None:
    m = p.parse_heart_rate(h("06 48"))
    assert (m.bpm, m.contact_supported, m.contact, m.energy_kj, m.rr_ms) == (72, True, True, None, ())


def test_heart_rate_vector_rr_intervals_in_ms() -> None:
    m = p.parse_heart_rate(h("16 4B 1A 03 20 03"))
    assert m.bpm == 75
    assert m.rr_ms == (775.390625, 781.25)  # 794/1024 s and 800/1024 s, exactly
    assert m.rr_ms[0] / 1000 == pytest.approx(0.7754, abs=5e-5)
    assert m.rr_ms[1] / 1000 == pytest.approx(0.7813, abs=5e-5)


def test_heart_rate_vector_uint16_and_energy() -> None:
    m = p.parse_heart_rate(h("09 B4 00 E8 03"))
    assert (m.bpm, m.energy_kj, m.contact_supported, m.contact) == (180, 1000, False, None)


def test_heart_rate_readings_place_rr_at_their_beats_and_flag_lost_contact() -> None:
    readings = p.decode(p.HEART_RATE_MEASUREMENT, h("14 4B 1A 03 20 03"))  # contact supported, not detected
    hr, first, last = readings
    assert (hr.metric, hr.value, hr.quality) == (p.HR, 75.0, Quality.SENSOR_OFF)
    assert (last.metric, last.value, last.offset_s) == (p.RR, 781.25, 0.0)
    assert (first.value, first.offset_s) == (775.390625, -0.78125)
    assert first.quality == Quality.SENSOR_OFF
    assert all(MDC[r.metric] for r in readings)


def test_heart_rate_malformed() -> None:
    with pytest.raises(GattFormatError, match="truncated"):
        p.parse_heart_rate(h("01 48"))
    with pytest.raises(GattFormatError, match="whole number"):
        p.parse_heart_rate(h("10 48 1A 03 20"))
    with pytest.raises(GattFormatError):
        p.parse_heart_rate(b"")


# -- PLX ---------------------------------------------------------------------------------------------


def test_plx_continuous_vectors() -> None:
    m = p.parse_plx_continuous(h("00 61 00 48 00"))
    assert (m.spo2.value, m.pr.value, m.measurement_status, m.sensor_status, m.pai) == (
        97.0,
        72.0,
        None,
        None,
        None,
    )
    m = p.parse_plx_continuous(h("1C 61 00 48 00 80 00 20 00 00 2D F0"))
    assert m.measurement_status == PlxMeasurementStatus.VALIDATED
    assert m.sensor_status == PlxSensorStatus.LOW_PERFUSION
    assert m.pai is not None
    assert m.pai.value == 4.5
    spo2, pr, perf = p.plx_readings(m)
    assert (spo2.metric, spo2.value, spo2.quality) == (p.SPO2, 97.0, Quality.LOW_PERFUSION)
    assert (pr.metric, pr.value) == (p.PULSE, 72.0)
    assert (perf.metric, perf.value) == (p.PERF, 4.5)


def test_plx_nan_values_are_missing_never_numbers() -> None:
    m = p.parse_plx_continuous(h("00 FF 07 FF 07"))
    assert m.spo2.special is Special.NAN
    assert m.pr.special is Special.NAN
    for r in p.plx_readings(m):
        assert math.isnan(r.value)
        assert r.missing is Special.NAN
        assert r.quality & Quality.BAD_STATUS


def test_plx_spot_check_vectors() -> None:
    m = p.parse_plx_spot_check(h("01 61 00 48 00 E8 07 01 0F 0A 1E 00"))
    assert (m.spo2.value, m.pr.value, m.timestamp, m.spot_check) == (97.0, 72.0, TS, True)
    assert m.timestamp is not None
    assert m.timestamp.known
    m = p.parse_plx_spot_check(h("0C 61 00 48 00 00 20 00 08 00"))
    assert m.sensor_status == PlxSensorStatus.SENSOR_DISPLACED
    assert m.pai is not None
    assert m.pai.value == 8.0
    assert all(r.quality == Quality.SENSOR_OFF for r in p.plx_readings(m))


def test_plx_fast_slow_fields_and_clock_flag() -> None:
    m = p.parse_plx_continuous(h("03 61 00 48 00 62 00 49 00 60 00 47 00"))
    assert m.fast is not None
    assert m.slow is not None
    assert [v.value for v in (*m.fast, *m.slow)] == [98.0, 73.0, 96.0, 71.0]
    assert p.parse_plx_spot_check(h("10 61 00 48 00")).clock_not_set


@pytest.mark.parametrize(
    ("status", "dss", "quality"),
    [
        (PlxMeasurementStatus.INVALID, 0, Quality.BAD_STATUS),
        (PlxMeasurementStatus.QUESTIONABLE, 0, Quality.UNCERTAIN),
        (PlxMeasurementStatus.DEMO, 0, Quality.BAD_STATUS),
        (0, PlxSensorStatus.SENSOR_DISCONNECTED, Quality.SENSOR_OFF),
        (0, PlxSensorStatus.SENSOR_UNCONNECTED, Quality.SENSOR_OFF),
        (0, PlxSensorStatus.SENSOR_MALFUNCTION, Quality.BAD_STATUS),
        (0, PlxSensorStatus.ERRATIC_SIGNAL, Quality.ARTIFACT),
        (0, PlxSensorStatus.INTERFERENCE, Quality.ARTIFACT),
        (0, PlxSensorStatus.POOR_SIGNAL, Quality.UNCERTAIN),
        (PlxMeasurementStatus.VALIDATED, PlxSensorStatus.LOW_PERFUSION | PlxSensorStatus.ERRATIC_SIGNAL,
         Quality.LOW_PERFUSION | Quality.ARTIFACT),
    ],
)  # fmt: skip
def test_plx_status_bits_become_quality_flags(status: int, dss: int, quality: Quality) -> None:
    value = p.encode_plx_continuous(
        p.encode_sfloat(97, 0), p.encode_sfloat(72, 0), measurement_status=int(status), sensor_status=int(dss)
    )
    assert {r.quality for r in p.decode(p.PLX_CONTINUOUS, value)} == {quality}


# -- Temperature ------------------------------------------------------------------------------------


def test_temperature_vectors() -> None:
    m = p.parse_temperature(h("00 6E 01 00 FF"))
    assert (m.value.value, m.unit, m.timestamp, m.site, m.celsius) == (36.6, "Cel", None, None, 36.6)
    m = p.parse_temperature(h("06 6E 01 00 FF E8 07 01 0F 0A 1E 00 02"))
    assert (m.celsius, m.timestamp, m.site) == (36.6, TS, TemperatureType.BODY)
    m = p.parse_temperature(h("01 DA 03 00 FF"))
    assert (m.value.value, m.unit, m.fahrenheit) == (98.6, "[degF]", True)
    assert m.celsius == 37.0  # exactly: (98.6 - 32) x 5/9 computed on the decimal value
    m = p.parse_temperature(h("00 FF FF 7F 00"))
    assert m.value.special is Special.NAN
    (r,) = p.temperature_readings(m)
    assert math.isnan(r.value)
    assert r.missing is Special.NAN
    assert r.quality == Quality.BAD_STATUS


def test_temperature_readings_in_celsius() -> None:
    (r,) = p.decode(
        p.TEMPERATURE_MEASUREMENT, h("03 CC 03 00 FF E8 07 01 0F 0A 1E 00")
    )  # 97.2 F, timestamped
    assert r.metric == p.TEMP
    assert MDC[r.metric].unit == "Cel"
    assert r.value == float((Fraction(972, 10) - 32) * Fraction(5, 9))
    assert r.device_time == TS
    assert p.parse_temperature(h("04 6E 01 00 FF 2A")).site == 42  # an unknown site is kept as its code


# -- Blood pressure ---------------------------------------------------------------------------------


def test_blood_pressure_vector_mmhg() -> None:
    m = p.parse_blood_pressure(h("1E 78 00 50 00 5D 00 E8 07 01 0F 0A 1E 00 48 00 01 04 00"))
    assert (m.systolic.value, m.diastolic.value, m.mean.value, m.unit) == (120.0, 80.0, 93.0, "mm[Hg]")
    assert m.pulse_rate is not None
    assert (m.pulse_rate.value, m.user_id, m.timestamp, m.status) == (72.0, 1, TS, BpStatus.IRREGULAR_PULSE)
    readings = {r.metric: r for r in p.blood_pressure_readings(m)}
    assert {k: r.value for k, r in readings.items()} == {
        p.SYS: 120.0,
        p.DIA: 80.0,
        p.MEAN: 93.0,
        p.BP_PULSE: 72.0,
    }
    # An irregular pulse is about the patient, not the cuff.
    assert {r.quality for r in readings.values()} == {Quality.GOOD}


def test_blood_pressure_vector_kpa_converted_to_mmhg() -> None:
    m = p.parse_blood_pressure(h("01 A0 F0 64 F0 7B F0"))
    assert (m.systolic.value, m.diastolic.value, m.mean.value, m.unit) == (16.0, 10.0, 12.3, "kPa")
    sys_, dia, mean = p.blood_pressure_readings(m)
    assert sys_.value == float(Fraction(16) * Fraction(760_000, 101_325))
    assert sys_.value == pytest.approx(120.00987, abs=1e-5)
    assert dia.value == pytest.approx(75.00617, abs=1e-5)
    assert mean.value == float(Fraction(123, 10) * Fraction(760_000, 101_325))


def test_blood_pressure_status_quality() -> None:
    value = p.encode_blood_pressure(
        p.encode_sfloat(130, 0), p.encode_sfloat(85, 0), p.encode_sfloat(100, 0),
        pulse_rate=p.encode_sfloat(150, 0), status=int(BpStatus.BODY_MOVEMENT | BpStatus.PULSE_ABOVE_RANGE),
    )  # fmt: skip
    sys_, dia, mean, pr = p.decode(p.BLOOD_PRESSURE_MEASUREMENT, value)
    assert sys_.quality == dia.quality == mean.quality == Quality.ARTIFACT
    assert pr.quality == Quality.ARTIFACT | Quality.UNCERTAIN
    with pytest.raises(GattFormatError):
        p.parse_blood_pressure(h("02 78 00 50 00 5D 00 E8 07"))


# -- battery, device information, dates -------------------------------------------------------------


def test_battery_and_device_information() -> None:
    assert p.parse_battery_level(b"\x64") == 100
    assert p.parse_battery_level(b"\x0c\x00") == 12
    with pytest.raises(GattFormatError):
        p.parse_battery_level(b"\x65")
    with pytest.raises(GattFormatError):
        p.parse_battery_level(b"")
    assert p.parse_utf8(b"Edgetwin\x00\x00") == "Edgetwin"
    assert p.parse_utf8(b"SN\xff1") == "SN\ufffd1"


def test_unknown_timestamps() -> None:
    assert not DateTime(0, 0, 0, 0, 0, 0).known
    assert not DateTime(2024, 13, 1, 0, 0, 0).known
    assert DateTime(2024, 2, 29, 23, 59, 59).known
    assert DateTime(2024, 1, 15, 10, 30, 0).encode() == h("E8 07 01 0F 0A 1E 00")


def test_uuids() -> None:
    assert p.uuid16(0x2A37) == "00002a37-0000-1000-8000-00805f9b34fb"
    assert p.normalize_uuid("2A37") == p.normalize_uuid("0x2a37") == p.HEART_RATE_MEASUREMENT
    assert p.PROFILE_BY_SERVICE[p.uuid16(0x1822)] == "plx"
    with pytest.raises(GattFormatError, match="not a health measurement"):
        p.decode(p.BATTERY_LEVEL, b"\x50")


def test_every_profile_metric_is_a_known_mdc_metric() -> None:
    for profile in p.PROFILES.values():
        for name in profile.metrics:
            assert name in MDC
            assert name in profile.rates_hz
    assert p.PROFILES["hr"].rates_hz[p.RR] is None  # an event series


# -- fuzzing ----------------------------------------------------------------------------------------

PARSERS = [
    p.parse_heart_rate, p.parse_plx_continuous, p.parse_plx_spot_check, p.parse_temperature,
    p.parse_blood_pressure, p.parse_battery_level, p.parse_utf8,
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_fuzz_every_parser_only_raises_format_errors(data: bytes) -> None:
    for parse in PARSERS:
        with contextlib.suppress(GattFormatError):
            parse(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(p.DECODERS)), st.binary(max_size=40))
def test_fuzz_readings_are_numbers_or_missing_with_a_reason(uuid: str, data: bytes) -> None:
    try:
        readings = p.decode(uuid, data)
    except GattFormatError:
        return
    assert readings
    for r in readings:
        assert r.metric in MDC
        assert r.offset_s <= 0.0
        if math.isnan(r.value):
            assert r.missing is not None
            assert r.quality & Quality.BAD_STATUS
        else:
            assert r.missing is None
            assert math.isfinite(r.value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_mit_annotation_reader(data: bytes) -> None:
    try:
        anns = read_mit_annotations(data)
    except CorruptDataError:
        return
    assert all(isinstance(a.sample, int) for a in anns)


# -- the simulated wearables' values decode as the profiles say ---------------------------------------


@pytest.mark.parametrize("profile", sorted(p.PROFILES))
def test_simulated_wearables_send_valid_measurements(profile: str) -> None:
    w = make_wearable(profile, seed=3)
    metrics: set[str] = set()
    for _ in range(10):
        for uuid, value in w.step():
            for r in p.decode(uuid, value):
                metrics.add(r.metric)
                assert math.isfinite(r.value)
    assert metrics >= set(p.PROFILES[profile].metrics) - {p.PERF}


def test_synthetic_strap_carries_ectopic_beats() -> None:
    beats = synthetic_beats(seed=5, count=2000, ectopic_per_min=2.0)
    assert any(b.symbol != "N" for b in beats)
    strap = HeartRateStrap(5, beats)
    rr_sent = [
        r.value for _ in range(300) for u, v in strap.step() for r in p.decode(u, v) if r.metric == p.RR
    ]
    assert strap.ectopic_sent > 0
    assert min(rr_sent) < 0.75 * max(rr_sent)


MITDB = DATA / "physio" / "mitdb_100"


def test_mit_annotation_reader_on_a_crafted_file() -> None:
    # N at 100, SKIP +70000, V 10 later, an AUX of 3 bytes (padded), NUM, end.
    words = [(1 << 10) | 100, 59 << 10]
    data = b"".join(w.to_bytes(2, "little") for w in words)
    skip = 70000
    data += (skip >> 16).to_bytes(2, "little") + (skip & 0xFFFF).to_bytes(2, "little")  # high word first
    data += ((5 << 10) | 10).to_bytes(2, "little")
    data += ((63 << 10) | 3).to_bytes(2, "little") + b"abc\x00"
    data += ((60 << 10) | 1).to_bytes(2, "little") + b"\x00\x00"
    anns = read_mit_annotations(data)
    assert [(a.sample, a.code) for a in anns] == [(100, 1), (70110, 5)]
    assert [round(b.rr_ms) for b in beats_from_annotations(anns, 1000.0)] == [70010]


@pytest.mark.skipif(
    not (MITDB / "100.atr").is_file(), reason=f"MIT-BIH record 100 not found under {DATA} (set EDGETWIN_DATA)"
)
def test_mit_bih_record_100_beats() -> None:
    anns = read_mit_annotations((MITDB / "100.atr").read_bytes())
    beats = beats_from_annotations(anns, 360.0)
    symbols = [b.symbol for b in beats]
    assert len(anns) == 2274
    assert (symbols.count("A"), symbols.count("V")) == (33, 1)
    assert beats[0].rr_ms == pytest.approx((370 - 77) / 360 * 1000)
