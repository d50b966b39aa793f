"""Across a restart, a condition of a stream or device its still-configured source no longer has.

The pipeline's own path (a real outbox, the anonymizer, the twin's view of the decoded records),
stopped with alarms on and started again on the same state directory, as tests/test_alarm_restart.py
does.  What the new configuration can never end is ended at the start with a true reason
(``stream_removed``, ``device_changed``); a stream still configured but not delivering yet keeps
its condition.  A device that names itself (a PLC's server URI, an oximeter's serial number) is
judged by the source's first data after the start.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from test_alarm_restart import feed, feed_from, kinds, run
from test_alarm_source_removed import WALL, Site, config

from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.contracts import Lane
from gateway.outbox import AsyncOutbox, Outbox
from gateway.records import as_map, decode
from gateway.runtime import Pipeline
from gateway.sample import MDC, Metric, Stream

ENDPOINT = "opc.tcp://127.0.0.1:4840"
PRESSURE = {"browse_path": "Pump1/Hydraulics/Pressure", "name": "Pump1/Pressure"}
FLOW = {"browse_path": "Pump1/Hydraulics/Flow", "name": "Pump1/RateRMS", "unit": "l/min"}


def plc(*nodes: dict[str, Any]) -> dict[str, Any]:
    """Pump 1's PLC over OPC UA, reading ``nodes``."""
    return {
        "name": "plc",
        "driver": "opcua",
        "subject": "machine-7",
        "kind": "industrial",
        "endpoint": ENDPOINT,
        "security_policy": "None",
        "security_mode": "None",
        "namespace_uri": "urn:edgetwin:plcsim",
        "nodes": list(nodes),
    }


def plc_streams(server_uri: str) -> tuple[Stream, Stream]:
    """The pressure and flow streams as the driver names them for the server ``server_uri``."""
    device = f"{server_uri} at {ENDPOINT}"
    return tuple(  # type: ignore[return-value]
        Stream("plc", "machine-7", device, Metric(n["name"], n.get("unit", "bar")), "industrial", 1.0)
        for n in (PRESSURE, FLOW)
    )


PRESS_A, FLOW_A = plc_streams("urn:plc-a")
PRESS_B, _ = plc_streams("urn:plc-b")
LOW = {PRESS_A: (0.5, 0), FLOW_A: (10.0, 0)}  # both beyond their low-low limits


def test_a_node_taken_off_the_list_ends_its_condition_and_a_silent_node_keeps_its_own(tmp_path: Path) -> None:
    site = Site(tmp_path)
    both = (plc(PRESSURE, FLOW),)
    assert kinds(run(site, tmp_path, feed_from(100.0, LOW, 20), sources=both)) == [("limit", None)] * 2

    # The pressure node is off the list; the flow node is listed but has not delivered yet.
    after = run(site, tmp_path, feed_from(1000.0, {}, 1), sources=(plc(FLOW),), start=1000.0)
    assert kinds(after) == [("limit_cleared", "stream_removed")]
    assert after[0]["metric"] == "Pump1/Pressure"
    assert after[0]["detail"]["level"] == "low_low"
    (on,) = site.subject("machine-7").active.values()
    assert on.metric == "Pump1/RateRMS"  # may still hold: kept

    back = run(site, tmp_path, feed_from(2000.0, {FLOW_A: (40.0, 0)}, 40), sources=(plc(FLOW),))
    assert kinds(back) == [("limit_cleared", None)]  # and its own data end it as usual
    assert site.subject("machine-7").active == {}


def test_a_plc_answering_as_another_server_after_the_restart_starts_afresh(tmp_path: Path) -> None:
    site = Site(tmp_path)
    both = (plc(PRESSURE, FLOW),)
    assert kinds(run(site, tmp_path, feed_from(100.0, LOW, 20), sources=both)) == [("limit", None)] * 2

    # Another PLC at the same endpoint, its pressure as low: the old one's conditions end, its own is raised.
    after = run(site, tmp_path, feed_from(1000.0, {PRESS_B: (0.5, 0)}, 20), sources=both, start=1000.0)
    assert sorted(kinds(after)) == [
        ("limit", None),
        ("limit_cleared", "device_changed"),
        ("limit_cleared", "device_changed"),
    ]
    assert kinds(after)[:2] == [("limit_cleared", "device_changed")] * 2  # with its first data
    (on,) = site.subject("machine-7").active.values()
    assert (on.alarm, on.metric, on.dev) == ("limit", "Pump1/Pressure", after[-1]["dev"])
    assert on.dev != after[0]["dev"]


def test_a_plc_answering_as_the_same_server_keeps_its_conditions(tmp_path: Path) -> None:
    site = Site(tmp_path)
    both = (plc(PRESSURE, FLOW),)
    assert kinds(run(site, tmp_path, feed_from(100.0, LOW, 20), sources=both)) == [("limit", None)] * 2
    assert run(site, tmp_path, feed_from(1000.0, LOW, 20), sources=both) == []  # still low: nothing new
    assert len(site.subject("machine-7").active) == 2


OX = {"name": "ox", "driver": "serial", "subject": "bed-1", "port": "/dev/ttyUSB7"}
SPO2 = MDC["MDC_PULS_OXIM_SAT_O2"]


def oximeter(device: str) -> Stream:
    return Stream("ox", "bed-1", device, SPO2, rate_hz=1.0)


def test_an_oximeter_named_by_its_port_before_its_serial_number_is_not_taken_for_another(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    first = run(site, tmp_path, feed_from(100.0, {oximeter("SN-1"): (86.0, 0)}, 12), sources=(OX,))
    assert kinds(first) == [("limit", None)]

    async def port_first(pipeline: Any) -> None:
        # The driver names the monitor by its port until two lines agree on its serial number.
        t = await feed(pipeline, 1000.0, 2, {oximeter("/dev/ttyUSB7"): (86.0, 0)})
        await feed(pipeline, t, 12, {oximeter("SN-1"): (86.0, 0)})

    assert run(site, tmp_path, port_first, sources=(OX,)) == []  # the same monitor, still low
    assert len(site.subject("bed-1").active) == 1

    other = run(site, tmp_path, feed_from(2000.0, {oximeter("SN-2"): (97.0, 0)}, 5), sources=(OX,))
    assert kinds(other) == [("limit_cleared", "device_changed")]
    assert site.subject("bed-1").active == {}


PORT = "/dev/ttyUSB7"
PULSE = MDC["MDC_PULS_OXIM_PULS_RATE"]


def test_conditions_raised_under_the_port_are_ended_by_the_monitors_data_once_it_names_itself(
    tmp_path: Path,
) -> None:
    # The monitor never sent its serial number before the stop: its condition is the port's.
    site = Site(tmp_path)
    first = run(site, tmp_path, feed_from(100.0, {oximeter(PORT): (86.0, 0)}, 12), sources=(OX,))
    assert kinds(first) == [("limit", None)]
    raised_dev = first[0]["dev"]

    async def port_then_serial(pipeline: Any) -> None:
        # Its first lines after the start come under the port, then it names itself, back at 97 %.
        t = await feed(pipeline, 1000.0, 2, {oximeter(PORT): (86.0, 0)})
        await feed(pipeline, t, 20, {oximeter("SN-1"): (97.0, 0)})

    after = run(site, tmp_path, port_then_serial, sources=(OX,))
    assert kinds(after) == [("limit_cleared", None)]  # the ordinary clearance, by its data
    assert after[0]["dev"] == raised_dev  # of the condition the twin holds, under the name it was raised
    assert site.subject("bed-1").active == {}


def test_a_monitor_naming_itself_first_after_the_restart_keeps_what_was_raised_under_its_port(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    assert kinds(run(site, tmp_path, feed_from(100.0, {oximeter(PORT): (86.0, 0)}, 12), sources=(OX,))) == [
        ("limit", None)
    ]
    # Its serial number comes with its first data: no evidence it is another monitor.
    assert run(site, tmp_path, feed_from(1000.0, {oximeter("SN-1"): (86.0, 0)}, 12), sources=(OX,)) == []
    assert len(site.subject("bed-1").active) == 1
    back = run(site, tmp_path, feed_from(2000.0, {oximeter("SN-1"): (97.0, 0)}, 20), sources=(OX,))
    assert kinds(back) == [("limit_cleared", None)]
    assert site.subject("bed-1").active == {}


def test_a_monitor_naming_itself_during_a_run_leaves_no_port_stream_lost_and_keeps_its_condition(
    tmp_path: Path,
) -> None:
    # No restart: the monitor's first lines come without a serial number (as while it boots), its
    # SpO2 low; then it names itself, back at 97 %.  The port's streams are its own: not lost.
    site = Site(tmp_path)

    async def boot_then_named(pipeline: Any) -> None:
        t = await feed(pipeline, 100.0, 12, {oximeter(PORT): (86.0, 0)})
        await feed(pipeline, t, 40, {oximeter("SN-1"): (97.0, 0)})

    alarms = run(site, tmp_path, boot_then_named, sources=(OX,))
    assert kinds(alarms) == [("limit", None), ("limit_cleared", None)]
    assert alarms[1]["dev"] == alarms[0]["dev"]
    assert site.subject("bed-1").active == {}


def test_a_monitor_naming_itself_during_a_run_keeps_the_samples_it_sent_under_its_port(
    tmp_path: Path,
) -> None:
    # 30 s windows; the monitor sends SpO2 86 % under its port from 1000 s, names itself at 1035 s
    # reading 97 %.  The window 1020-1050 holds both halves, as one stream of the monitor's.
    cfg = config(tmp_path, OX, pipeline={"window_s": 30.0, "hop_s": 30.0, "grace_s": 0.0})
    pseudonym = Pseudonymizer(b"w" * 32)
    anon = Anonymizer(pseudonym, time_mode="relative", start_wall=WALL)

    async def main() -> list[dict[str, Any]]:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            pipeline = Pipeline(cfg, anon, outbox)
            await pipeline.end_vanished(0.0, WALL)
            t = await feed(pipeline, 1000.0, 35, {oximeter(PORT): (86.0, 0)})
            await feed(pipeline, t, 30, {oximeter("SN-1"): (97.0, 0)})
            await outbox.flush()
            return [as_map(decode(i.payload)) for i in await outbox.lease(1000) if i.lane == Lane.FEATURES]

    windows = {w["t"]: w["streams"] for w in asyncio.run(main())}
    assert sorted(windows) == [1020.0, 1050.0]
    (both,) = windows[1050.0]
    assert (both["n"], both["missing"]) == (30, 0.0)  # 15 samples under the port, 15 under SN-1
    assert (both["features"]["min"], both["features"]["max"]) == (86.0, 97.0)
    assert both["dev"] == pseudonym("device", "SN-1")


def test_conditions_under_the_port_end_as_device_changed_when_another_serial_number_was_recorded(
    tmp_path: Path,
) -> None:
    # Before the stop: SpO2 low under the serial number SN-1, the pulse low under the port (lines
    # before the monitor named itself).  After it: SN-2 names itself, another monitor.
    site = Site(tmp_path)

    async def both(pipeline: Any) -> None:
        t = await feed(pipeline, 100.0, 12, {Stream("ox", "bed-1", PORT, PULSE, rate_hz=1.0): (30.0, 0)})
        await feed(pipeline, t, 12, {oximeter("SN-1"): (86.0, 0)})

    assert kinds(run(site, tmp_path, both, sources=(OX,))) == [("limit", None)] * 2
    other = run(site, tmp_path, feed_from(1000.0, {oximeter("SN-2"): (97.0, 0)}, 5), sources=(OX,))
    assert kinds(other) == [("limit_cleared", "device_changed")] * 2
    assert site.subject("bed-1").active == {}

    # The same again, but SN-1 comes back: the pulse's condition is its own, and ends by its data.
    site = Site(tmp_path / "again")
    assert kinds(run(site, tmp_path / "again", both, sources=(OX,))) == [("limit", None)] * 2
    pulse = Stream("ox", "bed-1", "SN-1", PULSE, rate_hz=1.0)
    same = run(
        site,
        tmp_path / "again",
        feed_from(1000.0, {oximeter("SN-1"): (86.0, 0), pulse: (70.0, 0)}, 20),
        sources=(OX,),
    )
    assert kinds(same) == [("limit_cleared", None)]
    assert same[0]["metric"] == "MDC_PULS_OXIM_PULS_RATE"
    assert len(site.subject("bed-1").active) == 1  # SpO2 still low on SN-1


def wearables(*devices: tuple[str, str]) -> dict[str, Any]:
    """A BLE source reading ``devices`` (address, profile) on bed 1."""
    listed = [{"address": a, "profile": p} for a, p in devices]
    return {"name": "ble", "driver": "ble", "subject": "bed-1", "devices": listed}


A, B, C = "AA:BB:CC:DD:EE:01", "AA:BB:CC:DD:EE:02", "AA:BB:CC:DD:EE:03"


def test_a_wearable_replaced_or_changed_in_the_allowlist_has_its_conditions_ended_at_the_start(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    spo2 = Stream("ble", "bed-1", A, SPO2, rate_hz=1.0)
    hr = Stream("ble", "bed-1", B, MDC["MDC_ECG_HEART_RATE"], rate_hz=1.0)
    before = (wearables((A, "plx"), (B, "hr")),)
    low = {spo2: (86.0, 0), hr: (30.0, 0)}
    assert kinds(run(site, tmp_path, feed_from(100.0, low, 12), sources=before)) == [("limit", None)] * 2

    # The strap B is replaced by C; the oximeter A stays (its condition too).
    swapped = (wearables((A, "plx"), (C, "hr")),)
    after = run(site, tmp_path, feed_from(1000.0, {}, 1), sources=swapped, start=1000.0)
    assert kinds(after) == [("limit_cleared", "device_changed")]
    assert after[0]["metric"] == "MDC_ECG_HEART_RATE"
    (on,) = site.subject("bed-1").active.values()
    assert on.metric == "MDC_PULS_OXIM_SAT_O2"

    # A's profile changed: it no longer gives SpO2, so nothing could end that condition.
    thermo = (wearables((A, "thermo"), (C, "hr")),)
    last = run(site, tmp_path, feed_from(2000.0, {}, 1), sources=thermo, start=2000.0)
    assert kinds(last) == [("limit_cleared", "stream_removed")]
    assert site.subject("bed-1").active == {}


def test_a_wearable_bound_to_another_bed_keeps_its_condition_across_a_restart(tmp_path: Path) -> None:
    # The source's devices may each be on their own bed (``subject`` per device): the source feeds it.
    site = Site(tmp_path)
    source = wearables((A, "plx"))
    source["devices"][0]["subject"] = "bed-2"
    spo2 = Stream("ble", "bed-2", A, SPO2, rate_hz=1.0)
    first = run(site, tmp_path, feed_from(100.0, {spo2: (86.0, 0)}, 12), sources=(source,))
    assert kinds(first) == [("limit", None)]
    assert run(site, tmp_path, feed_from(1000.0, {}, 1), sources=(source,), start=1000.0) == []
    assert len(site.subject("bed-2").active) == 1  # not ended as if its source had gone
    back = run(site, tmp_path, feed_from(2000.0, {spo2: (97.0, 0)}, 20), sources=(source,))
    assert kinds(back) == [("limit_cleared", None)]
