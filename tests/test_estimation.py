"""The estimation stage: fused heart rate and battery state in the running pipeline, as records."""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_support import DATA
from durability import landed

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import Alarm, Estimate, Lane
from gateway.errors import InvalidConfigError
from gateway.estimation import Estimation, EstimatorsSection
from gateway.estimation.config import BatterySpec
from gateway.inference.kalman import HrFusion
from gateway.outbox import AsyncOutbox, Outbox
from gateway.records import EstimateRecord, EstimateSource, as_map, decode, encode
from gateway.runtime import Pipeline, render_pretty, run_gateway
from gateway.sample import MDC, Quality, Sample, SampleBlock, Stream, industrial_metric
from gateway.twin.decoder import decode_message
from gateway.twin.view import TwinView

SUBJECT = "MRN-4242"
STRAP = Stream("strap", SUBJECT, "C0:FF:EE:00:42:42", MDC["MDC_ECG_HEART_RATE"], rate_hz=1.0)
OXI = Stream("oxi", SUBJECT, "SN-OX-99821", MDC["MDC_PULS_OXIM_PULS_RATE"], rate_hz=1.0)
WALL = 1.7e9

HR_CONFIG: dict[str, Any] = {
    "fusion": [
        {
            "subject": SUBJECT,
            "name": "hr",
            "sources": [{"metric": "MDC_ECG_HEART_RATE"}, {"metric": "MDC_PULS_OXIM_PULS_RATE"}],
            "every_s": 1.0,
        }
    ]
}


def truth(t: np.ndarray) -> np.ndarray:
    return 72.0 + 6.0 * np.sin(t / 40.0)


# ---- the filter on arrays --------------------------------------------------------------------


def test_a_source_that_disagrees_loses_weight_and_flags_leave_the_estimate_untrusted() -> None:
    rng = np.random.default_rng(3)
    t = np.arange(0.0, 300.0, 1.0)
    kf = HrFusion(sources={"strap": 1.0, "oximeter": 9.0})
    errs = []
    for i, ti in enumerate(t):
        kf.update("strap", ti, truth(t[i : i + 1])[0] + rng.normal(0, 1.0))
        # From 100 s the oximeter reads 40 /min high (a motion artefact it does not flag).
        bad = 40.0 if ti >= 100 else 0.0
        r = kf.update("oximeter", ti + 0.5, truth(t[i : i + 1])[0] + bad + rng.normal(0, 3.0))
        assert r is not None
        if ti >= 100:
            errs.append(r.hr - float(truth(np.array([ti + 0.5]))[0]))
    # Without the gate the 1:9 weighting alone would pull the estimate ~4 /min up.
    assert abs(float(np.mean(errs))) < 1.5
    w = kf.weights(300.0)
    assert w["strap"] > 0.95
    # Only artefact-flagged samples for longer than the horizon: an estimate, but not trusted.
    for k in range(15):
        kf.update("oximeter", 301.0 + k, 72.0, int(Quality.ARTIFACT))
    last = kf.estimate(316.0)
    assert last is not None
    assert not last.trusted


# ---- the stage in the pipeline, end to end ----------------------------------------------------------


def _config(tmp_path: Path, estimators: dict[str, Any]) -> Any:
    return validate(
        {
            "gateway": {"state_dir": str(tmp_path)},
            "pipeline": {"window_s": 10.0, "hop_s": 5.0, "grace_s": 0.0},
            "estimators": estimators,
        },
        "<test>",
        REGISTRY,
    )


def _block(stream: Stream, t: np.ndarray, value: np.ndarray) -> SampleBlock:
    return SampleBlock(stream, t, t + WALL, value, np.zeros(len(t), np.uint8))


async def _records(outbox: AsyncOutbox) -> list[tuple[Lane, str, dict[str, Any]]]:
    await outbox.flush()
    leased = await outbox.lease(10_000)
    await outbox.ack([i.id for i in leased])
    return [(i.lane, i.topic, as_map(decode(i.payload))) for i in leased]


def test_strap_dropped_mid_run_fused_hr_continues_within_its_uncertainty_and_resumes_after_restart(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, HR_CONFIG)
    rng = np.random.default_rng(7)
    t0 = time.monotonic()
    t = t0 + np.arange(0.0, 120.0, 1.0)
    hr = truth(t - t0)
    strap = hr + rng.normal(0.0, 1.0, len(t))
    oxi = hr + rng.normal(0.0, 3.0, len(t))
    drop = 60  # the strap falls off after 60 s

    async def run() -> tuple[list[dict[str, Any]], list[Estimate]]:
        anon = Anonymizer(Pseudonymizer(b"e" * 32), time_mode="exact", start_wall=WALL)
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(config, anon, outbox)
            for k in range(0, len(t), 10):
                if k < drop:
                    pipeline.sink.put_block(_block(STRAP, t[k : k + 10], strap[k : k + 10]))
                pipeline.sink.put_block(_block(OXI, t[k : k + 10] + 0.5, oxi[k : k + 10]))
                await pipeline.step(now_mono=float(t[k]) + 10.0, now_wall=WALL + float(t[k]) + 10.0)
            first = [r for lane, topic, r in await _records(outbox) if r["type"] == "estimate"]
            landed(pipeline._estimation.save(float(t[-1]) + 1.0, WALL + float(t[-1]) + 1.0))
            # A restart 5 s later (the clocks of the run): the estimate resumes, bridged, before
            # any source speaks.
            now = float(t[-1]) + 6.0
            resumed: list[Estimate] = []
            restarted = Estimation(
                config.core.estimators, {}, resumed.append, lambda a: None, tmp_path,
                now_mono=now, now_wall=WALL + now,
            )  # fmt: skip
            restarted.tick(now, WALL + now)
            return first, resumed

    first, second = asyncio.run(run())
    assert SUBJECT not in repr(first)
    before = [r for r in first if r["t"] < WALL + t[drop - 1]]
    after = [r for r in first if r["t"] > WALL + t[drop] + 1.0]
    assert before
    assert after
    both = {"MDC_ECG_HEART_RATE", "MDC_PULS_OXIM_PULS_RATE"}
    assert {s["metric"] for s in before[-1]["src"]} == both
    assert all({s["metric"] for s in r["src"]} == {"MDC_PULS_OXIM_PULS_RATE"} for r in after[10:])
    # The strap carried most of the weight while it was on.
    assert max(s["w"] for s in before[-1]["src"] if s["metric"] == "MDC_ECG_HEART_RATE") > 0.8
    for r in first:
        assert r["state"] == "measured"
        true = float(truth(np.array([r["t"] - WALL - t0]))[0])
        assert abs(r["value"] - true) <= 3.0 * r["sd"] + 0.5  # inside its stated uncertainty
    # No jump where the strap fell off: the step is within the stated uncertainty.
    step = abs(after[0]["value"] - before[-1]["value"])
    assert step <= 3.0 * after[0]["sd"] + 1.0
    assert after[-1]["sd"] > before[-1]["sd"]  # one noisier source left: a wider interval
    assert len(second) == 1
    assert second[0].state == "bridged"
    assert second[0].value == pytest.approx(first[-1]["value"], abs=1.0)


def test_every_source_silent_bridges_then_reports_lost_once(tmp_path: Path) -> None:
    sent: list[Estimate] = []
    section = EstimatorsSection.model_validate(HR_CONFIG)
    stage = Estimation(section, {}, sent.append, lambda a: None)
    for k in range(5):
        stage.put(Sample(STRAP, 100.0 + k, WALL + 100.0 + k, 70.0))
    for now in (106.0, 108.0, 112.0, 116.0, 120.0, 130.0):
        stage.tick(now, WALL + now)
    states = [e.state for e in sent]
    assert states[:5] == ["measured"] * 5
    assert "bridged" in states
    assert states.count("lost") == 1
    assert states[-1] == "lost"
    bridged = [e for e in sent if e.state == "bridged"]
    assert all(e.value == pytest.approx(70.0, abs=0.5) for e in bridged)
    assert bridged[-1].sd > sent[4].sd  # the interval widens while nothing is measured
    assert math.isnan(sent[-1].value)


# ---- the record: encoding, the twin's view ----------------------------------------------------------


def test_estimate_record_round_trips_and_the_twin_shows_value_plus_minus_sd() -> None:
    anon = Anonymizer(Pseudonymizer(b"r" * 32), time_mode="relative", start_wall=WALL)
    est = Estimate(SUBJECT, "medical", "hr", "/min", 5.0, WALL + 5.0, 71.25, 0.8, "measured",
                   ((STRAP, 0.9), (OXI, 0.1)))  # fmt: skip
    sealed = anon.seal(lambda: anon.estimate(est), encode)
    assert sealed is not None
    out, data = sealed
    assert out.topic.startswith("estimates/")
    assert out.lane == Lane.FEATURES
    rec = decode(data)
    assert isinstance(rec, EstimateRecord)
    assert rec == out.payload
    assert rec.src == (
        EstimateSource(rec.src[0].dev, "MDC_ECG_HEART_RATE", 0.9),
        EstimateSource(rec.src[1].dev, "MDC_PULS_OXIM_PULS_RATE", 0.1),
    )
    assert rec.value == 71.25
    assert rec.sd == 0.8  # read back as the shortest decimal single precision holds
    assert (rec.unit, rec.state, rec.kind, rec.est) == ("/min", "measured", "medical", "hr")
    assert STRAP.device not in repr(rec)
    lost = anon.seal(lambda: anon.estimate(Estimate(SUBJECT, "medical", "hr", "/min", 6.0, WALL + 6.0,
                                                    math.nan, math.nan, "lost")), encode)  # fmt: skip
    assert lost is not None
    gone = decode(lost[1])
    assert isinstance(gone, EstimateRecord)
    assert (gone.value, gone.sd, gone.state) == (None, None, "lost")
    assert "value" not in as_map(gone)
    view = TwinView()
    msg = decode_message(f"edgetwin/v1/gw1/{out.topic}", data)
    assert msg is not None
    assert msg.kind == "estimates"
    view.update(msg)
    text = view.render()
    assert "HR=71.25±0.8/min measured" in text
    assert "ECG_HEART_RATE 0.90" in text
    assert "ESTIMATE HR=71.25±0.8/min" in render_pretty(out.topic, rec)


def test_estimator_config_errors_name_the_key() -> None:
    with pytest.raises(InvalidConfigError, match=r"estimators\.fusion\.0\.sources|estimators.fusion\[0\]"):
        validate({"estimators": {"fusion": [{"subject": "x", "sources": []}]}}, "<test>", REGISTRY)
    twice = [{"metric": "MDC_ECG_HEART_RATE"}, {"metric": "MDC_ECG_HEART_RATE"}]
    with pytest.raises(InvalidConfigError, match="listed twice"):
        validate({"estimators": {"fusion": [{"subject": "x", "sources": twice}]}}, "<test>", REGISTRY)
    same = {"subject": "m", "voltage": "V", "current": "V"}
    with pytest.raises(InvalidConfigError, match="same stream"):
        validate({"estimators": {"battery": [same]}}, "<test>", REGISTRY)
    with pytest.raises(InvalidConfigError, match="nois"):
        validate(
            {"estimators": {"fusion": [{"subject": "x", "sources": [{"metric": "m", "noise": -1.0}]}]}},
            "<test>",
            REGISTRY,
        )


# ---- battery ----------------------------------------------------------------------------------------


def test_battery_learns_a_faded_capacity_and_raises_low_soc_and_low_health(tmp_path: Path) -> None:
    spec = BatterySpec(subject="motor-1", voltage="Pack/V", current="Pack/I", rated_ah=2.0, low_health=85.0,
                       every_s=60.0)  # fmt: skip
    cell = Estimation(
        EstimatorsSection(battery=[spec]), {"motor-1": "industrial"}, lambda e: None, lambda a: None
    )
    model = cell.estimators[0].cell
    true_ah = 1.6  # a cell faded to 80 % of its rating
    v_stream = Stream("plc", "motor-1", "opc.tcp://plc", industrial_metric("Pack/V", "V"), "industrial")
    i_stream = Stream("plc", "motor-1", "opc.tcp://plc", industrial_metric("Pack/I", "A"), "industrial")
    sent: list[Estimate] = []
    alarms: list[Alarm] = []
    stage = Estimation(EstimatorsSection(battery=[spec]), {"motor-1": "industrial"}, sent.append,
                       alarms.append, tmp_path)  # fmt: skip
    soc, t = 1.0, 0.0
    # Rest, discharge 1.6 A for 30 min, rest, discharge again: two rests bracket a 50 % drop.
    plan = [(0.0, 900), (1.6, 1800), (0.0, 900), (1.6, 1500), (0.0, 900)]
    for amps, seconds in plan:
        for _ in range(0, seconds, 10):
            soc -= amps * 10.0 / 3600.0 / true_ah
            v = model.ocv_at(soc)[0] - spec.r0 * amps
            stage.put(Sample(i_stream, t, WALL + t, amps))
            stage.put(Sample(v_stream, t, WALL + t, v))
            t += 10.0
    est = stage.estimators[0]
    assert est.capacity_samples >= 1
    assert est.capacity_ah == pytest.approx(true_ah, rel=0.03)
    soc_est = [e for e in sent if e.name == "soc"]
    assert soc_est[-1].value == pytest.approx(100.0 * soc, abs=3.0)
    kinds = {(a.kind.value, a.detail["estimate"]) for a in alarms}
    assert ("limit", "soh") in kinds  # learnt 80 % < 85 %
    assert ("limit", "soc") in kinds  # ended below 20 %
    assert all(a.alarm_class.value == "process" for a in alarms)
    # The learnt capacity and the SoC survive a restart.
    landed(stage.save(t, WALL + t))
    again = Estimation(EstimatorsSection(battery=[spec]), {"motor-1": "industrial"}, sent.append,
                       alarms.append, tmp_path)  # fmt: skip
    assert again.estimators[0].capacity_ah == pytest.approx(est.capacity_ah)


# ---- real numerics (runs only where ../shared/data exists) --------------------------------------------


@pytest.mark.skipif(
    not (DATA / "physio" / "mimic_numerics").is_dir(),
    reason=f"MIMIC numerics not found under {DATA} (set EDGETWIN_DATA to the shared data folder)",
)
def test_fused_hr_on_mimic_numerics_beats_the_corrupted_source_and_covers_its_absence() -> None:
    from models.recipes.hr_fusion import RECORDS, read_numerics, run_scenario  # noqa: PLC0415

    data = [read_numerics(DATA / "physio" / "mimic_numerics", header) for header, _ in RECORDS]
    dropped = run_scenario("ecg_dropped", data)
    assert dropped["fused"]["coverage"] > dropped["ecg_alone"]["coverage"] + 0.1
    assert dropped["fused"]["rmse"] < dropped["pulse_alone"]["rmse"]
    artifact = run_scenario("ecg_artifact", data)
    assert artifact["fused"]["rmse"] < 0.25 * artifact["ecg_alone"]["rmse"]
    assert artifact["fused"]["rmse"] < artifact["pulse_alone"]["rmse"]
    assert artifact["fused"]["within_2sd"] > 0.9


@pytest.mark.skipif(
    not (DATA / "industrial" / "cmapss_fd001").is_dir(),
    reason=f"C-MAPSS FD001 not found under {DATA} (set EDGETWIN_DATA to the shared data folder)",
)
def test_rul_on_cmapss_fd001_beats_the_svr_baseline_and_its_interval_covers(tmp_path: Path) -> None:
    from models.recipes.rul_cmapss import main  # noqa: PLC0415

    assert main(["--data", str(DATA), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "rul_cmapss.eval.json").read_text(encoding="utf-8"))
    assert result["test_rmse"] < result["baselines_rmse"]["SVR (Babu et al. 2016)"]
    assert result["interval_coverage_test"] >= 0.8
    # The shipped model file is the one the recipe writes (what [[estimators.rul]] runs).
    models = Path(__file__).resolve().parents[1] / "models"
    shipped = (models / "rul_cmapss.onnx").read_bytes()
    assert (tmp_path / "rul_cmapss.onnx").read_bytes() == shipped
    assert result["onnx_test_rmse"] == pytest.approx(result["test_rmse"], abs=0.05)


def test_spo2_from_two_oximeters_picks_each_by_source_and_ignores_the_faulted_one() -> None:
    finger = Stream("ox-finger", SUBJECT, "SN-OX-1", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)
    ear = Stream("ox-ear", SUBJECT, "SN-OX-2", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)
    other = Stream("ox-other", SUBJECT, "SN-OX-3", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)
    section = EstimatorsSection.model_validate(
        {
            "fusion": [
                {
                    "subject": SUBJECT,
                    "name": "spo2",
                    "unit": "%",
                    "lo": 50.0,
                    "hi": 100.0,
                    "q_per_s": 0.05,
                    "sources": [
                        {"metric": "MDC_PULS_OXIM_SAT_O2", "source": "ox-finger", "noise": 1.0},
                        {"metric": "MDC_PULS_OXIM_SAT_O2", "source": "ox-ear", "noise": 4.0},
                    ],
                }
            ]
        }
    )
    sent: list[Estimate] = []
    stage = Estimation(section, {}, sent.append, lambda a: None)
    for k in range(60):
        t = 100.0 + k
        # The finger probe comes off at 30 s; an unlisted third probe never counts.
        quality = Quality.SENSOR_OFF if k >= 30 else Quality.GOOD
        stage.put(Sample(finger, t, WALL + t, 0.0 if k >= 30 else 97.0, quality))
        stage.put(Sample(ear, t + 0.5, WALL + t + 0.5, 95.0))
        stage.put(Sample(other, t + 0.7, WALL + t + 0.7, 60.0))
    first, last = sent[1], sent[-1]  # sent[0] came with the very first sample
    assert {s.source for s, _ in first.sources} == {"ox-finger", "ox-ear"}
    assert {s.source for s, _ in last.sources} == {"ox-ear"}
    assert 96.0 < first.value < 97.0  # the finger probe weighs 4x
    assert last.value == pytest.approx(95.0, abs=0.3)  # carried by the ear probe, no fall to 0
    assert all(e.state == "measured" for e in sent)
    assert all(e.value > 94.5 for e in sent)


def test_a_gateway_restart_resumes_the_fused_estimate_from_the_saved_state(tmp_path: Path) -> None:
    config = validate(
        {
            "gateway": {"state_dir": str(tmp_path)},
            "pipeline": {"window_s": 2.0, "hop_s": 1.0, "grace_s": 0.0},
            "sources": [
                {
                    "name": "mon",
                    "driver": "sim",
                    "subject": "bed-8",
                    "profile": "patient",
                    "device": "SN-0002",
                }
            ],
            "estimators": {
                "fusion": [
                    {
                        "subject": "bed-8",
                        "sources": [{"metric": "MDC_ECG_HEART_RATE"}, {"metric": "MDC_ECG_TIME_PD_RR_GL"}],
                        "every_s": 0.5,
                        # The resumed estimate's variance grows by q per second of the restart
                        # (as it should): at the default q a restart slowed to a few seconds by
                        # a busy machine carried an honest sd past 1.0, a fresh start's. A small q
                        # and a long bridge keep "resumed" apart from "fresh" however slow it is.
                        "q_per_s": 0.01,
                        "max_gap_s": 120.0,
                    }
                ]
            },
        },
        "<test>",
        REGISTRY,
    )

    def run() -> list[dict[str, Any]]:
        out = io.StringIO()
        code = asyncio.run(
            run_gateway(config, REGISTRY, out=out, stop_after_s=2.5, install_signal_handlers=False)
        )
        assert code == 0
        lines = [json.loads(line)["record"] for line in out.getvalue().splitlines()]
        return [r for r in lines if r["type"] == "estimate"]

    first = run()
    assert first
    saved = json.loads((tmp_path / "estimators.json").read_text(encoding="utf-8"))
    state = saved["estimators"]["fusion/bed-8/hr"]
    assert state["value"] == pytest.approx(first[-1]["value"], abs=3.0 * first[-1]["sd"] + 1.0)
    second = run()
    assert second
    # Resumed: the first estimate after the restart is the saved one carried on, with the
    # precision of a filter that has run, not the single first measurement's.
    assert second[0]["value"] == pytest.approx(state["value"], abs=3.0 * second[0]["sd"] + 1.0)
    assert second[0]["sd"] < 1.0, second[:3]  # a fresh start has the first source's noise: sd 1.0 or more


def test_an_estimator_that_raises_never_reaches_the_driver(caplog: pytest.LogCaptureFixture) -> None:
    sent: list[Estimate] = []
    stage = Estimation(EstimatorsSection.model_validate(HR_CONFIG), {}, sent.append, lambda a: None)

    def broken(*args: Any) -> None:
        raise ZeroDivisionError("boom")

    stage.estimators[0].update = broken
    stage.put(Sample(STRAP, 1.0, WALL + 1.0, 70.0))
    stage.put_block(_block(STRAP, np.array([2.0, 3.0]), np.array([70.0, 71.0])))
    assert stage.failures == 2
    assert "an estimator failed" in caplog.text
