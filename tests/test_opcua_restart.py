"""An OPC UA node's fault left on at a stop, judged after the restart: the pipeline with the real driver.

A node absent from the server when the gateway started never resolved: its fault was raised with
no stream, named by its configured browse path (``node``, a pseudonym on the wire) and its place
in the source's list (``item``).  The gateway stops with it on and starts again: while the node is
still absent nothing ends it (the other nodes' data say nothing about it); once the server has
it, its first usable value ends it as the driver would have, through the alarm ledger and a real
outbox to the twin's view.  The list reordered between two starts changes nothing of that: each
fault is ended by its own node's data.  A real PLC simulator process on loopback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import free_port
from test_alarm_restart import kinds
from test_alarm_source_removed import Site, config
from test_opcua_driver import fast_keys

from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.plcsim import PlcSimProcess
from gateway.sample import UNUSABLE_FLAGS

pytestmark = pytest.mark.slow

FLOW, PRESSURE, CURRENT = "Pump1/Hydraulics/Flow", "Pump1/Hydraulics/Pressure", "Pump1/Motor/Current"


@pytest.fixture
def sim() -> Iterator[PlcSimProcess]:
    plc = PlcSimProcess(free_port(), "--rate-hz", "10")
    plc.start()
    yield plc
    plc.stop()


def plc_source(endpoint: str, paths: tuple[str, ...] = (FLOW, PRESSURE)) -> dict[str, Any]:
    """Pump 1's PLC over OPC UA: flow, then pressure (item 1), or the nodes at ``paths``."""
    keys = fast_keys(endpoint)
    keys["nodes"] = [{"browse_path": p} for p in paths]
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
    node = first[0]["detail"].pop("node")  # the node's pseudonym (its source and browse path)
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
    assert third[0]["detail"] == {"after": "sensor_fault", "status": "good", "item": 1, "node": node}
    assert site.subject("machine-7").active == {}

    # The next start, with nothing on, sends nothing for it.
    assert site.restart(cfg, OpcUaDriver, lambda d: delivered(d, PRESSURE), "the node's data") == []


def test_a_reordered_node_list_ends_the_fault_of_the_node_that_came_back_and_keeps_the_other(
    tmp_path: Path, sim: PlcSimProcess
) -> None:
    site = Site(tmp_path)
    sim.command("remove Pressure")  # both absent when the gateway starts
    sim.command("remove Current")
    before = config(tmp_path, plc_source(sim.endpoint, (FLOW, PRESSURE, CURRENT)))

    def absent(d: OpcUaDriver) -> bool:
        return d.health[PRESSURE] == d.health[CURRENT] == "bad_nomatch" and delivered(d, FLOW)

    first = site.restart(before, OpcUaDriver, absent, "both absent nodes' faults and flow data")
    assert kinds(first) == [("sensor_fault", None)] * 2
    node = {a["detail"]["item"]: a["detail"]["node"] for a in first}
    assert sorted(node) == [1, 2]  # pressure's fault at item 1, current's at item 2
    pressure, current = node[1], node[2]

    # The list reordered: current first (item 0), flow at item 1, pressure at 2.  Both still absent:
    # their fresh raises at their new places are the faults on, and flow's first data (at the
    # place pressure had) ends nothing.
    after = config(tmp_path, plc_source(sim.endpoint, (CURRENT, FLOW, PRESSURE)))
    second = site.restart(after, OpcUaDriver, absent, "both absent nodes' faults and flow data")
    assert second == [], second
    assert len(site.subject("machine-7").active) == 2

    # Pressure added while the gateway was down: its first data ends its own fault, not current's.
    sim.command("add Pressure")

    def back(d: OpcUaDriver) -> bool:
        return d.health[CURRENT] == "bad_nomatch" and delivered(d, PRESSURE) and delivered(d, FLOW)

    third = site.restart(after, OpcUaDriver, back, "pressure's data with current absent")
    assert kinds(third) == [("sensor_restored", None)], third
    assert third[0]["detail"] == {"after": "sensor_fault", "status": "good", "item": 2, "node": pressure}
    (on,) = site.subject("machine-7").active.values()
    assert (on.detail["node"], on.detail["item"]) == (current, 2)  # as raised before the reorder

    sim.command("add Current")  # its first data at its new place ends it in turn
    fourth = site.restart(after, OpcUaDriver, lambda d: delivered(d, CURRENT), "current's data")
    assert kinds(fourth) == [("sensor_restored", None)], fourth
    assert fourth[0]["detail"] == {"after": "sensor_fault", "status": "good", "item": 0, "node": current}
    assert site.subject("machine-7").active == {}


def test_a_node_never_resolved_taken_off_the_list_has_its_fault_ended_at_the_restart(
    tmp_path: Path, sim: PlcSimProcess
) -> None:
    site = Site(tmp_path)
    sim.command("remove Pressure")
    sim.command("remove Current")
    both = config(tmp_path, plc_source(sim.endpoint, (FLOW, PRESSURE, CURRENT)))

    def absent(d: OpcUaDriver) -> bool:
        return d.health[PRESSURE] == d.health[CURRENT] == "bad_nomatch" and delivered(d, FLOW)

    first = site.restart(both, OpcUaDriver, absent, "both absent nodes' faults and flow data")
    node = {a["detail"]["item"]: a["detail"]["node"] for a in first}
    # Pressure taken off the list: nothing could end its fault any more, so the start ends it;
    # current, still listed (now at item 1) and still absent, stays on.
    fewer = config(tmp_path, plc_source(sim.endpoint, (FLOW, CURRENT)))

    def current_absent(d: OpcUaDriver) -> bool:
        return d.health[CURRENT] == "bad_nomatch" and delivered(d, FLOW)

    second = site.restart(fewer, OpcUaDriver, current_absent, "current's fault and flow data")
    assert kinds(second) == [("sensor_restored", "stream_removed")], second
    assert second[0]["detail"] == {
        "after": "sensor_fault",
        "status": "bad_nomatch",
        "item": 1,
        "node": node[1],
        "ended": "stream_removed",
    }
    (on,) = site.subject("machine-7").active.values()
    assert on.detail["node"] == node[2]


ACCEL = "Pump1/Vibration/Accelerometer1RMS"


def unusable(driver: OpcUaDriver, path: str) -> bool:
    """The node has a value of this run, none of them usable."""
    item = next(i for i in driver.items if i.spec.address == path)
    last = item.last
    return item.index in driver.unproven and last is not None and bool(last.quality & UNUSABLE_FLAGS)


def test_a_node_never_resolved_before_a_stop_and_faulted_on_its_stream_before_its_first_value_is_ended(
    tmp_path: Path, sim: PlcSimProcess
) -> None:
    site = Site(tmp_path)
    cfg = config(tmp_path, plc_source(sim.endpoint, (FLOW, ACCEL)))
    sim.command("remove Accelerometer1RMS")

    def absent(d: OpcUaDriver) -> bool:
        return d.health[ACCEL] == "bad_nomatch" and delivered(d, FLOW)

    first = site.restart(cfg, OpcUaDriver, absent, "the absent node's fault and flow data")
    assert kinds(first) == [("sensor_fault", None)]
    node = first[0]["detail"]["node"]

    # Back, but its values Bad_SensorFailure for a while: after the restart it resolves (a stream)
    # with no usable value yet, turns non-numeric (a fault on its stream), numeric again, and only
    # then delivers.  Its first usable value ends the fault left on by its node too.
    sim.command("add Accelerometer1RMS")
    sim.command("fault sensor_off 8")

    def unproven(d: OpcUaDriver) -> bool:
        return d.health[ACCEL] == "good" and unusable(d, ACCEL)

    def mistyped(d: OpcUaDriver) -> bool:
        return d.health[ACCEL] == "bad_typemismatch"

    steps: list[tuple[Callable[[OpcUaDriver], bool], str]] = [
        (unproven, "retype Accelerometer1RMS string"),
        (mistyped, "retype Accelerometer1RMS double"),
    ]

    def script(d: OpcUaDriver) -> bool:
        if steps and steps[0][0](d):
            sim.command(steps.pop(0)[1])
        return not steps and delivered(d, ACCEL)

    # Until the windower has seen its usable values for sensor_restore_s too (five alarms).
    what = "the node faulted on its stream, then its data"
    second = asyncio.run(site.start(cfg, OpcUaDriver, script, what, sent=5))
    raised = [("sensor_fault", None)] * 2  # its bad values (the windower's), then its type
    assert kinds(second) == [*raised, *[("sensor_restored", None)] * 3], second
    bad_values, on_stream, stream_ended, node_ended, values_ended = second
    assert on_stream["detail"] == {"status": "bad_typemismatch"}
    assert "dev" in on_stream  # on its stream: another condition than its node's
    assert stream_ended["detail"] == {"after": "sensor_fault", "status": "good"}
    assert node_ended["detail"] == {"after": "sensor_fault", "status": "good", "item": 1, "node": node}
    # The stream's two faults (its bad values, the device's flags; its type, the driver's) are two
    # conditions, each ended by its own judge; with its node's, nothing is left on.
    assert bad_values["detail"] == {"quality": 8}
    assert values_ended["detail"] == {"after": "sensor_fault", "quality": 0}
    assert site.subject("machine-7").active == {}
