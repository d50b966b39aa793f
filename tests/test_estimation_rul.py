"""Machine health in the running gateway: the shipped C-MAPSS RUL model on a simulated wearing engine.

Compressed time (as tests/test_alarm_campaign.py): the simulator's engine profile produces one
sample per sensor per cycle, the composed pipeline is stepped on the simulated clock, and the
estimate records are read back from the outbox; an engine's whole life takes a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_support import DATA
from model_support import needs_litert

from drivers import REGISTRY
from drivers.sim.engine import EngineGenerator
from drivers.sim.protocol import make_generator
from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.config import validate
from gateway.contracts import Estimate, Lane
from gateway.errors import ConfigError, CorruptDataError, InvalidConfigError
from gateway.estimation import Estimation, EstimatorsSection
from gateway.estimation.config import RulSpec
from gateway.estimation.rul import RIDGE_TOLERANCE, RulEstimator, cycle_features, load_rul_model
from gateway.inference.card import file_sha256
from gateway.outbox import AsyncOutbox, Outbox
from gateway.records import as_map, decode
from gateway.records.render import number
from gateway.records.topics import DEFAULT_PREFIX
from gateway.runtime import Pipeline, build_problems
from gateway.sample import SampleBlock, Stream, industrial_metric
from gateway.twin.decoder import decode_messages
from gateway.twin.view import TwinView

MODELS = Path(__file__).resolve().parents[1] / "models"
CMAPSS = DATA / "industrial" / "cmapss_fd001"
ENGINE = "plant-b/engine-7"
CYCLE_S = 10.0
T0 = 1000.0
WALL0 = 1.7e9


def test_cycle_features_are_the_recent_mean_and_the_window_slope() -> None:
    t = np.arange(12.0)
    window = np.column_stack([3.0 + 0.5 * t, np.full(12, 7.0)])
    f = cycle_features(window, recent=5)
    assert f[:2] == pytest.approx([3.0 + 0.5 * 9.0, 7.0])  # mean of cycles 7..11
    assert f[2:] == pytest.approx([0.5, 0.0])
    assert cycle_features(window[:2], recent=5)[2:] == pytest.approx([0.0, 0.0])  # too short


def test_the_model_file_is_checked_against_its_card(tmp_path: Path) -> None:
    model = load_rul_model(MODELS, "rul_cmapss")
    assert len(model.card.sensors) == 14
    card = model.card
    for name in ("rul_cmapss.card.json", card.files["fp32"].path, card.numpy_files["fp32"].path):
        shutil.copy(MODELS / name, tmp_path / name)
    for path, backend in ((card.files["fp32"].path, "onnxruntime"), (card.numpy_files["fp32"].path, "card")):
        data = bytearray((tmp_path / path).read_bytes())
        data[-5] ^= 0xFF
        (tmp_path / path).write_bytes(bytes(data))
        with pytest.raises(CorruptDataError, match="sha256 does not match"):
            load_rul_model(tmp_path, "rul_cmapss", backend=backend)
    with pytest.raises(ConfigError, match=r"cannot read the model card.*\[models\] dir"):
        load_rul_model(tmp_path, "no_such_model")
    # An anomaly model's card is no RUL card: refused with the key that does not fit.
    with pytest.raises(CorruptDataError, match="not a RUL model card"):
        load_rul_model(MODELS, "pump_skab")


def test_numpy_weights_that_do_not_reproduce_their_estimates_are_refused(tmp_path: Path) -> None:
    card = json.loads((MODELS / "rul_cmapss.card.json").read_text())
    with np.load(MODELS / card["numpy_files"]["fp32"]["path"]) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["W"] = arrays["W"] * np.float32(1.01)  # weights of another fit: the recorded estimates differ
    path = tmp_path / card["numpy_files"]["fp32"]["path"]
    np.savez(path, **arrays)
    card["numpy_files"]["fp32"].update(sha256=file_sha256(path), bytes=path.stat().st_size)
    (tmp_path / "rul_cmapss.card.json").write_text(json.dumps(card))
    with pytest.raises(CorruptDataError, match="does not reproduce the recorded estimates"):
        load_rul_model(tmp_path, "rul_cmapss")


def test_the_ridge_serves_on_numpy_without_loading_a_runtime() -> None:
    """The card chose numpy by measurement: a gateway running the RUL estimator imports no runtime."""
    probe = (
        "import sys, numpy as np; from pathlib import Path; "
        "from gateway.estimation.rul import load_rul_model; "
        f"m = load_rul_model(Path({str(MODELS)!r}), 'rul_cmapss'); "
        "base = m.card.training['degradation']['base']; "
        "row = np.concatenate([[base[s] for s in m.card.sensors], np.zeros(14)]); "
        "print(m.backend.name, round(m.predict(row), 4), "
        "sorted(k for k in ('onnxruntime', 'ai_edge_litert') if k in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    name, estimate, imported = out.stdout.split(" ", 2)
    assert (name, imported.strip()) == ("numpy", "[]")
    onnx = load_rul_model(MODELS, "rul_cmapss", backend="onnxruntime")
    assert onnx.backend.name == "onnxruntime"
    base = onnx.card.training["degradation"]["base"]
    healthy = onnx.predict(np.concatenate([[base[s] for s in onnx.card.sensors], np.zeros(14)]))
    assert 60.0 < healthy < onnx.card.cap  # an engine at its early-life means is far from failure
    assert float(estimate) == pytest.approx(healthy, abs=1e-3)


def test_rul_config_errors_name_the_key_and_the_missing_inputs() -> None:
    with pytest.raises(InvalidConfigError, match=r"estimators\.rul.*no inputs"):
        validate({"estimators": {"rul": [{"subject": "m", "cycle_s": 10.0}]}}, "<test>", REGISTRY)
    twice = {"T24": "Engine/T", "T30": "Engine/T"}
    with pytest.raises(InvalidConfigError, match="same metric"):
        validate(
            {"estimators": {"rul": [{"subject": "m", "cycle_s": 10.0, "inputs": twice}]}}, "<test>", REGISTRY
        )
    # Inputs that leave sensors of the model unmapped: the stage names the key and each sensor.
    partial = EstimatorsSection.model_validate(
        {"rul": [{"subject": "m", "cycle_s": 10.0, "inputs": {"T24": "Engine/T24"}}]}
    )
    with pytest.raises(ConfigError, match=r"estimators\.rul\[0\]\.inputs: .*missing T30, T50, P30"):
        Estimation(partial, {"m": "industrial"}, lambda e: None, lambda a: None)
    # `edgetwin check` reports it before a start would fail on it.
    config = validate(
        {
            "sources": [
                {
                    "name": "e",
                    "driver": "sim",
                    "subject": "m",
                    "kind": "industrial",
                    "profile": "engine",
                    "device": "S",
                }
            ],
            "estimators": {"rul": [{"subject": "m", "cycle_s": 10.0, "inputs": {"T24": "Engine/T24"}}]},
        },
        "<test>",
        REGISTRY,
    )
    (problem,) = build_problems(config, REGISTRY)
    assert problem.startswith("estimators: config estimators.rul[0].inputs:")
    typo = EstimatorsSection.model_validate(
        {"rul": [{"subject": "m", "cycle_s": 10.0, "prefix": "E/", "inputs": {"T42": "E/x"}}]}
    )
    with pytest.raises(ConfigError, match="unknown T42"):
        Estimation(typo, {"m": "industrial"}, lambda e: None, lambda a: None)


def test_a_rul_backend_that_cannot_serve_is_refused_naming_the_key(tmp_path: Path) -> None:
    # The card without its .tflite files: LiteRT asked for by name cannot serve it; "card" still can.
    raw = json.loads((MODELS / "rul_cmapss.card.json").read_text())
    (tmp_path / "rul_cmapss.card.json").write_text(json.dumps(raw | {"tflite_files": {}}))
    for spec in (raw["files"]["fp32"], raw["numpy_files"]["fp32"]):
        shutil.copy(MODELS / spec["path"], tmp_path)
    rul = {"subject": "m", "cycle_s": 10.0, "prefix": "E/"}
    for asked in ("litert", "tflite"):
        section = EstimatorsSection.model_validate({"rul": [rul | {"backend": asked}]})
        with pytest.raises(
            ConfigError,
            match=rf"^config estimators\.rul\[0\]: estimation rul rul_cmapss: backend '{asked}': .+: "
            r'set \[\[estimators\.rul\]\] backend = "onnxruntime" \(or "card"\)$',
        ):
            Estimation(section, {"m": "industrial"}, lambda e: None, lambda a: None, models_dir=tmp_path)
    section = EstimatorsSection.model_validate(
        {"rul": [rul, rul | {"name": "rul2", "backend": "onnxruntime"}]}
    )
    stage = Estimation(section, {"m": "industrial"}, lambda e: None, lambda a: None, models_dir=tmp_path)
    assert [e.model.backend.name for e in stage.estimators] == ["numpy", "onnxruntime"]


def test_the_engine_profile_is_deterministic_in_chunks_and_checked_in_config() -> None:
    from drivers.sim.config import SimConfig  # noqa: PLC0415

    gen = make_generator("engine", seed=4, rate_hz=0.5)
    assert isinstance(gen, EngineGenerator)
    whole = gen.generate(0.0, 100.0).series
    parts = [gen.generate(t, t + 10.0).series for t in np.arange(0.0, 100.0, 10.0)]
    for name, series in whole.items():
        assert np.array_equal(series.value, np.concatenate([p[name].value for p in parts]))
    # Wear shows: late in life every sensor has moved towards its failure value.
    late = gen.generate(2.0 * (gen.life_cycles - 10), 2.0 * gen.life_cycles).series
    assert np.mean(late["Engine/T50"].value) > np.mean(whole["Engine/T50"].value) + 10.0
    assert gen.rul(gen.life_cycles + 5) == 0
    base = {"profile": "engine", "device": "SN-1", "rate_hz": 0.5}
    assert len(SimConfig.model_validate(base).metric_names()) == 14
    with pytest.raises(ValueError, match="belongs to the pump profile"):
        SimConfig.model_validate(base | {"events": [{"kind": "valve_fault", "at_s": 1.0, "duration_s": 5.0}]})


def _streams(gen: EngineGenerator) -> dict[str, Stream]:
    return {
        s.metric.name: Stream("engine-src", ENGINE, "SN-ENG-5531", s.metric, "industrial", s.rate_hz)
        for s in gen.signals
    }


def _run(
    tmp: Path,
    gen: EngineGenerator,
    spans: list[tuple[float, float]],
    view: TwinView | None = None,
    backend: str = "card",
) -> list[dict[str, Any]]:
    """The estimate records of the engine over ``spans`` (simulated seconds), a restart between spans.

    ``view``, when given, is the twin's: every record goes to it as a message on its topic, decoded.
    ``backend``: the estimator's ``backend`` key.
    """
    config = validate(
        {
            "gateway": {"state_dir": str(tmp)},
            "pipeline": {"window_s": 20.0, "hop_s": CYCLE_S, "grace_s": 0.0},
            "estimators": {
                "rul": [
                    {
                        "subject": ENGINE,
                        "prefix": "Engine/",
                        "cycle_s": CYCLE_S,
                        "grace_s": 2.0,
                        "low_rul": 30.0,
                        "backend": backend,
                    }
                ]
            },
        },
        "<rul>",
        REGISTRY,
    )
    streams = _streams(gen)

    async def main() -> list[dict[str, Any]]:
        anon = Anonymizer(Pseudonymizer(b"r" * 32), time_mode="relative", start_wall=WALL0)
        out: list[dict[str, Any]] = []
        async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db")) as outbox:
            for start, end in spans:
                pipeline = Pipeline(config, anon, outbox)
                t = start
                while t < end:
                    for name, series in gen.generate(t, t + CYCLE_S).series.items():
                        if len(series):
                            pipeline.sink.put_block(
                                SampleBlock(
                                    streams[name],
                                    T0 + series.t,
                                    WALL0 + series.t,
                                    series.value,
                                    series.quality,
                                )
                            )
                    t += CYCLE_S
                    await pipeline.step(now_mono=T0 + t, now_wall=WALL0 + t)
                await pipeline.save_estimators()  # as at the stop
                await outbox.flush()
                while batch := await outbox.lease(1000):
                    for i in batch:
                        for msg in decode_messages(f"{DEFAULT_PREFIX}/gw/{i.topic}", i.payload):
                            if view is not None:
                                view.update(msg)
                    out += [
                        as_map(decode(i.payload)) for i in batch if i.lane in (Lane.FEATURES, Lane.ALARMS)
                    ]
                    await outbox.ack([i.id for i in batch])
        return [r for r in out if r["type"] in ("estimate", "alarm")]

    return asyncio.run(main())


def test_a_wearing_engine_shows_rul_falling_within_its_interval_and_a_restart_keeps_its_wear(
    tmp_path: Path,
) -> None:
    gen = make_generator("engine", seed=3, rate_hz=1.0 / CYCLE_S)
    assert isinstance(gen, EngineGenerator)
    life = gen.life_cycles
    half = round(life / 2) * CYCLE_S
    view = TwinView()
    records = _run(tmp_path, gen, [(0.0, half), (half, life * CYCLE_S)], view)
    rul = [r for r in records if r.get("est") == "rul"]
    health = [r for r in records if r.get("est") == "health"]
    # Little life left: one process alarm, raised once the estimate fell below 30 cycles.
    (alarm,) = [r for r in records if r["type"] == "alarm"]
    assert (alarm["alarm"], alarm["class"], alarm["detail"]["estimate"]) == ("limit", "process", "rul")
    assert alarm["value"] < 30.0
    assert life - 60 < next(int(r["detail"]["cycles"]) for r in rul if r["value"] < 30.0) < life
    assert ENGINE not in repr(records)
    assert len(rul) == len(health) >= life - 3
    cycles = [int(r["detail"]["cycles"]) for r in rul]
    assert cycles == list(range(1, len(rul) + 1))  # counted on through the restart
    # Untrusted until the model's window is full (30 cycles), then measured: every sensor spoke.
    assert {r["state"] for r in rul[:29]} == {"untrusted"}
    assert {r["state"] for r in rul[30:]} == {"measured"}
    assert len(rul[0]["src"]) == 14
    first, last = rul[30:60], rul[-20:]
    assert np.mean([r["value"] for r in first]) > 90.0  # a new engine: far from failure
    assert np.mean([r["value"] for r in last]) < 30.0  # near its end
    assert health[-1]["value"] == pytest.approx(100.0 * rul[-1]["value"] / 125.0)
    # The stated 90 % interval holds the true (capped) RUL most of the time.
    inside = [
        r["detail"]["lo90"] <= min(life - c, 125) <= r["detail"]["hi90"]
        for r, c in zip(rul[30:], cycles[30:], strict=True)
    ]
    assert np.mean(inside) >= 0.75
    assert rul[-1]["sd"] == pytest.approx(load_rul_model(MODELS, "rul_cmapss").card.interval_90 / 1.6449)
    # The twin's view: the latest RUL of the machine with its interval, the cycles seen, the
    # model and when; the low-RUL alarm on, with its estimate's value and limit.
    latest = rul[-1]
    shown = view.snapshot()["gw"]["subjects"][latest["subject"]]
    assert shown["estimates"]["rul"] == latest
    assert shown["estimates"]["health"] == health[-1]
    d = latest["detail"]
    text = view.render()
    sd = number(float(format(latest["sd"], ".2g")))
    assert (
        f"    estimate RUL={number(latest['value'])}±{sd} cycles "
        f"(90 %: {number(d['lo90'])}-{number(d['hi90'])}) measured, cycle {d['cycles']} [14 sources] "
        f"model=rul_cmapss at run {latest['run']} t={number(round(latest['t'], 1))}"
    ) in text.splitlines()
    assert (
        f"    on: limit RUL {number(alarm['value'])} (limit 30) low, {alarm['priority']} priority "
        f"since t={number(round(alarm['t'], 1))}" in text
    )


@needs_litert
def test_an_engine_estimated_on_litert_gives_the_numpy_ridges_estimates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gen = make_generator("engine", seed=5, rate_hz=1.0 / CYCLE_S)
    assert isinstance(gen, EngineGenerator)
    span = [(0.0, 45 * CYCLE_S)]  # the window filled, some measured cycles
    with caplog.at_level(logging.INFO, logger="gateway.estimation.rul"):
        lite = [r for r in _run(tmp_path / "litert", gen, span, backend="litert") if r.get("est") == "rul"]
    assert "estimation rul rul_cmapss 1 loaded (litert, fp32)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.estimation.rul"):
        ridge = [r for r in _run(tmp_path / "card", gen, span) if r.get("est") == "rul"]
    assert "estimation rul rul_cmapss 1 loaded (numpy, fp32)" in caplog.text  # the card's choice
    assert len(lite) == len(ridge) >= 40
    assert [r["detail"]["cycles"] for r in lite] == [r["detail"]["cycles"] for r in ridge]
    assert [r["state"] for r in lite] == [r["state"] for r in ridge]
    assert "measured" in {r["state"] for r in lite}
    # Both within RIDGE_TOLERANCE of onnxruntime's estimate on every row (tests/test_litert.py).
    values = np.array([[a["value"], b["value"]] for a, b in zip(lite, ridge, strict=True)])
    assert np.abs(values[:, 0] - values[:, 1]).max() < 2 * RIDGE_TOLERANCE
    assert values[:, 0].min() > 60.0  # a young engine: far from failure


@pytest.mark.campaign
@pytest.mark.parametrize("seed", range(8))
def test_every_simulated_engine_is_called_near_its_end_before_it_fails(tmp_path: Path, seed: int) -> None:
    # Eight engines (lives 150-300 cycles), each run whole through the pipeline without a restart.
    gen = make_generator("engine", seed=seed, rate_hz=1.0 / CYCLE_S)
    assert isinstance(gen, EngineGenerator)
    life = gen.life_cycles
    rul = [r for r in _run(tmp_path, gen, [(0.0, life * CYCLE_S)]) if r.get("est") == "rul"]
    measured = [r for r in rul if r["state"] == "measured"]
    truth = [min(life - int(r["detail"]["cycles"]), 125) for r in measured]
    errors = np.array([r["value"] for r in measured]) - np.array(truth)
    assert float(np.sqrt(np.mean(errors**2))) < 25.0
    assert (
        np.mean(
            [r["detail"]["lo90"] <= t <= r["detail"]["hi90"] for r, t in zip(measured, truth, strict=True)]
        )
        >= 0.75
    )
    # Twenty cycles before the end the interval already reaches below 40 cycles left.
    assert measured[-20]["detail"]["lo90"] < 40.0


def test_a_silent_input_delays_the_first_estimate_then_is_held_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gen = make_generator("engine", seed=1, rate_hz=1.0 / CYCLE_S)
    assert isinstance(gen, EngineGenerator)
    streams = _streams(gen)
    out: list[Estimate] = []
    section = EstimatorsSection(rul=[RulSpec(subject=ENGINE, prefix="Engine/", cycle_s=CYCLE_S, grace_s=1.0)])
    est = Estimation(section, {ENGINE: "industrial"}, out.append, lambda a: None)
    chunk = gen.generate(0.0, 40 * CYCLE_S)
    late = "Engine/W32"
    for name, s in chunk.series.items():
        keep = s.t >= 35 * CYCLE_S if name == late else s.t < 100 * CYCLE_S  # W32 silent at first
        est.put_block(
            SampleBlock(streams[name], T0 + s.t[keep], WALL0 + s.t[keep], s.value[keep], s.quality[keep])
        )
    est.tick(T0 + 40 * CYCLE_S, WALL0 + 40 * CYCLE_S)
    assert "no value yet of W32" in caplog.text
    rul = [e for e in out if e.name == "rul"]
    assert [int(e.detail["cycles"]) for e in rul] == list(range(1, len(rul) + 1))
    assert len(rul) == 5  # from cycle 35, when W32 first spoke
    # W32 silent again for a cycle: its last value is held and the estimate says so.
    est.put_block(
        SampleBlock(
            streams["Engine/T24"], np.array([T0 + 41 * CYCLE_S]), np.array([WALL0]), np.array([642.4]),
            np.zeros(1, np.uint8),
        )
    )  # fmt: skip
    est.tick(T0 + 43 * CYCLE_S, WALL0)
    assert out[-2].name == "rul"
    assert out[-2].state == "untrusted"  # a short history still counts first
    assert out[-2].detail["held"] == 13


@pytest.mark.skipif(not CMAPSS.is_dir(), reason=f"C-MAPSS FD001 not found under {DATA} (set EDGETWIN_DATA)")
def test_the_gateway_estimator_on_the_held_out_cmapss_test_engines() -> None:
    # Each test engine's rows as the gateway would receive them: one sample per sensor per cycle.
    model = load_rul_model(MODELS, "rul_cmapss")
    sensors = (2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21)
    a = np.loadtxt(CMAPSS / "test_FD001.txt")
    truth = np.minimum(np.loadtxt(CMAPSS / "RUL_FD001.txt"), 125.0)
    streams = {
        name: Stream("src", "e", "d", industrial_metric(f"FD001/{name}", "1"), "industrial", 1.0)
        for name in model.card.sensors
    }
    last: list[float] = []
    inside = 0
    for k, unit in enumerate(np.unique(a[:, 0])):
        rows = a[a[:, 0] == unit]
        out: list[Estimate] = []
        est = RulEstimator(
            RulSpec(subject="e", prefix="FD001/", cycle_s=1.0, grace_s=0.0),
            0,
            "industrial",
            out.append,
            model,
        )
        for c, row in enumerate(rows[:, [s + 4 for s in sensors]].tolist()):
            for name, value in zip(model.card.sensors, row, strict=True):
                est.update(name, streams[name], float(c), WALL0 + c, value, 0)
        est.tick(float(len(rows)) + 1.0)
        final = [e for e in out if e.name == "rul"][-1]
        assert int(final.detail["cycles"]) == len(rows)
        last.append(final.value)
        inside += final.detail["lo90"] <= truth[k] <= final.detail["hi90"]
    rmse = float(np.sqrt(np.mean((np.array(last) - truth) ** 2)))
    card = json.loads((MODELS / "rul_cmapss.card.json").read_text(encoding="utf-8"))
    # The gateway's own feature path reproduces the recipe's figure, below the SVR baseline.
    assert rmse == pytest.approx(card["evaluation"]["onnx_test_rmse"], abs=0.05)
    assert rmse < card["evaluation"]["baselines_rmse"]["SVR (Babu et al. 2016)"]
    assert inside / len(last) >= 0.8
