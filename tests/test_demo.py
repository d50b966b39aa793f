"""The README's first command: the demo runs every simulated device end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    # The twin received them over TLS MQTT, in sequence.
    assert any(r.get("topic") == "status" and r["record"].get("state") == "online" for r in records)
    seqs = [r["seq"] for r in records if r.get("seq") is not None]
    assert seqs == sorted(seqs)
    text = result.stdout
    for identity in (
        "patient-MRN-0048213",
        "patient-MRN-0051177",
        "A4:C1:38:5B:20:7E",
        "SIM-MOTOR-7",
        "plant-A",
    ):
        assert identity not in text
