"""What the simulated wearables measure: pure, seeded value generators, one per profile.

The heart-rate strap beats either from a built-in rhythm (sinus rhythm with respiratory variation
and occasional premature beats followed by a compensatory pause) or from the beat annotations of
MIT-BIH Arrhythmia Database record 100 (normal beats, 33 atrial premature beats, 1 premature
ventricular contraction), read from its ``.atr`` file with :func:`read_mit_annotations`.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from drivers.ble.protocol import (
    BLOOD_PRESSURE_MEASUREMENT,
    HEART_RATE_MEASUREMENT,
    PLX_CONTINUOUS,
    PLX_SPOT_CHECK,
    SFLOAT_NAN,
    TEMPERATURE_MEASUREMENT,
    BpStatus,
    DateTime,
    PlxMeasurementStatus,
    PlxSensorStatus,
    TemperatureType,
    encode_blood_pressure,
    encode_float32,
    encode_heart_rate,
    encode_plx_continuous,
    encode_plx_spot_check,
    encode_sfloat,
    encode_temperature,
)
from gateway.errors import CorruptDataError

# -- MIT format annotations ------------------------------------------------------------------------

_SKIP, _NUM, _SUB, _CHN, _AUX = 59, 60, 61, 62, 63
#: Annotation codes that mark a beat (WFDB's isqrs table).
BEAT_CODES = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 25, 30, 34, 35, 38, 41})
#: WFDB mnemonics of the beat codes met in the arrhythmia database.
BEAT_SYMBOLS = {
    1: "N",
    2: "L",
    3: "R",
    4: "a",
    5: "V",
    6: "F",
    7: "J",
    8: "A",
    9: "S",
    10: "E",
    11: "j",
    12: "/",
    13: "Q",
    25: "B",
    30: "?",
    34: "e",
    35: "n",
    38: "f",
    41: "r",
}


@dataclass(frozen=True, slots=True)
class Annotation:
    """One annotation: sample number and code (aux text is skipped)."""

    sample: int
    code: int


def read_mit_annotations(data: bytes) -> list[Annotation]:
    """Decode a WFDB annotation file in MIT format (16-bit little-endian words: 6-bit code, 10-bit step)."""
    out: list[Annotation] = []
    pos = 0
    t = 0
    n = len(data)
    while pos + 2 <= n:
        word = data[pos] | (data[pos + 1] << 8)
        pos += 2
        code, step = word >> 10, word & 0x3FF
        if code == 0 and step == 0:
            return out
        if code == _SKIP:
            if pos + 4 > n:
                break
            # The 32-bit interval is stored high 16-bit word first, each word little-endian.
            hi = data[pos] | (data[pos + 1] << 8)
            lo = data[pos + 2] | (data[pos + 3] << 8)
            pos += 4
            skip = (hi << 16) | lo
            if skip >= 1 << 31:
                skip -= 1 << 32
            t += skip
        elif code == _AUX:
            pos += step + (step & 1)
        elif code in (_NUM, _SUB, _CHN):
            continue
        else:
            t += step
            out.append(Annotation(t, code))
    if pos < n:
        raise CorruptDataError(
            f"MIT annotations: file ends inside an annotation at byte {pos} of {n}: the file is truncated"
        )
    return out


@dataclass(frozen=True, slots=True)
class Beat:
    """One heartbeat: RR interval before it (ms) and its WFDB symbol."""

    rr_ms: float
    symbol: str


def beats_from_annotations(annotations: Sequence[Annotation], fs_hz: float) -> list[Beat]:
    """RR intervals between consecutive beat annotations."""
    beats = [a for a in annotations if a.code in BEAT_CODES]
    return [
        Beat((b.sample - a.sample) * 1000.0 / fs_hz, BEAT_SYMBOLS.get(b.code, "?"))
        for a, b in itertools.pairwise(beats)
    ]


def load_record_beats(record_dir: Path, record: str = "100") -> list[Beat]:
    """Beats of a WFDB record: sampling rate from its header, beats from its ``.atr`` file."""
    header = (record_dir / f"{record}.hea").read_text(encoding="ascii").split("\n")
    first = next(line for line in header if line.strip() and not line.startswith("#"))
    fields = first.split()
    fs = float(fields[2].split("/")[0]) if len(fields) > 2 else 250.0
    return beats_from_annotations(read_mit_annotations((record_dir / f"{record}.atr").read_bytes()), fs)


def synthetic_beats(seed: int, count: int = 4000, ectopic_per_min: float = 1.0) -> list[Beat]:
    """A sinus rhythm near 72/min with respiratory variation and occasional premature beats."""
    rng = random.Random(seed)
    beats: list[Beat] = []
    t = 0.0
    base = 60000.0 / rng.uniform(64, 78)
    while len(beats) < count:
        rr = base * (1 + 0.04 * math.sin(2 * math.pi * t / 4.2) + 0.02 * math.sin(2 * math.pi * t / 10.0))
        rr += rng.gauss(0, 12)
        if rng.random() < ectopic_per_min * rr / 60000.0:
            # A premature beat followed by a compensatory pause.
            early = rr * rng.uniform(0.55, 0.7)
            beats.append(Beat(early, "A" if rng.random() < 0.8 else "V"))
            beats.append(Beat(2 * rr - early, "N"))
            t += 2 * rr / 1000.0
            continue
        beats.append(Beat(rr, "N"))
        t += rr / 1000.0
    return beats


# -- profiles --------------------------------------------------------------------------------------


def _local_now() -> DateTime:
    tm = time.localtime()
    return DateTime(tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec)


def _sfloat1(value: float) -> bytes:
    """An SFLOAT with one decimal."""
    return encode_sfloat(round(value * 10), -1)


class Wearable:
    """Base of the simulated wearables: ``step(dt)`` advances time and returns values to push."""

    profile = ""
    measurement = ""
    period_s = 1.0

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.sensor_on = True

    def step(self) -> list[tuple[str, bytes]]:
        """Values due for one period: (characteristic UUID, value)."""
        raise NotImplementedError


class HeartRateStrap(Wearable):
    """Heart-rate strap: one notification per second with the RR intervals of the beats in it."""

    profile = "hr"
    measurement = HEART_RATE_MEASUREMENT

    def __init__(self, seed: int, beats: Sequence[Beat] | None = None) -> None:
        super().__init__(seed)
        self.beats = list(beats) if beats else synthetic_beats(seed)
        self._iter = self._cycle()
        self._t = 0.0  # simulated seconds
        self._next_beat = 0.0
        self._recent: list[float] = []
        self.energy_kj = 0
        self.ectopic_sent = 0

    def _cycle(self) -> Iterator[Beat]:
        while True:
            yield from self.beats

    def step(self) -> list[tuple[str, bytes]]:
        """One notification: HR from the last beats, RR of the beats within this second."""
        self._t += self.period_s
        rr_units: list[int] = []
        while self._next_beat <= self._t:
            beat = next(self._iter)
            rr_units.append(max(1, min(0xFFFF, round(beat.rr_ms * 1024 / 1000))))
            if beat.symbol != "N":
                self.ectopic_sent += 1
            self._recent = [*self._recent[-7:], beat.rr_ms]
            self._next_beat += beat.rr_ms / 1000.0
        if not self._recent:
            return []
        bpm = round(60000.0 / (sum(self._recent) / len(self._recent)))
        if not self.sensor_on:
            # Off the skin the electrodes pick up motion, not beats: the strap still notifies, with
            # the contact bit cleared and a rate that is noise (a gateway that ignored the bit would
            # follow it).
            bpm = self.rng.randint(30, 200)
        if self._t % 10 < self.period_s:
            self.energy_kj += 1
        value = encode_heart_rate(
            max(0, min(255, bpm)),
            contact=self.sensor_on,
            energy_kj=self.energy_kj if self._t % 10 < self.period_s else None,
            # Eight intervals fit a 20-byte notification with the flags and HR.
            rr_1024=tuple(rr_units[-8:]) if self.sensor_on else (),
        )
        return [(HEART_RATE_MEASUREMENT, value)]


class PulseOximeter(Wearable):
    """Pulse oximeter: PLX Continuous every second; spot-checks on request."""

    profile = "plx"
    measurement = PLX_CONTINUOUS

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.spo2 = self.rng.uniform(96.0, 98.5)
        self.pr = self.rng.uniform(64, 80)

    def _now(self) -> tuple[float, float, float]:
        self.spo2 = min(100.0, max(88.0, self.spo2 + self.rng.gauss(0, 0.15) + (97.0 - self.spo2) * 0.05))
        self.pr = max(40.0, self.pr + self.rng.gauss(0, 0.6) + (72.0 - self.pr) * 0.05)
        return round(self.spo2), round(self.pr), round(self.rng.uniform(2.0, 6.0), 1)

    def step(self) -> list[tuple[str, bytes]]:
        """One PLX Continuous value."""
        spo2, pr, pai = self._now()
        if not self.sensor_on:
            value = encode_plx_continuous(
                SFLOAT_NAN,
                SFLOAT_NAN,
                measurement_status=int(PlxMeasurementStatus.UNAVAILABLE),
                sensor_status=int(PlxSensorStatus.SENSOR_DISCONNECTED),
            )
        else:
            value = encode_plx_continuous(
                encode_sfloat(int(spo2), 0),
                encode_sfloat(int(pr), 0),
                measurement_status=int(PlxMeasurementStatus.VALIDATED),
                sensor_status=0,
                pai=_sfloat1(pai),
            )
        return [(PLX_CONTINUOUS, value)]

    def spot_check(self) -> tuple[str, bytes]:
        """One timestamped PLX Spot-check value."""
        spo2, pr, pai = self._now()
        return (
            PLX_SPOT_CHECK,
            encode_plx_spot_check(
                encode_sfloat(int(spo2), 0),
                encode_sfloat(int(pr), 0),
                timestamp=_local_now(),
                pai=_sfloat1(pai),
            ),
        )


class Thermometer(Wearable):
    """Thermometer patch: one indicated, timestamped body temperature every few seconds."""

    profile = "thermo"
    measurement = TEMPERATURE_MEASUREMENT
    period_s = 5.0

    def __init__(self, seed: int, fahrenheit: bool = False) -> None:
        super().__init__(seed)
        self.fahrenheit = fahrenheit
        self.celsius = self.rng.uniform(36.6, 37.1)

    def step(self) -> list[tuple[str, bytes]]:
        """One Temperature Measurement."""
        self.celsius = min(41.0, max(35.0, self.celsius + self.rng.gauss(0, 0.03)))
        shown = self.celsius * 9 / 5 + 32 if self.fahrenheit else self.celsius
        value = encode_temperature(
            encode_float32(round(shown * 10), -1),
            fahrenheit=self.fahrenheit,
            timestamp=_local_now(),
            site=int(TemperatureType.BODY),
        )
        return [(TEMPERATURE_MEASUREMENT, value)]


class BloodPressureCuff(Wearable):
    """Blood-pressure cuff: one indicated, timestamped measurement per cycle."""

    profile = "bp"
    measurement = BLOOD_PRESSURE_MEASUREMENT
    period_s = 30.0

    def step(self) -> list[tuple[str, bytes]]:
        """One Blood Pressure Measurement."""
        sys_ = round(self.rng.gauss(122, 5))
        dia = round(self.rng.gauss(79, 4))
        mean = round(dia + (sys_ - dia) / 3)
        pr = round(self.rng.gauss(72, 4))
        status = int(BpStatus.BODY_MOVEMENT) if self.rng.random() < 0.1 else 0
        value = encode_blood_pressure(
            encode_sfloat(sys_, 0),
            encode_sfloat(dia, 0),
            encode_sfloat(mean, 0),
            timestamp=_local_now(),
            pulse_rate=encode_sfloat(pr, 0),
            user_id=1,
            status=status,
        )
        return [(BLOOD_PRESSURE_MEASUREMENT, value)]


def make_wearable(profile: str, seed: int = 0, record_dir: Path | None = None) -> Wearable:
    """A wearable of the given profile; ``record_dir`` holds MIT-BIH record 100 for the strap."""
    if profile == "hr":
        return HeartRateStrap(seed, load_record_beats(record_dir) if record_dir else None)
    if profile == "plx":
        return PulseOximeter(seed)
    if profile == "thermo":
        return Thermometer(seed)
    if profile == "bp":
        return BloodPressureCuff(seed)
    raise ValueError(f"unknown wearable profile {profile!r}: use hr, plx, thermo or bp")
