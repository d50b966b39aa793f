"""An OPC UA node's fault left on at a stop, judged after the restart: the pipeline with the real driver.

A node absent from the server when the gateway started never resolved: its fault was raised with
no stream and its place in the source's list (``item``).  The gateway stops with it on and starts
again: while the node is still absent nothing ends it (the other nodes' data say nothing about
it); once the server has it, its first usable value ends it as the driver would have, through the
alarm ledger and a real outbox to the twin's view.  A real PLC simulator process on loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import free_port
from test_alarm_restart import kinds
from test_alarm_source_removed import Site, config
from test_opcua_driver import fast_keys

from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.plcsim import PlcSimProcess

pytestmark = pytest.mark.slow

FLOW, PRESSURE = "Pump1/Hydraulics/Flow", "Pump1/Hydraulics/Pressure"


@pytest.fixture
def sim() -> Iterator[PlcSimProcess]:
    plc = PlcSimProcess(free_port(), "--rate-hz", "10")
    plc.start()
    yield plc
    plc.stop()


def plc_source(endpoint: str) -> dict[str, Any]:
    """Pump 1's PLC over OPC UA: flow, then pressure (item 1)."""
    keys = fast_keys(endpoint)
    keys["nodes"] = [{"browse_path": FLOW}, {"browse_path": PRESSURE}]
    return {"name": "plc", "driver": "opcua", "subject": "machine-7", "kind": "industrial", **keys}


def delivered(driver: OpcUaDriver, path: str) -> bool:
    """The node is good and has handed over a value of this run."""
    return driver.health[path] == "good" and path not in {
        driver.items[i].spec.address for i in driver.unproven
    }


def test_a_node_never_resolved_before_a_stop_is_ended_by_its_first_data_after_the_restart(
    tmp_path: Path, sim: PlcSimProcess
) -> None:
    site = Site(tmp_path)
    cfg = config(tmp_path, plc_source(sim.endpoint))
    sim.command("remove Pressure")  # absent when the gateway starts

    def absent(d: OpcUaDriver) -> bool:
        return d.health[PRESSURE] == "bad_nomatch" and delivered(d, FLOW)

    first = site.restart(cfg, OpcUaDriver, absent, "the absent node's fault and flow data")
    assert kinds(first) == [("sensor_fault", None)]
    assert first[0]["detail"] == {"status": "bad_nomatch", "item": 1}
    assert "dev" not in first[0]  # raised with no stream: the node never resolved
    assert len(site.subject("machine-7").active) == 1

    # Still absent after the restart: flow's first data does not end the pressure node's fault,
    # and the fresh driver's raise of it is not sent a second time (it is on at the twin).
    second = site.restart(cfg, OpcUaDriver, absent, "the absent node's fault and flow data")
    assert second == [], second
    assert len(site.subject("machine-7").active) == 1

    # Added while the gateway was down: its first data after the start ends the fault.
    sim.command("add Pressure")
    third = site.restart(cfg, OpcUaDriver, lambda d: delivered(d, PRESSURE), "the node's data")
    assert kinds(third) == [("sensor_restored", None)], third
    assert third[0]["detail"] == {"after": "sensor_fault", "status": "good", "item": 1}
    assert site.subject("machine-7").active == {}

    # The next start, with nothing on, sends nothing for it.
    assert site.restart(cfg, OpcUaDriver, lambda d: delivered(d, PRESSURE), "the node's data") == []
