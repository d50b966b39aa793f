"""MCU source configuration, its README sample, and a whole gateway run with a simulated node."""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from drivers.mcu.config import McuConfig
from drivers.mcu.driver import McuDriver, factory, token
from gateway.config import validate
from gateway.contracts import DriverSpec
from gateway.errors import InvalidConfigError
from gateway.runtime import run_gateway

README = Path(__file__).resolve().parents[1] / "drivers" / "mcu" / "README.md"
REGISTRY = {"mcu": DriverSpec("mcu", McuConfig, factory, "microcontroller nodes over a framed serial link")}


def test_readme_sample_config_is_valid() -> None:
    block = re.search(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert block is not None
    config = validate(tomllib.loads(block.group(1)), "README.md", REGISTRY)
    assert [s.info.name for s in config.sources] == ["motor7-adc", "bed12-probe"]
    port_cfg, sim_cfg = (s.config for s in config.sources)
    assert isinstance(port_cfg, McuConfig)
    assert isinstance(sim_cfg, McuConfig)
    assert port_cfg.port is not None
    assert sim_cfg.simulate is not None
    assert sim_cfg.simulate.node_id == "SIM-0012"
    assert isinstance(factory(config.sources[0].info, port_cfg), McuDriver)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({}, "exactly one of port"),
        ({"port": "/dev/ttyACM0", "simulate": {}}, "exactly one of port"),
        ({"port": "/dev/ttyACM0", "baud": 12345}, "baud 12345"),
        ({"port": "/dev/ttyACM0", "retries": "3"}, "valid integer"),
        ({"port": "/dev/ttyACM0", "parity": "even"}, "Extra inputs"),
        ({"simulate": {"drop_prob": 0.9}}, "less than or equal"),
        ({"simulate": {"node_id": "has space"}}, "pattern"),
    ],
)
def test_bad_configs_are_refused(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        McuConfig.model_validate(data)


def test_config_problems_are_reported_with_their_key_path() -> None:
    data = {"sources": [{"name": "n1", "driver": "mcu", "subject": "m", "port": "/dev/x", "silence_s": 0.1}]}
    with pytest.raises(InvalidConfigError) as info:
        validate(data, "gw.toml", REGISTRY)
    assert "sources[0].silence_s" in str(info.value)


def test_channel_names_become_diagnostic_tokens() -> None:
    assert token("motor_current") == "motor_current"
    assert token("Motor Current (A)") == "motor_current_a"
    assert token("3-phase") == "ch_3_phase"


def test_a_gateway_with_one_simulated_node_sends_features_and_no_identity(tmp_path: Path) -> None:
    node_id = "MOTOR-7731"
    data = tomllib.loads(
        f"""
[gateway]
state_dir = "{tmp_path / "state"}"
[pipeline]
window_s = 1.0
hop_s = 0.5
grace_s = 0.2
sensor_lost_s = 2.0
[uplink]
kind = "local"
path = "{tmp_path / "out.jsonl"}"
[[sources]]
name = "motor7-adc"
driver = "mcu"
subject = "plant-A/motor-7"
kind = "industrial"
report_s = 1.0
simulate = {{ node_id = "{node_id}", seed = 7, flash = "{tmp_path / "flash.bin"}" }}
"""
    )
    config = validate(data, "<test>", REGISTRY)
    code = asyncio.run(run_gateway(config, REGISTRY, stop_after_s=4.0, install_signal_handlers=False))
    assert code == 0
    text = (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines()]
    features = [r["record"] for r in records if r["record"]["type"] == "features"]
    assert features
    metrics = {s["metric"] for f in features for s in f["streams"]}
    assert metrics == {"motor_current", "winding_temp", "vibration"}
    current = [s for f in features for s in f["streams"] if s["metric"] == "motor_current" and s["n"] > 0]
    # An AC current is a waveform: its RMS is named, not hidden in a mean of about 0 A.
    assert {s["shape"] for s in current} == {"waveform"}
    assert any(s["features"]["rms"] == pytest.approx(4.2, rel=0.15) for s in current)
    # A window with fewer than FDOM_MIN_SAMPLES samples (the first after a slow start) has no fdom.
    assert any(s["features"].get("fdom") == pytest.approx(50.0, abs=1.0) for s in current)
    diags = {r["record"]["diag"] for r in records if r["record"]["type"] == "diag"}
    assert {"mcu_node", "mcu_link"} <= diags
    for identity in (node_id, "plant-A/motor-7", "motor7-adc"):
        assert identity not in text
