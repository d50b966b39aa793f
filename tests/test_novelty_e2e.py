"""End to end: the PLC simulator over OPC UA, the gateway commissions the pump on its own normal
operation, then a valve fault (a kind the detector's settings never saw) raises one anomaly alarm
naming its contributing inputs; the same pressure tag alone, as a subject no model covers, raises
one alarm from the per-stream detector."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from peers import free_port
from test_opcua_commands import cli as scan_cli

from drivers import REGISTRY
from drivers.opcua.plcsim import PlcSimProcess
from gateway import cli
from gateway.config import load
from gateway.runtime import run_gateway

pytestmark = pytest.mark.slow

SINGLE = "plant-A/line-pressure"
HOP_S = 0.1
COMMISSION_S = 20.0  # 200 windows (half a second each, 10 samples)
INPUTS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Voltage",
    "Temperature",
    "Pressure",
    "FluidTemperature",
    "Flow",
)


def test_an_unseen_valve_fault_raises_one_novelty_alarm_and_one_per_stream_alarm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = PlcSimProcess(free_port(), "--rate-hz", "20", "--seed", "3")
    sim.start()
    try:
        snippet = tmp_path / "plc.toml"
        args = ["scan", "opcua", sim.endpoint, "--select", "Pump1/*/*", "--write-config", str(snippet)]
        assert scan_cli([*args, "--name", "pump-3-plc", "--subject", "plant-A/pump-3"]) == 0
        # A second subject of one tag only, which no model scores: the per-stream detector's.
        single = tmp_path / "tag.toml"
        args = ["scan", "opcua", sim.endpoint, "--select", "Pump1/Hydraulics/Pressure"]
        args += ["--write-config", str(single), "--name", "line-plc", "--subject", SINGLE]
        assert scan_cli(args) == 0
        path = tmp_path / "edgetwin.toml"
        path.write_text(
            f"""
[gateway]
state_dir = "{tmp_path / "state"}"
[pipeline]
window_s = 0.5
hop_s = {HOP_S}
grace_s = 0.2
[uplink]
kind = "local"
path = "{tmp_path / "out.jsonl"}"
[runtime]
drain_deadline_s = 3.0
[alarms]
defaults = false
[models.novelty]
commissioning_s = {COMMISSION_S}
subjects = ["plant-A/pump-3"]
inputs = {json.dumps(list(INPUTS))}
[models.streams]
commissioning_s = {COMMISSION_S}
"""
            + snippet.read_text(encoding="utf-8")
            + single.read_text(encoding="utf-8"),
            encoding="utf-8",
        )
        (tmp_path / "state").mkdir()
        capsys.readouterr()
        assert cli.main(["check", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        assert "subject plant-A/pump-3 (industrial): model novelty scores it (8 input streams)" in out
        assert f"subject {SINGLE} (industrial): model stream_change scores it (1 input streams)" in out
        config = load(path, REGISTRY)
        # Commissioning starts with the first complete window (~2 s after start); the fault
        # comes well after it ends and lasts long enough to be judged, then normal returns.
        fault_at = 3.0 + COMMISSION_S + 6.0
        timer = threading.Timer(fault_at, lambda: sim.command("fault valve_fault 6"))
        timer.start()
        try:
            code = asyncio.run(
                run_gateway(config, REGISTRY, stop_after_s=fault_at + 12.0, install_signal_handlers=False)
            )
        finally:
            timer.cancel()
        assert code == 0
    finally:
        sim.stop()
    lines = [json.loads(x)["record"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]

    def model_alarms(model: str) -> list[dict[str, Any]]:
        return [r for r in lines if r.get("type") == "alarm" and r.get("detail", {}).get("model") == model]

    alarms = model_alarms("novelty")
    raised = [a for a in alarms if a["alarm"] == "anomaly"]
    assert len(raised) == 1, alarms
    contributions = raised[0]["contrib"]
    assert contributions
    top = max(contributions, key=contributions.get)
    assert top.split(".")[0].rsplit("/", 1)[-1] in {"Pressure", "Flow"}, contributions
    assert [a["alarm"] for a in alarms][-1] == "anomaly_cleared"
    # Scored windows before the fault were not flagged: the one alarm is the fault's.
    assert raised[0]["t"] - lines[0]["t"] >= fault_at - 2.0
    # The lone pressure tag: one alarm from the per-stream detector, naming it, then cleared.
    stream_alarms = model_alarms("stream_change")
    assert [a["alarm"] for a in stream_alarms] == ["anomaly", "anomaly_cleared"], stream_alarms
    assert list(stream_alarms[0]["contrib"]) == ["Pump1/Hydraulics/Pressure"]
    assert stream_alarms[0]["t"] - lines[0]["t"] >= fault_at - 2.0
