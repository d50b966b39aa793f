"""Limit alarms on a recorded ICU SpO2 stream (MIMIC numerics), checked against a run-length oracle.

Needs the shared data folder (skipped without it): real monitors report SpO2 with drop-outs,
artefacts and slow trends no synthetic stream has.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from data_support import DATA

from drivers.serial.sim import MimicNumerics
from gateway.alarms.config import AlarmsSection, LimitSpec, limit_checker
from gateway.contracts import AlarmKind
from gateway.sample import MDC, Sample, Stream

DATA = DATA / "physio" / "mimic_numerics"
RECORDS = sorted(DATA.glob("*.hea")) if DATA.is_dir() else []


def oracle(t: np.ndarray, v: np.ndarray, limit: float, delay: float) -> list[tuple[str, float]]:
    """Raise where a run of values under the limit first reaches ``delay`` s; clear on the next sample."""
    ok = np.isfinite(v)
    t, v = t[ok], v[ok]
    low = v < limit
    out: list[tuple[str, float]] = []
    i = 0
    while i < len(v):
        if not low[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(v) and low[j + 1]:
            j += 1
        due = np.flatnonzero(t[i : j + 1] - t[i] >= delay)
        if due.size:
            out.append(("limit", float(t[i + due[0]])))
            if j + 1 < len(v):
                out.append(("limit_cleared", float(t[j + 1])))
        i = j + 1
    return out


@pytest.mark.skipif(not RECORDS, reason=f"MIMIC numerics not found under {DATA} (set EDGETWIN_DATA)")
@pytest.mark.parametrize("header", RECORDS, ids=[p.stem for p in RECORDS])
def test_spo2_limit_alarms_on_a_recorded_stream_match_the_oracle(header: Path) -> None:
    rec = MimicNumerics(header, speed=1.0)
    n = min(int(rec.duration_s * rec.fs), 200_000)
    t = np.arange(n) / rec.fs
    v = np.array([rec.at(float(x)).spo2 for x in t])
    # At the record's rate (numerics: one a minute), from which the stream's loss time is reckoned.
    spo2 = Stream("mimic", "icu-1", "monitor", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=rec.fs)
    section = AlarmsSection(
        defaults=False, limits={"MDC_PULS_OXIM_SAT_O2": LimitSpec(low=90.0, on_delay_s=10.0)}
    )
    checker = limit_checker(section)
    got = []
    for ti, vi in zip(t, v, strict=True):
        a = checker.check_sample(Sample(spo2, float(ti), float(ti), float(vi)))
        if a is not None:
            got.append((a.kind.value, a.t_mono))
            if a.kind is AlarmKind.LIMIT:
                assert a.held_s is not None
                assert a.held_s >= 10.0
                assert a.value is not None
                assert a.value < 90.0
    expected = oracle(t, v, 90.0, 10.0)
    assert got == expected
    assert all(math.isfinite(x) for _, x in got)
