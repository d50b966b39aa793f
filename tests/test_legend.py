"""The local legend: a technician maps the pseudonyms of the twin view back to beds and devices."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest

from drivers import REGISTRY
from gateway.cli import main
from gateway.config import load
from gateway.legend import FILE_NAME, Legend
from gateway.privatefile import writer_of
from gateway.runtime import run_gateway

PATIENT = "MRN-0048213-SMITH"
PUMP = "plant-A/pump-3"
MONITOR = "SN-MON-1187"


def _config(tmp: Path) -> Path:
    path = tmp / "gw.toml"
    path.write_text(
        f"""
[gateway]
name = "ward3-hub-17"
state_dir = "{tmp / "state"}"
[pipeline]
window_s = 1.0
hop_s = 0.5
grace_s = 0.1
[uplink]
kind = "local"
path = "{tmp / "out.jsonl"}"
[[sources]]
name = "bed7-monitor"
driver = "sim"
subject = "{PATIENT}"
profile = "patient"
device = "{MONITOR}"
rate_hz = 5.0
[[sources]]
name = "pump3-plc"
driver = "sim"
subject = "{PUMP}"
kind = "industrial"
profile = "pump"
device = "SN-PLC-20931"
rate_hz = 5.0
""",
        encoding="utf-8",
    )
    return path


def test_the_legend_names_every_pseudonym_the_twin_sees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path)
    config = load(path, REGISTRY)
    assert asyncio.run(run_gateway(config, REGISTRY, stop_after_s=2.5, install_signal_handlers=False)) == 0
    records = [json.loads(line)["record"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    on_wire_subjects = {r["subject"] for r in records if r["type"] == "features"}
    on_wire_devices = {s["dev"] for r in records if r["type"] == "features" for s in r["streams"]}
    assert len(on_wire_subjects) == 2

    assert main(["legend", "--config", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("LOCAL ONLY")
    rows = {line.split()[0]: line for line in text.splitlines()[2:]}
    for pseudonym in on_wire_subjects | on_wire_devices:
        assert pseudonym in rows, f"{pseudonym} has no legend row:\n{text}"
    patient_row = next(r for r in rows.values() if PATIENT in r)
    assert "subject" in patient_row
    assert "bed7-monitor" in patient_row
    device_row = next(r for r in rows.values() if MONITOR in r)
    assert device_row.split()[1] == "device"
    assert device_row.split()[0] in on_wire_devices
    # It stays on the gateway: a 0600 file in the state directory, and no identity on the wire.
    legend_file = tmp_path / "state" / FILE_NAME
    assert stat.S_IMODE(legend_file.stat().st_mode) == 0o600
    wire = (tmp_path / "out.jsonl").read_text()
    for identity in (PATIENT, PUMP, MONITOR, "bed7-monitor", "ward3-hub-17"):
        assert identity not in wire


def test_the_legend_holds_identities_not_pseudonyms_and_survives_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    legend = Legend(path)
    legend.note("device", "AA:BB:CC:DD:EE:FF", "bed7-oxi")
    legend.note("device", "AA:BB:CC:DD:EE:FF", "bed7-oxi")  # once
    assert writer_of(path).wait(30)  # written off the caller's thread
    assert json.loads(path.read_text()) == [["device", "AA:BB:CC:DD:EE:FF", "bed7-oxi"]]
    path.write_text("{damaged")
    assert Legend(path).entries() == []
