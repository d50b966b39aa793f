"""End to end: the PLC simulator over OPC UA, the gateway commissions the pump on its own normal
operation, then a valve fault (a kind the detector's settings never saw) raises one anomaly alarm
naming its contributing inputs; the same pressure tag alone, as a subject no model covers, raises
one alarm from the per-stream detector."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from peers import free_port

from drivers import REGISTRY
from drivers.opcua.plcsim import PlcSimProcess
from gateway import cli
from gateway.config import load
from gateway.runtime import run_gateway

# A minute of real time over OPC UA: in the fault campaign (pytest -m campaign).  The same story in
# compressed time, deterministic and in the default run: tests/test_stream_detector.py.
pytestmark = [pytest.mark.slow, pytest.mark.campaign]

SINGLE = "plant-A/line-pressure"
HOP_S = 0.1
COMMISSION_S = 20.0  # 200 windows (half a second each, 10 samples)
RUN_S = 50.0  # commissioning (~20 s after ~2-10 s of start) + 3 s + a 6 s fault + its clearing
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


def inject_when_commissioned(
    sim: PlcSimProcess, state: Path, injected: list[float], stop: threading.Event
) -> None:
    """Start a 6 s valve fault 3 s after both detectors have stored a commissioned state."""

    def done() -> bool:
        texts = [p.read_text(encoding="utf-8") for p in (state / "models").glob("*.json")]
        novelty = any('"fit": {' in t for t in texts)
        streams = any('"level": ' in t and '"level": null' not in t for t in texts)
        return novelty and streams

    deadline = time.monotonic() + RUN_S - 15.0
    while not stop.is_set() and time.monotonic() < deadline:
        if (state / "models").is_dir() and done():
            if not stop.wait(3.0):
                sim.command("fault valve_fault 6")
                injected.append(time.monotonic())
            return
        stop.wait(0.2)


def test_an_unseen_valve_fault_raises_one_novelty_alarm_and_one_per_stream_alarm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = PlcSimProcess(free_port(), "--rate-hz", "20", "--seed", "3")
    sim.start()
    try:
        snippet = tmp_path / "plc.toml"
        args = ["scan", "opcua", sim.endpoint, "--select", "Pump1/*/*", "--write-config", str(snippet)]
        assert cli.main([*args, "--name", "pump-3-plc", "--subject", "plant-A/pump-3"]) == 0
        # A second subject of one tag only, which no model scores: the per-stream detector's.
        single = tmp_path / "tag.toml"
        args = ["scan", "opcua", sim.endpoint, "--select", "Pump1/Hydraulics/Pressure"]
        args += ["--write-config", str(single), "--name", "line-plc", "--subject", SINGLE]
        assert cli.main(args) == 0
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
[models]
# Windows overlap five-fold at this hop: one odd sample touches five of them.  The on-delay is
# over one window length, as a site with short hops would set it.
raise_after_windows = 8
clear_after_windows = 10
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
        # The fault starts once both detectors have commissioned (their state files say so) and
        # the smoothing has settled, however long a loaded machine took to get there.
        injected: list[float] = []
        stop = threading.Event()
        worker = threading.Thread(
            target=inject_when_commissioned, args=(sim, tmp_path / "state", injected, stop)
        )
        worker.start()
        try:
            code = asyncio.run(
                run_gateway(config, REGISTRY, stop_after_s=RUN_S, install_signal_handlers=False)
            )
        finally:
            stop.set()
            worker.join(timeout=15.0)
        assert code == 0
        assert injected, "the detectors did not commission in time"
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
    # Windows were scored normal before the fault: the one alarm is the fault's.
    scored = [r["t"] for r in lines if r.get("type") == "features" and "novelty" in r.get("scores", {})]
    assert scored
    assert raised[0]["t"] - scored[0] >= 2.5
    # The lone pressure tag: one alarm from the per-stream detector, naming it, then cleared.
    stream_alarms = model_alarms("stream_change")
    assert [a["alarm"] for a in stream_alarms] == ["anomaly", "anomaly_cleared"], stream_alarms
    assert list(stream_alarms[0]["contrib"]) == ["Pump1/Hydraulics/Pressure"]
    assert abs(stream_alarms[0]["t"] - raised[0]["t"]) < 3.0
