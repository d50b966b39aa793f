"""Model coverage: the config `scan opcua --write-config --model` writes for the PLC simulator is scored;
without the input mapping `edgetwin check` names the missing inputs and fails."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import free_port

from drivers import REGISTRY
from drivers.opcua.plcsim import PlcSimProcess
from drivers.opcua.protocol import ScannedVariable
from drivers.opcua.scan import model_inputs
from gateway import cli
from gateway.config import load
from gateway.runtime import run_gateway
from gateway.supervisor import EXIT_CONFIG

pytestmark = pytest.mark.slow

HOP_S = 0.5
COMMISSION_S = 2.5


@pytest.fixture(scope="module")
def plc() -> Iterator[PlcSimProcess]:
    sim = PlcSimProcess(free_port(), "--rate-hz", "10")
    sim.start()
    yield sim
    sim.stop()


def write_config(tmp: Path, plc: PlcSimProcess, *, model: bool) -> Path:
    snippet = tmp / "plc.toml"
    args = ["scan", "opcua", plc.endpoint, "--select", "Pump1/*/*", "--write-config", str(snippet)]
    args += ["--name", "pump-3-plc", "--subject", "plant-A/pump-3"]
    if model:
        args += ["--model", "pump_skab"]
    assert cli.main(args) == 0
    text = snippet.read_text(encoding="utf-8")
    if not model:
        text += '\n[[models.use]]\nname = "pump_skab"\n'
    path = tmp / "edgetwin.toml"
    path.write_text(
        f"""
[gateway]
state_dir = "{tmp / "state"}"
[pipeline]
window_s = 1.0
hop_s = {HOP_S}
grace_s = 0.2
[uplink]
kind = "local"
path = "{tmp / "out.jsonl"}"
[runtime]
drain_deadline_s = 3.0
"""
        # Scored on the pipeline's 1 s window, not the card's 20 s one: the test is about the mapping
        # and commissioning, and a 20 s window filling up under load made its timing depend on load.
        + text.replace(
            'name = "pump_skab"', f'name = "pump_skab"\ncommissioning_s = {COMMISSION_S}\nwindow_s = 1.0'
        ),
        encoding="utf-8",
    )
    (tmp / "state").mkdir(exist_ok=True)
    return path


def test_the_scanned_config_with_the_model_mapping_is_scored_after_commissioning(
    plc: PlcSimProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, plc, model=True)
    text = path.read_text(encoding="utf-8")
    assert 'RateRMS = "Pump1/Hydraulics/Flow"' in text
    assert 'Thermocouple = "Pump1/Hydraulics/FluidTemperature"' in text
    capsys.readouterr()
    assert cli.main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "subject plant-A/pump-3 (industrial): model pump_skab scores it" in out
    config = load(path, REGISTRY)
    code = asyncio.run(
        run_gateway(config, REGISTRY, stop_after_s=COMMISSION_S + 6.0, install_signal_handlers=False)
    )
    assert code == 0
    lines = [json.loads(x)["record"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    windows = [r for r in lines if r["type"] == "features"]
    scored = [r for r in windows if math.isfinite(r.get("scores", {}).get("pump_skab", math.nan))]
    assert scored, "no window was scored"
    # Scored within the commissioning span (plus a few hops for the first complete windows).
    first = windows[0]["t"]
    assert scored[0]["t"] - first <= COMMISSION_S + 8 * HOP_S


def test_without_the_mapping_check_names_the_missing_inputs_and_fails(
    plc: PlcSimProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, plc, model=False)
    capsys.readouterr()
    assert cli.main(["check", "--config", str(path)]) == EXIT_CONFIG
    captured = capsys.readouterr()
    assert "model pump_skab will not score it: missing inputs Thermocouple, RateRMS" in captured.out
    assert 'inputs = { Thermocouple = "<stream>", RateRMS = "<stream>" }' in captured.out
    # A subject the model is not meant for is told how to leave it out rather than map nonsense.
    assert 'list those it is for: subjects = ["<subject>"]' in captured.out
    assert "fail  models: models pump_skab: scores no subject" in captured.out


def var(path: str, numeric: bool = True) -> ScannedVariable:
    return ScannedVariable(path, "ns=2;s=x", "Double", numeric, None, "0", 3)


def test_input_naming_prefers_exact_names_then_synonyms_and_uses_each_node_once() -> None:
    found: dict[str, Any]
    found, missing = model_inputs(
        ["Temperature", "Thermocouple", "RateRMS", "Voltage"],
        [
            var("2:Line/2:Motor/2:Temperature"),
            var("2:Line/2:Water/2:WaterTemperature"),
            var("2:Line/2:Flow", numeric=False),
        ],
    )
    assert found == {"Temperature": "Line/Motor/Temperature", "Thermocouple": "Line/Water/WaterTemperature"}
    assert missing == ["RateRMS", "Voltage"]


def test_coverage_names_uncovered_subjects_and_units_without_rules(caplog: pytest.LogCaptureFixture) -> None:
    from gateway.config import validate  # noqa: PLC0415
    from gateway.inference.coverage import log_coverage, subject_coverage  # noqa: PLC0415

    raw: dict[str, Any] = {
        "alarms": {"defaults": False},
        # The per-stream detector (on by default) would watch every industrial stream.
        "models": {"streams": {"enabled": False}},
        "sources": [
            {
                "name": "p",
                "driver": "sim",
                "subject": "pump-9",
                "kind": "industrial",
                "profile": "pump",
                "device": "D1",
            },
            {
                "name": "plc",
                "driver": "opcua",
                "subject": "line-2",
                "kind": "industrial",
                "endpoint": "opc.tcp://127.0.0.1:4840",
                "nodes": [{"browse_path": "2:Line2/2:Pressure", "unit": "counts"}],
            },
        ],
    }
    config = validate(raw, "<t>", REGISTRY)
    core = config.core
    pump, line = subject_coverage(config.sources, core.models, core.alarms)
    assert not pump.covered
    assert line.unit_notes == (
        "stream Line2/Pressure: unit 'counts' does not convert from the default rule's 'bar': "
        "no plausibility check; set [models.plausibility.'Line2/Pressure'] in its unit",
    )
    with caplog.at_level("WARNING", logger="gateway.inference.coverage"):
        log_coverage(config)
    assert any("subject pump-9 (industrial): NOT COVERED" in r.getMessage() for r in caplog.records)
    # By default the per-stream detector watches what no model covers.
    del raw["models"]
    default = validate(raw, "<t>", REGISTRY).core
    pump, line = subject_coverage(config.sources, default.models, default.alarms)
    assert pump.covered
    assert line.covered
    assert [c.model for c in pump.models] == ["stream_change"]
