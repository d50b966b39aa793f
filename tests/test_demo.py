"""The README's first command: the demo runs every simulated device end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.twin.decoder import LANE_OF

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_all_devices_and_shows_anonymous_records(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "demo",
            "--duration",
            "14",
            "--json",
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "left out" not in result.stdout, result.stdout
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    features = [r["record"] for r in records if r["record"].get("type") == "features"]
    kinds = {f.get("kind") for f in features}
    assert kinds == {"medical", "industrial"}
    metrics = {s["metric"] for f in features for s in f["streams"]}
    # One metric from each transport: sim, serial oximeter, BLE strap, OPC UA PLC, microcontroller node.
    assert {
        "MDC_TEMP_BODY",
        "MDC_PULS_OXIM_PULS_RATE",
        "MDC_ECG_HEART_RATE",
        "Pump1/Motor/Current",
        "motor_current",
    } <= metrics
    # The twin's final view of every simulated device lies within the simulators' ground truth:
    # each device's baseline range (drivers/sim/protocol.py, drivers/serial/sim.py, the BLE strap,
    # the PLC's pump model) widened by its drift and noise; the desaturation starts after the run.
    truth = {
        ("MDC_PULS_OXIM_SAT_O2", "mean"): (95.0, 99.5),
        ("MDC_ECG_HEART_RATE", "mean"): (55.0, 90.0),
        ("MDC_PULS_OXIM_PULS_RATE", "mean"): (56.0, 88.0),
        ("MDC_ECG_TIME_PD_RR_GL", "mean"): (650.0, 1100.0),
        ("MDC_RESP_RATE", "mean"): (10.0, 20.0),
        ("MDC_TEMP_BODY", "mean"): (36.4, 37.3),
        ("Pump1/Motor/Current", "mean"): (1.1, 1.5),
        ("Pump1/Motor/Voltage", "mean"): (224.0, 238.0),
        ("winding_temp", "mean"): (35.0, 60.0),
    }
    final: dict[tuple[str, str], dict[str, float]] = {}
    for f in sorted(features, key=lambda f: (f["run"], f["t"])):
        for s in f["streams"]:
            if s["n"] > 0 and not s.get("unchanged"):  # a marker: the values before still hold
                final[(f["subject"], s["metric"])] = s["features"]
    checked = 0
    for (_, metric), values in final.items():
        for (name, feature), (low, high) in truth.items():
            if name == metric and feature in values:
                assert low <= values[feature] <= high, (metric, feature, values[feature])
                checked += 1
    assert checked >= 8, final
    # The motor node's waveforms read as the simulator made them (firmware_bridge/firmware/sim_node.c):
    # a 50 Hz phase current of 4.2 A RMS (+-2.5 % per node, +-5 % load cycle) and a vibration at
    # the 24.6 Hz shaft rate; a mean would have shown about 0 A and 0 g.
    node = {s["metric"]: s for f in features for s in f["streams"] if s["n"] > 0}
    current, vibration = node["motor_current"]["features"], node["vibration"]["features"]
    assert current["rms"] == pytest.approx(4.2, rel=0.1)
    assert current["fdom"] == pytest.approx(50.0, abs=1.0)
    assert vibration["fdom"] == pytest.approx(24.6, abs=0.5)
    assert abs(current["mean"]) < 0.2
    # Fused heart rate of both beds, with its uncertainty and the sources that fed it.
    estimates = [r["record"] for r in records if r["record"].get("type") == "estimate"]
    measured = [e for e in estimates if e["state"] == "measured" and e["est"] == "hr"]
    assert len({e["subject"] for e in measured}) == 2, estimates
    assert all(e["sd"] > 0 and 30 < e["value"] < 200 for e in measured)
    assert max(len(e["src"]) for e in measured) >= 2
    # The strap's own battery level as its SoC; the wearing engine's remaining life in its interval.
    soc = [e for e in estimates if e["est"] == "soc"]
    assert soc
    assert all(0 <= e["value"] <= 100 and e["src"][0]["metric"] == "MDC_ATTR_VAL_BATT_CHARGE" for e in soc)
    rul = [e for e in estimates if e["est"] == "rul"]
    assert len(rul) > 30
    assert all(e["detail"]["lo90"] <= e["value"] <= e["detail"]["hi90"] and len(e["src"]) == 14 for e in rul)
    # The twin received them over TLS MQTT, in sequence.
    assert any(r.get("topic") == "status" and r["record"].get("state") == "online" for r in records)
    # In sequence within a lane, live and historical each (docs/records.md): a lane of higher
    # priority may overtake, and live records go ahead of the backlog queued before the connection.
    lanes: dict[str, list[int]] = {}
    for r in records:
        if r.get("seq") is not None:
            lane = LANE_OF[r["topic"].split("/", 1)[0]]
            lanes.setdefault(f"{lane}{' historical' if r.get('historical') else ''}", []).append(r["seq"])
    assert lanes
    assert all(seqs == sorted(seqs) for seqs in lanes.values()), lanes
    text = result.stdout
    for identity in (
        "patient-MRN-0048213",
        "patient-MRN-0051177",
        "A4:C1:38:5B:20:7E",
        "SIM-MOTOR-7",
        "plant-A",
    ):
        assert identity not in text
