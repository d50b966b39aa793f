"""The README's first command: the demo runs every simulated device end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.twin.decoder import LANE_BY_KIND

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
    # Fused heart rate of both beds, with its uncertainty and the sources that fed it.
    estimates = [r["record"] for r in records if r["record"].get("type") == "estimate"]
    measured = [e for e in estimates if e["state"] == "measured"]
    assert len({e["subject"] for e in measured}) == 2, estimates
    assert all(e["sd"] > 0 and 30 < e["value"] < 200 for e in measured)
    assert max(len(e["src"]) for e in measured) >= 2
    # The twin received them over TLS MQTT, in sequence.
    assert any(r.get("topic") == "status" and r["record"].get("state") == "online" for r in records)
    # In sequence within a lane, live and historical each (docs/records.md): a lane of higher
    # priority may overtake, and live records go ahead of the backlog queued before the connection.
    lanes: dict[str, list[int]] = {}
    for r in records:
        if r.get("seq") is not None:
            lane = LANE_BY_KIND[r["topic"].split("/", 1)[0]].name
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
