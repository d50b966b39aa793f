"""Bluetooth SIG GATT health profiles: bytes in, readings out. Pure: no I/O, no clock.

Covers Heart Rate Measurement (0x2A37), PLX Continuous (0x2A5F) and Spot-check (0x2A5E),
Temperature Measurement (0x2A1C), Blood Pressure Measurement (0x2A35), Battery Level (0x2A19) and
the Device Information strings, with IEEE 11073-20601 SFLOAT (16 bit) and FLOAT (32 bit) numbers.
All multi-byte fields are little-endian.

An SFLOAT/FLOAT special value (NaN, NRes, +INF, -INF, reserved) is never a number: it decodes to
NaN together with the reason, and the reading built from it carries ``Quality.BAD_STATUS``.
Malformed input raises :class:`GattFormatError`; nothing else escapes a parser.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from gateway.errors import CorruptDataError
from gateway.sample import Quality

# -- UUIDs -----------------------------------------------------------------------------------------

_BASE = "-0000-1000-8000-00805f9b34fb"


def uuid16(short: int) -> str:
    """The 128-bit string form of a 16-bit SIG UUID, lower case, as bleak reports it."""
    return f"0000{short:04x}{_BASE}"


HEART_RATE_SERVICE = uuid16(0x180D)
PULSE_OXIMETER_SERVICE = uuid16(0x1822)
HEALTH_THERMOMETER_SERVICE = uuid16(0x1809)
BLOOD_PRESSURE_SERVICE = uuid16(0x1810)
BATTERY_SERVICE = uuid16(0x180F)
DEVICE_INFORMATION_SERVICE = uuid16(0x180A)

HEART_RATE_MEASUREMENT = uuid16(0x2A37)
PLX_SPOT_CHECK = uuid16(0x2A5E)
PLX_CONTINUOUS = uuid16(0x2A5F)
PLX_FEATURES = uuid16(0x2A60)
TEMPERATURE_MEASUREMENT = uuid16(0x2A1C)
TEMPERATURE_TYPE = uuid16(0x2A1D)
INTERMEDIATE_TEMPERATURE = uuid16(0x2A1E)
BLOOD_PRESSURE_MEASUREMENT = uuid16(0x2A35)
BATTERY_LEVEL = uuid16(0x2A19)

#: Device Information characteristics (all UTF-8 strings): field name -> UUID.
DEVICE_INFORMATION: Mapping[str, str] = {
    "manufacturer": uuid16(0x2A29),
    "model": uuid16(0x2A24),
    "serial": uuid16(0x2A25),
    "hardware": uuid16(0x2A27),
    "firmware": uuid16(0x2A26),
    "software": uuid16(0x2A28),
}

#: Health services by the short token used in configs and listings.
HEALTH_SERVICES: Mapping[str, str] = {
    "heart_rate": HEART_RATE_SERVICE,
    "pulse_oximeter": PULSE_OXIMETER_SERVICE,
    "health_thermometer": HEALTH_THERMOMETER_SERVICE,
    "blood_pressure": BLOOD_PRESSURE_SERVICE,
    "battery": BATTERY_SERVICE,
    "device_information": DEVICE_INFORMATION_SERVICE,
}


def normalize_uuid(uuid: str) -> str:
    """A UUID in bleak's form: 16/32-bit short forms expanded, lower case."""
    u = uuid.strip().lower()
    u = u.removeprefix("0x")
    if len(u) in (4, 8) and all(c in "0123456789abcdef" for c in u):
        return f"{int(u, 16):08x}{_BASE}"
    return u


# -- errors and numbers ----------------------------------------------------------------------------


class GattFormatError(CorruptDataError):
    """A characteristic value does not follow its specification."""


class Special(enum.StrEnum):
    """Why an IEEE 11073 number carries no value."""

    NAN = "nan"  # not a number: the device has no value
    NRES = "nres"  # not at this resolution: the value does not fit the format
    POS_INF = "pos_inf"  # above the measurable range
    NEG_INF = "neg_inf"  # below the measurable range
    RESERVED = "reserved"  # a reserved code, read as no value


@dataclass(frozen=True, slots=True)
class Mder:
    """A decoded SFLOAT/FLOAT: ``value`` is NaN exactly when ``special`` says why."""

    value: float
    special: Special | None = None
    mantissa: int = 0
    exponent: int = 0

    @property
    def exact(self) -> Fraction:
        """The value as an exact fraction (mantissa x 10^exponent); only for non-special values."""
        return Fraction(self.mantissa) * Fraction(10) ** self.exponent


_SFLOAT_SPECIAL = {
    0x07FF: Special.NAN,
    0x0800: Special.NRES,
    0x07FE: Special.POS_INF,
    0x0802: Special.NEG_INF,
    0x0801: Special.RESERVED,
}
_FLOAT_SPECIAL = {
    0x007FFFFF: Special.NAN,
    0x00800000: Special.NRES,
    0x007FFFFE: Special.POS_INF,
    0x00800002: Special.NEG_INF,
    0x00800001: Special.RESERVED,
}


def _scaled(mantissa: int, exponent: int) -> float:
    # Dividing by an exact power of ten rounds once, so 366 x 10^-1 is the double nearest 36.6
    # (multiplying by 0.1 would round twice).
    scale: int = 10 ** abs(exponent)
    if exponent >= 0:
        return float(mantissa * scale)
    return mantissa / scale


def _signed(value: int, bits: int) -> int:
    """A ``bits``-wide two's-complement field as a Python int."""
    return value - (1 << bits) if value >> (bits - 1) else value


def _mder(raw: int, mantissa_bits: int, exponent_bits: int, specials: dict[int, Special]) -> Mder:
    """Decode an MDER number: signed exponent in the top bits, signed mantissa below it."""
    raw &= (1 << (mantissa_bits + exponent_bits)) - 1
    special = specials.get(raw)
    if special is not None:
        return Mder(math.nan, special)
    mantissa = _signed(raw & ((1 << mantissa_bits) - 1), mantissa_bits)
    exponent = _signed(raw >> mantissa_bits, exponent_bits)
    return Mder(_scaled(mantissa, exponent), None, mantissa, exponent)


def sfloat(raw: int) -> Mder:
    """Decode a 16-bit SFLOAT: signed 4-bit exponent (top nibble), signed 12-bit mantissa."""
    return _mder(raw, 12, 4, _SFLOAT_SPECIAL)


def float32(raw: int) -> Mder:
    """Decode a 32-bit FLOAT: signed 8-bit exponent (top byte), signed 24-bit mantissa."""
    return _mder(raw, 24, 8, _FLOAT_SPECIAL)


def encode_sfloat(mantissa: int, exponent: int) -> bytes:
    """Encode an SFLOAT (for simulated peripherals and tests); range-checked."""
    if not (-2048 <= mantissa <= 2047 and -8 <= exponent <= 7):
        raise ValueError(f"SFLOAT: mantissa {mantissa} / exponent {exponent} out of range")
    return struct.pack("<H", ((exponent & 0xF) << 12) | (mantissa & 0x0FFF))


def encode_float32(mantissa: int, exponent: int) -> bytes:
    """Encode a FLOAT (for simulated peripherals and tests); range-checked."""
    if not (-(1 << 23) <= mantissa < (1 << 23) and -128 <= exponent <= 127):
        raise ValueError(f"FLOAT: mantissa {mantissa} / exponent {exponent} out of range")
    return struct.pack("<I", ((exponent & 0xFF) << 24) | (mantissa & 0xFFFFFF))


#: Raw special codes, for simulated peripherals and tests.
SFLOAT_NAN = b"\xff\x07"
FLOAT_NAN = b"\xff\xff\x7f\x00"


# -- a cursor over the value -----------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "name", "pos")

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.name = name
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise GattFormatError(
                f"{self.name}: value of {len(self.data)} bytes ends before {what} "
                f"(needs bytes {self.pos}..{end - 1}): the device sent a truncated value"
            )
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u24(self, what: str) -> int:
        return int.from_bytes(self.take(3, what), "little")

    def sfloat(self, what: str) -> Mder:
        return sfloat(self.u16(what))

    def float32(self, what: str) -> Mder:
        return float32(int.from_bytes(self.take(4, what), "little"))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


@dataclass(frozen=True, slots=True)
class DateTime:
    """A GATT Date Time (0x2A08): device local time, no zone; zero fields mean unknown."""

    year: int
    month: int
    day: int
    hours: int
    minutes: int
    seconds: int

    @property
    def known(self) -> bool:
        """True when every field is set and in range (year 1582..9999 per the specification)."""
        return (
            1582 <= self.year <= 9999
            and 1 <= self.month <= 12
            and 1 <= self.day <= 31
            and 0 <= self.hours <= 23
            and 0 <= self.minutes <= 59
            and 0 <= self.seconds <= 59
        )

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        """(year, month, day, hours, minutes, seconds)."""
        return (self.year, self.month, self.day, self.hours, self.minutes, self.seconds)

    def encode(self) -> bytes:
        """The 7-byte wire form."""
        return struct.pack("<HBBBBB", *self.as_tuple())


def _date_time(r: _Reader) -> DateTime:
    year = r.u16("the timestamp year")
    month, day, hours, minutes, seconds = r.take(5, "the timestamp")
    return DateTime(year, month, day, hours, minutes, seconds)


# -- Heart Rate Measurement 0x2A37 -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeartRate:
    """A Heart Rate Measurement."""

    bpm: int
    contact_supported: bool
    contact: bool | None  # None when the strap cannot tell
    energy_kj: int | None
    rr_ms: tuple[float, ...]  # oldest first


def parse_heart_rate(data: bytes) -> HeartRate:
    """Decode 0x2A37: flags, HR (uint8/uint16), optional energy (kJ), RR intervals (1/1024 s)."""
    r = _Reader(bytes(data), "heart rate measurement")
    flags = r.u8("the flags")
    bpm = r.u16("the heart rate") if flags & 0x01 else r.u8("the heart rate")
    supported = bool(flags & 0x04)
    contact = bool(flags & 0x02) if supported else None
    energy = r.u16("the energy expended") if flags & 0x08 else None
    rr: tuple[float, ...] = ()
    if flags & 0x10:
        if r.left % 2:
            raise GattFormatError(
                f"heart rate measurement: {r.left} bytes of RR intervals is not a whole number of "
                "uint16 values: the device sent a malformed value"
            )
        # 1/1024 s -> ms is x 125/128: exact in binary floating point.
        rr = tuple(r.u16("an RR interval") * 125 / 128 for _ in range(r.left // 2))
    return HeartRate(bpm, supported, contact, energy, rr)


def encode_heart_rate(
    bpm: int,
    *,
    contact: bool | None = True,
    energy_kj: int | None = None,
    rr_1024: tuple[int, ...] = (),
) -> bytes:
    """Build a 0x2A37 value (for simulated peripherals and tests)."""
    flags = 0
    body = b""
    if bpm > 0xFF:
        flags |= 0x01
        body += struct.pack("<H", bpm)
    else:
        body += struct.pack("<B", bpm)
    if contact is not None:
        flags |= 0x04 | (0x02 if contact else 0)
    if energy_kj is not None:
        flags |= 0x08
        body += struct.pack("<H", energy_kj)
    if rr_1024:
        flags |= 0x10
        body += struct.pack(f"<{len(rr_1024)}H", *rr_1024)
    return bytes([flags]) + body


# -- Pulse oximeter 0x2A5F / 0x2A5E ----------------------------------------------------------------


class PlxMeasurementStatus(enum.IntFlag):
    """PLX Measurement Status (uint16)."""

    ONGOING = 1 << 5
    EARLY_ESTIMATE = 1 << 6
    VALIDATED = 1 << 7
    FULLY_QUALIFIED = 1 << 8
    FROM_STORAGE = 1 << 9
    DEMO = 1 << 10
    TESTING = 1 << 11
    CALIBRATING = 1 << 12
    UNAVAILABLE = 1 << 13
    QUESTIONABLE = 1 << 14
    INVALID = 1 << 15


class PlxSensorStatus(enum.IntFlag):
    """PLX Device and Sensor Status (uint24)."""

    EXTENDED_DISPLAY_UPDATE = 1 << 0
    EQUIPMENT_MALFUNCTION = 1 << 1
    SIGNAL_PROCESSING_IRREGULARITY = 1 << 2
    INADEQUATE_SIGNAL = 1 << 3
    POOR_SIGNAL = 1 << 4
    LOW_PERFUSION = 1 << 5
    ERRATIC_SIGNAL = 1 << 6
    NON_PULSATILE = 1 << 7
    QUESTIONABLE_PULSE = 1 << 8
    SIGNAL_ANALYSIS_ONGOING = 1 << 9
    INTERFERENCE = 1 << 10
    SENSOR_UNCONNECTED = 1 << 11
    UNKNOWN_SENSOR = 1 << 12
    SENSOR_DISPLACED = 1 << 13
    SENSOR_MALFUNCTION = 1 << 14
    SENSOR_DISCONNECTED = 1 << 15


@dataclass(frozen=True, slots=True)
class Plx:
    """A PLX Continuous or Spot-check measurement."""

    spo2: Mder
    pr: Mder
    spot_check: bool
    timestamp: DateTime | None = None
    fast: tuple[Mder, Mder] | None = None  # continuous only: (SpO2, PR) fast response
    slow: tuple[Mder, Mder] | None = None  # continuous only: (SpO2, PR) slow response
    measurement_status: PlxMeasurementStatus | None = None
    sensor_status: PlxSensorStatus | None = None
    pai: Mder | None = None  # pulse amplitude index, %
    clock_not_set: bool = False  # spot-check only


def parse_plx_continuous(data: bytes) -> Plx:
    """Decode 0x2A5F."""
    r = _Reader(bytes(data), "PLX continuous measurement")
    flags = r.u8("the flags")
    spo2 = r.sfloat("SpO2")
    pr = r.sfloat("the pulse rate")
    fast = (r.sfloat("fast SpO2"), r.sfloat("fast pulse rate")) if flags & 0x01 else None
    slow = (r.sfloat("slow SpO2"), r.sfloat("slow pulse rate")) if flags & 0x02 else None
    ms = PlxMeasurementStatus(r.u16("the measurement status") & 0xFFE0) if flags & 0x04 else None
    dss = PlxSensorStatus(r.u24("the device and sensor status") & 0xFFFF) if flags & 0x08 else None
    pai = r.sfloat("the pulse amplitude index") if flags & 0x10 else None
    return Plx(spo2, pr, False, None, fast, slow, ms, dss, pai)


def parse_plx_spot_check(data: bytes) -> Plx:
    """Decode 0x2A5E."""
    r = _Reader(bytes(data), "PLX spot-check measurement")
    flags = r.u8("the flags")
    spo2 = r.sfloat("SpO2")
    pr = r.sfloat("the pulse rate")
    ts = _date_time(r) if flags & 0x01 else None
    ms = PlxMeasurementStatus(r.u16("the measurement status") & 0xFFE0) if flags & 0x02 else None
    dss = PlxSensorStatus(r.u24("the device and sensor status") & 0xFFFF) if flags & 0x04 else None
    pai = r.sfloat("the pulse amplitude index") if flags & 0x08 else None
    return Plx(spo2, pr, True, ts, None, None, ms, dss, pai, bool(flags & 0x10))


def encode_plx_continuous(
    spo2: bytes,
    pr: bytes,
    *,
    measurement_status: int | None = None,
    sensor_status: int | None = None,
    pai: bytes | None = None,
) -> bytes:
    """Build a 0x2A5F value from encoded SFLOATs (for simulated peripherals and tests)."""
    flags = 0
    body = spo2 + pr
    if measurement_status is not None:
        flags |= 0x04
        body += struct.pack("<H", measurement_status)
    if sensor_status is not None:
        flags |= 0x08
        body += (sensor_status & 0xFFFFFF).to_bytes(3, "little")
    if pai is not None:
        flags |= 0x10
        body += pai
    return bytes([flags]) + body


def encode_plx_spot_check(
    spo2: bytes,
    pr: bytes,
    *,
    timestamp: DateTime | None = None,
    sensor_status: int | None = None,
    pai: bytes | None = None,
) -> bytes:
    """Build a 0x2A5E value from encoded SFLOATs (for simulated peripherals and tests)."""
    flags = 0
    body = spo2 + pr
    if timestamp is not None:
        flags |= 0x01
        body += timestamp.encode()
    if sensor_status is not None:
        flags |= 0x04
        body += (sensor_status & 0xFFFFFF).to_bytes(3, "little")
    if pai is not None:
        flags |= 0x08
        body += pai
    return bytes([flags]) + body


# -- Temperature Measurement 0x2A1C ----------------------------------------------------------------


class TemperatureType(enum.IntEnum):
    """Where a temperature was taken (Temperature Type, 0x2A1D)."""

    ARMPIT = 1
    BODY = 2
    EAR = 3
    FINGER = 4
    GI_TRACT = 5
    MOUTH = 6
    RECTUM = 7
    TOE = 8
    TYMPANUM = 9


@dataclass(frozen=True, slots=True)
class Temperature:
    """A Temperature Measurement, in the unit the device used."""

    value: Mder
    fahrenheit: bool
    timestamp: DateTime | None
    site: TemperatureType | int | None  # an unknown code is kept as its number

    @property
    def unit(self) -> str:
        """UCUM unit of ``value``."""
        return "[degF]" if self.fahrenheit else "Cel"

    @property
    def celsius(self) -> float:
        """The value in degrees Celsius (NaN when the device sent none), exactly rounded once."""
        if self.value.special is not None:
            return math.nan
        if not self.fahrenheit:
            return self.value.value
        return float((self.value.exact - 32) * Fraction(5, 9))


def parse_temperature(data: bytes) -> Temperature:
    """Decode 0x2A1C (and Intermediate Temperature 0x2A1E, same layout)."""
    r = _Reader(bytes(data), "temperature measurement")
    flags = r.u8("the flags")
    value = r.float32("the temperature")
    ts = _date_time(r) if flags & 0x02 else None
    site: TemperatureType | int | None = None
    if flags & 0x04:
        code = r.u8("the temperature type")
        site = TemperatureType(code) if code in TemperatureType._value2member_map_ else code
    return Temperature(value, bool(flags & 0x01), ts, site)


def encode_temperature(
    value: bytes, *, fahrenheit: bool = False, timestamp: DateTime | None = None, site: int | None = None
) -> bytes:
    """Build a 0x2A1C value from an encoded FLOAT (for simulated peripherals and tests)."""
    flags = 0x01 if fahrenheit else 0
    body = value
    if timestamp is not None:
        flags |= 0x02
        body += timestamp.encode()
    if site is not None:
        flags |= 0x04
        body += bytes([site])
    return bytes([flags]) + body


# -- Blood Pressure Measurement 0x2A35 -------------------------------------------------------------


class BpStatus(enum.IntFlag):
    """Blood Pressure Measurement Status (uint16)."""

    BODY_MOVEMENT = 1 << 0
    CUFF_TOO_LOOSE = 1 << 1
    IRREGULAR_PULSE = 1 << 2
    PULSE_ABOVE_RANGE = 1 << 3  # PR range bits 3-4 = 01
    PULSE_BELOW_RANGE = 1 << 4  # PR range bits 3-4 = 10
    IMPROPER_POSITION = 1 << 5


#: mmHg per kPa, exactly: 760 mmHg = 101.325 kPa.
MMHG_PER_KPA = Fraction(760_000, 101_325)


@dataclass(frozen=True, slots=True)
class BloodPressure:
    """A Blood Pressure Measurement, in the unit the device used."""

    systolic: Mder
    diastolic: Mder
    mean: Mder
    kpa: bool
    timestamp: DateTime | None
    pulse_rate: Mder | None
    user_id: int | None  # 0xFF: unknown user
    status: BpStatus | None

    @property
    def unit(self) -> str:
        """UCUM unit of the pressures."""
        return "kPa" if self.kpa else "mm[Hg]"

    def mmhg(self, v: Mder) -> float:
        """One of this measurement's pressures in mmHg (NaN when the device sent none)."""
        if v.special is not None:
            return math.nan
        return float(v.exact * MMHG_PER_KPA) if self.kpa else v.value


def parse_blood_pressure(data: bytes) -> BloodPressure:
    """Decode 0x2A35 (and Intermediate Cuff Pressure 0x2A36, same layout)."""
    r = _Reader(bytes(data), "blood pressure measurement")
    flags = r.u8("the flags")
    sys_ = r.sfloat("the systolic pressure")
    dia = r.sfloat("the diastolic pressure")
    mean = r.sfloat("the mean arterial pressure")
    ts = _date_time(r) if flags & 0x02 else None
    pr = r.sfloat("the pulse rate") if flags & 0x04 else None
    user = r.u8("the user id") if flags & 0x08 else None
    status = BpStatus(r.u16("the measurement status") & 0x3F) if flags & 0x10 else None
    return BloodPressure(sys_, dia, mean, bool(flags & 0x01), ts, pr, user, status)


def encode_blood_pressure(
    systolic: bytes,
    diastolic: bytes,
    mean: bytes,
    *,
    kpa: bool = False,
    timestamp: DateTime | None = None,
    pulse_rate: bytes | None = None,
    user_id: int | None = None,
    status: int | None = None,
) -> bytes:
    """Build a 0x2A35 value from encoded SFLOATs (for simulated peripherals and tests)."""
    flags = 0x01 if kpa else 0
    body = systolic + diastolic + mean
    if timestamp is not None:
        flags |= 0x02
        body += timestamp.encode()
    if pulse_rate is not None:
        flags |= 0x04
        body += pulse_rate
    if user_id is not None:
        flags |= 0x08
        body += bytes([user_id])
    if status is not None:
        flags |= 0x10
        body += struct.pack("<H", status)
    return bytes([flags]) + body


# -- Battery and Device Information ----------------------------------------------------------------


def parse_battery_level(data: bytes) -> int:
    """Decode Battery Level 0x2A19: percent, 0..100."""
    b = bytes(data)
    if len(b) < 1:
        raise GattFormatError("battery level: empty value: the device sent no level")
    if b[0] > 100:
        raise GattFormatError(f"battery level: {b[0]} % is above 100: the device sent an invalid level")
    return b[0]


def parse_utf8(data: bytes) -> str:
    """Decode a Device Information string: UTF-8, possibly NUL-padded; undecodable bytes replaced."""
    return bytes(data).split(b"\x00", 1)[0].decode("utf-8", errors="replace").strip()


# -- readings: what the gateway makes of a measurement ---------------------------------------------

HR = "MDC_ECG_HEART_RATE"
RR = "MDC_ECG_TIME_PD_RR_GL"
SPO2 = "MDC_PULS_OXIM_SAT_O2"
PULSE = "MDC_PULS_OXIM_PULS_RATE"
PERF = "MDC_PULS_OXIM_PERF_REL"
TEMP = "MDC_TEMP_BODY"
SYS = "MDC_PRESS_BLD_NONINV_SYS"
DIA = "MDC_PRESS_BLD_NONINV_DIA"
MEAN = "MDC_PRESS_BLD_NONINV_MEAN"
BP_PULSE = "MDC_PULS_RATE_NON_INV"
#: Battery Level 0x2A19 as a stream (the IEEE 11073-10101 attribute's name; no code is claimed).
BATTERY = "MDC_ATTR_VAL_BATT_CHARGE"


@dataclass(frozen=True, slots=True)
class Reading:
    """One value for one metric; ``offset_s`` <= 0 places it before the value's reception."""

    metric: str  # key of gateway.sample.MDC
    value: float  # NaN when the device sent no value
    quality: Quality = Quality.GOOD
    missing: Special | None = None  # why value is NaN
    offset_s: float = 0.0
    device_time: DateTime | None = None


def _plx_measurement_quality(ms: PlxMeasurementStatus | None) -> Quality:
    q = Quality.GOOD
    if ms is None:
        return q
    if ms & (PlxMeasurementStatus.UNAVAILABLE | PlxMeasurementStatus.INVALID):
        q |= Quality.BAD_STATUS
    # Demo, testing and calibration output is not a measurement of the patient.
    if ms & (PlxMeasurementStatus.DEMO | PlxMeasurementStatus.TESTING | PlxMeasurementStatus.CALIBRATING):
        q |= Quality.BAD_STATUS
    if ms & (
        PlxMeasurementStatus.QUESTIONABLE | PlxMeasurementStatus.EARLY_ESTIMATE | PlxMeasurementStatus.ONGOING
    ):
        q |= Quality.UNCERTAIN
    return q


_SENSOR_OFF_BITS = (
    PlxSensorStatus.SENSOR_UNCONNECTED
    | PlxSensorStatus.SENSOR_DISPLACED
    | PlxSensorStatus.SENSOR_DISCONNECTED
)
_BAD_BITS = (
    PlxSensorStatus.EQUIPMENT_MALFUNCTION
    | PlxSensorStatus.SENSOR_MALFUNCTION
    | PlxSensorStatus.UNKNOWN_SENSOR
)
_ARTIFACT_BITS = (
    PlxSensorStatus.SIGNAL_PROCESSING_IRREGULARITY
    | PlxSensorStatus.ERRATIC_SIGNAL
    | PlxSensorStatus.NON_PULSATILE
    | PlxSensorStatus.INTERFERENCE
)
_UNCERTAIN_BITS = (
    PlxSensorStatus.INADEQUATE_SIGNAL
    | PlxSensorStatus.POOR_SIGNAL
    | PlxSensorStatus.QUESTIONABLE_PULSE
    | PlxSensorStatus.SIGNAL_ANALYSIS_ONGOING
)


def plx_sensor_quality(dss: PlxSensorStatus | None) -> Quality:
    """Quality flags for a PLX Device and Sensor Status."""
    q = Quality.GOOD
    if dss is None:
        return q
    if dss & _SENSOR_OFF_BITS:
        q |= Quality.SENSOR_OFF
    if dss & _BAD_BITS:
        q |= Quality.BAD_STATUS
    if dss & _ARTIFACT_BITS:
        q |= Quality.ARTIFACT
    if dss & PlxSensorStatus.LOW_PERFUSION:
        q |= Quality.LOW_PERFUSION
    if dss & _UNCERTAIN_BITS:
        q |= Quality.UNCERTAIN
    return q


def _reading(metric: str, v: Mder, q: Quality, ts: DateTime | None = None) -> Reading:
    if v.special is not None:
        return Reading(metric, math.nan, q | Quality.BAD_STATUS, v.special, 0.0, ts)
    return Reading(metric, v.value, q, None, 0.0, ts)


def _value_reading(
    metric: str, value: float, special: Special | None, q: Quality, ts: DateTime | None
) -> Reading:
    if special is not None:
        return Reading(metric, math.nan, q | Quality.BAD_STATUS, special, 0.0, ts)
    return Reading(metric, value, q, None, 0.0, ts)


def heart_rate_readings(m: HeartRate) -> tuple[Reading, ...]:
    """HR now, and one RR reading per interval placed at its beat (the last one at reception)."""
    q = Quality.SENSOR_OFF if m.contact is False else Quality.GOOD
    beats: list[Reading] = []
    end = 0.0
    for rr in reversed(m.rr_ms):
        beats.append(Reading(RR, rr, q, None, end))
        end -= rr / 1000.0
    # Oldest first, so every stream's samples arrive in time order.
    return (Reading(HR, float(m.bpm), q), *reversed(beats))


def plx_readings(m: Plx) -> tuple[Reading, ...]:
    """SpO2, pulse rate and (when sent) perfusion, flagged by the measurement and sensor status."""
    q = _plx_measurement_quality(m.measurement_status) | plx_sensor_quality(m.sensor_status)
    out = [_reading(SPO2, m.spo2, q, m.timestamp), _reading(PULSE, m.pr, q, m.timestamp)]
    if m.pai is not None:
        out.append(_reading(PERF, m.pai, q, m.timestamp))
    return tuple(out)


def temperature_readings(m: Temperature) -> tuple[Reading, ...]:
    """Body temperature in Cel (Fahrenheit converted)."""
    return (_value_reading(TEMP, m.celsius, m.value.special, Quality.GOOD, m.timestamp),)


def bp_quality(status: BpStatus | None) -> tuple[Quality, Quality]:
    """Quality flags (pressures, pulse rate) for a blood-pressure measurement status."""
    q = Quality.GOOD
    if status is None:
        return q, q
    if status & BpStatus.BODY_MOVEMENT:
        q |= Quality.ARTIFACT
    if status & (BpStatus.CUFF_TOO_LOOSE | BpStatus.IMPROPER_POSITION):
        q |= Quality.UNCERTAIN
    pr_q = q
    # An irregular pulse is a finding about the patient, not a fault of the cuff: no flag.
    if status & (BpStatus.PULSE_ABOVE_RANGE | BpStatus.PULSE_BELOW_RANGE):
        pr_q |= Quality.UNCERTAIN
    return q, pr_q


def blood_pressure_readings(m: BloodPressure) -> tuple[Reading, ...]:
    """Systolic, diastolic, mean in mmHg (kPa converted) and the pulse rate when sent."""
    q, pr_q = bp_quality(m.status)
    ts = m.timestamp
    out = [
        _value_reading(SYS, m.mmhg(m.systolic), m.systolic.special, q, ts),
        _value_reading(DIA, m.mmhg(m.diastolic), m.diastolic.special, q, ts),
        _value_reading(MEAN, m.mmhg(m.mean), m.mean.special, q, ts),
    ]
    if m.pulse_rate is not None:
        out.append(_reading(BP_PULSE, m.pulse_rate, pr_q, ts))
    return tuple(out)


#: Measurement characteristic -> bytes -> readings.
DECODERS: Mapping[str, Callable[[bytes], tuple[Reading, ...]]] = {
    HEART_RATE_MEASUREMENT: lambda d: heart_rate_readings(parse_heart_rate(d)),
    PLX_CONTINUOUS: lambda d: plx_readings(parse_plx_continuous(d)),
    PLX_SPOT_CHECK: lambda d: plx_readings(parse_plx_spot_check(d)),
    TEMPERATURE_MEASUREMENT: lambda d: temperature_readings(parse_temperature(d)),
    BLOOD_PRESSURE_MEASUREMENT: lambda d: blood_pressure_readings(parse_blood_pressure(d)),
}


def decode(char_uuid: str, data: bytes) -> tuple[Reading, ...]:
    """Readings of one measurement value; GattFormatError when it is malformed or unknown."""
    decoder = DECODERS.get(char_uuid)
    if decoder is None:
        raise GattFormatError(f"characteristic {char_uuid}: not a health measurement this driver decodes")
    return decoder(data)


# -- profiles --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Profile:
    """A wearable kind: the service it must offer, what to subscribe to, what it yields."""

    name: str  # config token: "hr", "plx", "thermo", "bp"
    service: str
    measurements: tuple[str, ...]  # subscribed where present; at least one must be
    metrics: tuple[str, ...]  # MDC names produced; the first one is the device's headline stream
    rates_hz: Mapping[str, float | None]  # nominal rate per metric; None for event series


PROFILES: Mapping[str, Profile] = {
    "hr": Profile("hr", HEART_RATE_SERVICE, (HEART_RATE_MEASUREMENT,), (HR, RR), {HR: 1.0, RR: None}),
    "plx": Profile(
        "plx",
        PULSE_OXIMETER_SERVICE,
        (PLX_CONTINUOUS, PLX_SPOT_CHECK),
        (SPO2, PULSE, PERF),
        {SPO2: 1.0, PULSE: 1.0, PERF: 1.0},
    ),
    "thermo": Profile(
        "thermo", HEALTH_THERMOMETER_SERVICE, (TEMPERATURE_MEASUREMENT,), (TEMP,), {TEMP: None}
    ),
    "bp": Profile(
        "bp",
        BLOOD_PRESSURE_SERVICE,
        (BLOOD_PRESSURE_MEASUREMENT,),
        (SYS, DIA, MEAN, BP_PULSE),
        {SYS: None, DIA: None, MEAN: None, BP_PULSE: None},
    ),
}

#: Service UUID -> profile token, for listings.
PROFILE_BY_SERVICE: Mapping[str, str] = {p.service: p.name for p in PROFILES.values()}
