"""``edgetwin status`` on an OPC UA source whose driver finds a node gone: the stream says so.

A real ``edgetwin run`` reads a PLC simulator process on loopback; a node is deleted on the PLC
and put back.  The driver raises the node's fault (``bad_nodeidunknown``) and the twin is told;
the stream's own line in the status must say ``faulted`` while that condition is on, as the
headline and the alarm list do, not ``ok`` because the windower saw nothing wrong in its data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from peers import free_port
from test_observe_status import Gateway, Notify

from drivers.opcua.plcsim import NAMESPACE_URI, PlcSimProcess

pytestmark = pytest.mark.slow

PRESSURE = "Pump1/Hydraulics/Pressure"
CURRENT = "Pump1/Motor/Current"


def _state(snap: dict[str, Any], metric: str) -> str | None:
    return next(
        (st["status"] for s in snap["sources"] for st in s["streams"] if st["metric"] == metric), None
    )


def test_a_node_its_driver_found_gone_is_shown_faulted_until_it_is_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plc = PlcSimProcess(free_port(), "--rate-hz", "10")
    plc.start()
    config = tmp_path / "edgetwin.toml"
    config.write_text(
        f"""
[gateway]
name = "plant-gw"
state_dir = "{tmp_path / "state"}"
[pipeline]
window_s = 2.0
hop_s = 1.0
grace_s = 0.3
[runtime]
drain_deadline_s = 3.0
[uplink]
kind = "none"
[[sources]]
name = "plc"
driver = "opcua"
subject = "pump-3"
kind = "industrial"
endpoint = "{plc.endpoint}"
security_policy = "None"
security_mode = "None"
namespace_uri = "{NAMESPACE_URI}"
publishing_interval_ms = 100.0
verify_interval_s = 1.0
nodes = [{{ browse_path = "{CURRENT}" }}, {{ browse_path = "{PRESSURE}" }}]
"""
    )
    notify = Notify(tmp_path / "notify.sock")
    gw = Gateway(config, notify)
    try:
        gw.wait(capsys, lambda s: _state(s, PRESSURE) == "ok", "the pressure stream ok")
        plc.command("remove Pressure")
        snap = gw.wait(capsys, lambda s: any(a["kind"] == "sensor_fault" for a in s["alarms"]), "its fault")
        # Within the stream's loss time (15 s): the windower alone still calls it ok.
        assert _state(snap, PRESSURE) == "faulted", snap["sources"]
        assert _state(snap, CURRENT) == "ok"
        rc, text = gw.status(capsys)
        assert rc == 1, text
        line = next(x for x in text.splitlines() if x.strip().startswith(PRESSURE))
        assert " faulted " in line, line
        plc.command("add Pressure")
        snap = gw.wait(capsys, lambda s: not s["alarms"], "the fault ended")
        assert _state(snap, PRESSURE) == "ok"
    finally:
        err = gw.stop()
        notify.sock.close()
        plc.stop()
    assert gw.proc.returncode == 0, err
