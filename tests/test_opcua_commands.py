"""``edgetwin scan opcua`` and ``edgetwin sim plc`` against a real simulator process."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import free_port

from drivers.opcua.config import OpcUaConfig
from drivers.opcua.plcsim import PlcSimProcess
from gateway.cli import build_parser
from gateway.cli import main as edgetwin


@pytest.fixture(scope="module")
def plc() -> Iterator[PlcSimProcess]:
    sim = PlcSimProcess(free_port(), "--rate-hz", "5")
    sim.start()
    yield sim
    sim.stop()


def test_scan_prints_the_tree_with_types_units_and_values(
    plc: PlcSimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert edgetwin(["scan", "opcua", plc.endpoint]) == 0
    out = capsys.readouterr().out
    assert "urn:edgetwin:plcsim" in out
    assert "  2:Pump1  [Object]" not in out
    assert "2:Pump1  [Object]" in out
    assert "2:Current = " in out
    assert " A  [Double]" in out
    assert " bar  [Double]" in out
    assert " °C  [Double]" in out
    assert "2:Running = " in out
    assert "  [Boolean]" in out
    assert "2:SerialNumber = 'SN-PLC-0001'  [String]" in out
    assert "not numeric" in out
    assert "EngineeringUnits" not in out  # properties are shown as units, not as children
    assert "0:Server" not in out  # the standard Server object is not the plant


def test_scan_writes_a_config_snippet_that_validates(
    plc: PlcSimProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "plc.toml"
    code = edgetwin(
        [
            "scan",
            "opcua",
            plc.endpoint,
            "--select",
            "Pump1/Motor/*",
            "--select",
            "Pump1/Info/*",
            "--write-config",
            str(out_file),
            "--name",
            "pump-3-plc",
            "--subject",
            "plant-A/pump-3",
            "--json",
        ]
    )
    assert code == 0
    listed = json.loads(capsys.readouterr().out)
    assert {v["browse_path"].rpartition(":")[2] for v in listed["variables"]} == {
        "Current",
        "Voltage",
        "Temperature",
        "SerialNumber",
    }
    source = tomllib.loads(out_file.read_text(encoding="utf-8"))["sources"][0]
    assert source["name"] == "pump-3-plc"
    assert source["driver"] == "opcua"
    assert source["kind"] == "industrial"
    own = {k: v for k, v in source.items() if k not in ("name", "driver", "subject", "kind")}
    cfg = OpcUaConfig.model_validate(own)
    assert sorted(n.browse_path or "" for n in cfg.nodes) == [
        "2:Pump1/2:Motor/2:Current",
        "2:Pump1/2:Motor/2:Temperature",
        "2:Pump1/2:Motor/2:Voltage",
    ]  # the serial number is a string: left out


def test_scan_of_a_closed_port_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert edgetwin(["scan", "opcua", f"opc.tcp://127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    assert "ConnectionRefusedError" in capsys.readouterr().err


def test_sim_plc_command_line() -> None:
    args = build_parser().parse_args(
        ["sim", "plc", "--port", "4999", "--rate-hz", "5", "--fault", "valve_fault:10:20"]
    )
    assert args.port == 4999
    assert args.rate_hz == 5.0
    assert args.fault == ["valve_fault:10:20"]
    assert callable(args.func)
