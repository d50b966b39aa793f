"""State estimation (HR fusion, battery EKF), ectopic beats and plausibility rules on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drivers.sim.protocol import RR, PatientGenerator
from gateway.contracts import AlarmKind
from gateway.inference.battery import BatteryEkf, CellModel
from gateway.inference.ectopic import EctopicDetector, EctopyMonitor
from gateway.inference.kalman import HrFusion
from gateway.inference.plausibility import PlausibilityChecker
from gateway.sample import MDC, Quality, Sample, SampleBlock, Stream

SPO2 = Stream("ox", "bed1", "ox-1", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)
RRS = Stream("strap", "bed1", "strap-1", MDC[RR])


def sinus(seconds: float, seed: int = 3) -> np.ndarray:
    return PatientGenerator(seed=seed, rate_hz=1.0).generate(0.0, seconds).series[RR].value


def with_premature(rr: np.ndarray, at: list[int], coupling: float = 0.72) -> np.ndarray:
    out = rr.copy()
    for i in at:
        s = out[i]
        out[i] = round(coupling * s)
        out[i + 1] = round(out[i + 1] + s - out[i])
    return out


# ---- ectopic beats ---------------------------------------------------------------------


def verdicts(rr: np.ndarray) -> np.ndarray:
    det = EctopicDetector()
    out = np.zeros(len(rr), bool)
    for x in rr:
        for beat in det.feed(float(x)):
            out[beat.index] = beat.ectopic
    return out


def test_isolated_premature_beats_found_and_sinus_left_alone() -> None:
    rr = sinus(1800.0)
    at = list(range(50, len(rr) - 2, 97))
    got = verdicts(with_premature(rr, at))
    assert set(np.flatnonzero(got).tolist()) == set(at)
    assert not verdicts(rr).any()


def test_bigeminy_raises_one_alarm_not_one_per_beat() -> None:
    rr = sinus(1800.0, seed=4)
    at = list(range(300, len(rr) - 2, 2))
    big = with_premature(rr, at)
    got = verdicts(big)
    assert got[at].mean() > 0.98
    assert got[:300].sum() == 0
    mon = EctopyMonitor()
    t = np.cumsum(big) / 1000.0
    alarms = [
        a
        for ti, x in zip(t, big, strict=True)
        if (a := mon.update(Sample(RRS, ti, ti, float(x)))) is not None
    ]
    assert len(alarms) == 1
    assert alarms[0].kind == AlarmKind.ANOMALY
    assert alarms[0].detail["model"] == "rr_ectopic"
    assert sum(alarms[0].contributions.values()) == pytest.approx(1.0)


def test_implausible_interval_breaks_the_sequence() -> None:
    det = EctopicDetector()
    for _ in range(10):
        det.update(800.0)
    assert det.update(5000.0) is None
    assert det.update(600.0) is None  # no previous interval to judge after a break


# ---- HR fusion -------------------------------------------------------------------------


def test_fusion_tracks_truth_better_than_either_source_and_bridges_gaps() -> None:
    rng = np.random.default_rng(1)
    t = np.arange(0.0, 600.0, 1.0)
    truth = 70.0 + 8.0 * np.sin(t / 60.0)
    strap = truth + rng.normal(0.0, 1.5, len(t))
    ox = truth + rng.normal(0.0, 3.0, len(t))
    kf = HrFusion(q_per_s=0.5, sources={"strap": 2.25, "oximeter": 9.0}, max_gap_s=10.0)
    est = []
    for i, ti in enumerate(t):
        if not 300 <= ti < 306:  # the strap drops out for 6 s
            kf.update("strap", ti, strap[i])
        if not 300 <= ti < 306:
            r = kf.update("oximeter", ti + 0.5, ox[i])
        else:
            r = kf.estimate(ti + 0.5)
            assert r is not None
            assert r.imputed
        assert r is not None
        est.append(r.hr)
    err = np.asarray(est) - (70.0 + 8.0 * np.sin((t + 0.5) / 60.0))
    rmse = float(np.sqrt(np.mean(err**2)))
    assert rmse < 1.5  # the strap alone is 1.5 bpm RMS, the oximeter 3
    assert kf.estimate(700.0) is None  # beyond max_gap_s nothing is made up


def test_fusion_ignores_faulted_and_discounts_artifact_samples() -> None:
    kf = HrFusion()
    kf.update("strap", 0.0, 60.0)
    r = kf.update("oximeter", 1.0, 140.0, int(Quality.SENSOR_OFF))
    assert r is not None
    assert r.hr == pytest.approx(60.0)
    r = kf.update("oximeter", 2.0, 140.0, int(Quality.ARTIFACT))
    assert r is not None
    assert 60.0 < r.hr < 65.0
    with pytest.raises(ValueError, match="unknown source"):
        kf.update("watch", 3.0, 60.0)


# ---- battery ---------------------------------------------------------------------------


CELL = CellModel((3.2, 1.6, -1.6, 1.0), 0.07, 0.04, 30.0)


def simulate(
    cap: float, soc0: float, seconds: float, amps: float, dt: float = 10.0
) -> tuple[np.ndarray, ...]:
    t = np.arange(0.0, seconds, dt)
    soc = soc0 - amps * t / (3600.0 * cap)
    v1 = CELL.r1 * amps * (1.0 - np.exp(-t / CELL.tau_s))
    v = np.array([CELL.ocv_at(s)[0] for s in soc]) - CELL.r0 * amps - v1
    return t, np.full(len(t), amps), v + np.random.default_rng(2).normal(0.0, 0.005, len(t)), soc


def test_battery_ekf_converges_from_a_wrong_start() -> None:
    t, i, v, soc = simulate(2.0, 0.95, 3000.0, 2.0)
    ekf = BatteryEkf(CELL, 2.0, soc0=0.6, soc0_sd=0.3, r_v=2.5e-5)
    est = ekf.run(t, i, v)
    assert abs(est[0] - soc[0]) > 0.05 or abs(est[5] - soc[5]) < 0.05
    assert np.abs(est[len(t) // 2 :] - soc[len(t) // 2 :]).max() < 0.02
    assert 0.0 < ekf.soc_sd < 0.1
    assert CELL.soc_from_rest(CELL.ocv_at(0.42)[0]) == pytest.approx(0.42, abs=1e-6)
    with pytest.raises(ValueError, match="capacity"):
        BatteryEkf(CELL, 0.0, soc0=1.0)


# ---- plausibility ----------------------------------------------------------------------


def test_range_and_rate_violations_are_sensor_faults_on_state_change() -> None:
    chk = PlausibilityChecker()
    t0 = 1000.0
    values = [97.0, 97.0, 0.0, 0.0, 96.0, 70.0, 70.0, 96.0, 96.0]
    alarms = [chk.check_sample(Sample(SPO2, t0 + k, 1.7e9 + k, v)) for k, v in enumerate(values)]
    kinds = [(k, a.kind, a.detail.get("rule")) for k, a in enumerate(alarms) if a is not None]
    assert kinds == [
        (2, AlarmKind.SENSOR_FAULT, "range"),
        (4, AlarmKind.SENSOR_RESTORED, "plausibility"),
        (6, AlarmKind.SENSOR_FAULT, "rate"),  # the second sample over the rate limit (debounce)
        (7, AlarmKind.SENSOR_RESTORED, "plausibility"),  # 70 stays a jump from the last plausible 96
    ]
    # NaN is "no value", not a fault.
    assert chk.check_sample(Sample(SPO2, t0 + 20, 1.7e9, math.nan)) is None


def test_block_check_matches_sample_check() -> None:
    vals = np.array([97.0, 97.0, 120.0, 97.0, 96.0, 96.0])
    t = 2000.0 + np.arange(len(vals), dtype=float)
    block = SampleBlock(SPO2, t, t, vals, np.zeros(len(vals), np.uint8))
    got = [(a.kind, a.detail["rule"]) for a in PlausibilityChecker().check_block(block)]
    assert got == [(AlarmKind.SENSOR_FAULT, "range"), (AlarmKind.SENSOR_RESTORED, "plausibility")]
    assert all(
        isinstance(v, float | str)
        for a in PlausibilityChecker().check_block(block)
        for v in a.detail.values()
    )
