"""What a Sparkplug host is told about a stream with several alarm conditions at once.

A stream's loss and its faults of each origin (its device's flags, a plausibility rule, its
driver) are separate conditions, as the gateway's alarm ledger and the twin keep them; a node
that never resolved is a condition of its own.  The host sees one alarm metric per stream (per
node): ``Active`` stays true while any condition under it holds and is false only once the last
ends, ``Conditions`` says which hold, and every birth - a rebirth, the births after a restart,
with conditions the gateway carried over it - says what is on now.

Real peers: mosquitto with TLS, the edge node, a host application recording what the broker
delivers, births decoded by Eclipse Tahu's codec in its own process; the first test's alarms
come from a real pipeline judging samples.  A window's counts of samples it left out (flagged,
implausible) reach the host beside its features.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sparkplug_support import Host, Message, Tahu
from test_alarm_source_removed import BED7, SPO2, Site, config, spo2
from test_sparkplug import DEV_B, NODE_ID, SUBJ_B, alarm, broker_and_host, running, scan
from uplink_support import uplink_config, wait_until

from gateway.anonymize import Anonymizer
from gateway.contracts import Lane
from gateway.outbox import AsyncOutbox, Outbox, OutItem
from gateway.runtime import Pipeline
from gateway.sample import Quality
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.sparkplug import codec
from gateway.uplink.sparkplug.config import SparkplugSection
from gateway.uplink.sparkplug.node import SparkplugNode

pytestmark = pytest.mark.slow

OFF = int(Quality.SENSOR_OFF)
SENSOR = f"Alarms/sensor/{SPO2.metric.name}"
Steps = list[tuple[str, str | None, dict[str, Any]]]  # each message's kind, device and the values it set
_FIELD = {"Boolean": "boolean_value", "Int32": "int_value", "Int64": "long_value", "String": "string_value"}


class HostView:
    """What a host application holds now, per device and metric name, from the messages in order.

    Births are read with Tahu's codec (names, types, aliases, values); a data message carries
    aliases only, so its values are read with the types its births announced.  Historical
    values are history, not the current value.
    """

    def __init__(self, tahu: Tahu) -> None:
        self.tahu = tahu
        self.born: dict[tuple[str | None, int], tuple[str, str]] = {}  # (device, alias) -> name, type
        self.now: dict[str | None, dict[str, Any]] = {}
        self.seen = 0

    def fold(self, msgs: list[Message]) -> list[tuple[str, str | None, dict[str, Any]]]:
        """Fold the messages not seen yet; each one's kind, device and the values it set."""
        out = []
        for m in msgs[self.seen :]:
            self.seen += 1
            if m.kind not in ("NBIRTH", "DBIRTH", "NDATA", "DDATA"):
                continue
            values: dict[str, Any] = {}
            if m.kind.endswith("BIRTH"):
                for x in self.tahu.decode(m.payload)["metrics"]:
                    if "alias" in x:
                        self.born[(m.device, x["alias"])] = (x["name"], x["type"])
                    values[x["name"]] = x.get("value")
            else:
                self.tahu.decode(m.payload)  # the independent codec reads every message
                for x in codec.decode(m.payload).metrics:
                    name, kind = self.born[(m.device, x.alias)]
                    if not x.is_historical:
                        values[name] = None if x.is_null else getattr(x, _FIELD.get(kind, "double_value"))
            self.now.setdefault(m.device, {}).update(values)
            out.append((m.kind, m.device, values))
        return out


def told(steps: list[tuple[str, str | None, dict[str, Any]]], device: str, base: str) -> list[Any]:
    """(kind, Active, Conditions) of each message that told ``device``'s host about ``base`` ("-": not in it)."""
    return [
        (kind, v.get(f"{base}/Active", "-"), v.get(f"{base}/Conditions", "-"))
        for kind, dev, v in steps
        if dev == device and (f"{base}/Active" in v or f"{base}/Conditions" in v)
    ]


async def settle(outbox: AsyncOutbox, node: SparkplugNode, host: Host) -> None:
    """Until the node delivered everything queued and the host received all it published."""
    await outbox.flush()
    deadline = time.monotonic() + 10.0
    while (await outbox.stats()).queued:  # deleted once acknowledged
        assert time.monotonic() < deadline, "timed out after 10 s waiting for every record acknowledged"
        await asyncio.sleep(0.02)
    await wait_until(
        lambda: sum(m.kind != "NDEATH" for m in host.sparkplug()) >= node.counters.messages,
        10,
        "the host to receive everything published",
    )


@pytest.fixture
def tahu(tmp_path: Path) -> Iterator[Tahu]:
    """Tahu's codec in its own process, ended after the test."""
    codec_process = Tahu(tmp_path / "tahu.log")
    try:
        yield codec_process
    finally:
        codec_process.close()


def new_node(broker: MosquittoBroker, outbox: AsyncOutbox, anon: Anonymizer, state: Path) -> SparkplugNode:
    cfg = uplink_config(broker, broker.pki)
    return SparkplugNode(outbox, cfg, SparkplugSection(), NODE_ID, anonymizer=anon, state_dir=state)


@contextlib.asynccontextmanager
async def bed7_delivered(
    tmp: Path, broker: MosquittoBroker, anon: Anonymizer, state: Path, name: str
) -> AsyncIterator[tuple[AsyncOutbox, SparkplugNode, Pipeline]]:
    """Bed 7's pipeline over an outbox that a node (a task named ``name``, born) delivers, in the block."""
    async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db"), flush_interval_s=0.02) as outbox:
        node = new_node(broker, outbox, anon, state)
        async with running(node, name):
            await wait_until(lambda: node.connected, 10, "the node born")
            yield outbox, node, Pipeline(config(tmp, BED7), anon, outbox)


def test_a_stream_stays_on_at_the_host_while_any_of_its_faults_holds_through_rebirth_and_restart(
    tmp_path: Path, tahu: Tahu
) -> None:
    """Bed 7's SpO2 implausible (30 %), then also flagged off, then unflagged but still 30 %: on throughout."""
    site = Site(tmp_path)
    state = tmp_path / "sparkplug"
    state.mkdir()
    with broker_and_host(tmp_path) as (broker, host):
        view = HostView(tahu)

        async def first_run() -> tuple[list[Any], list[Any]]:
            async with bed7_delivered(tmp_path, broker, site.anon, state, "test-sparkplug-conditions") as (
                outbox,
                node,
                pipeline,
            ):
                t = 1.0
                for flags, seconds in ((0, 5), (OFF, 5), (0, 8)):
                    t = await spo2(pipeline, SPO2, 30.0, seconds, t, flags)
                await settle(outbox, node, host)
                live = view.fold(host.sparkplug())
                # The host asks for a rebirth: the births say what is on now.
                cmd = tahu.encode(
                    {
                        "timestamp": int(time.time() * 1000),
                        "metrics": [{"name": codec.REBIRTH, "type": "Boolean", "value": True}],
                    }
                )
                births = node.counters.births
                host.command(codec.topic("edgetwin", "NCMD", NODE_ID), cmd)
                await wait_until(lambda: node.counters.births > births, 10, "the rebirth")
                await settle(outbox, node, host)
                reborn = view.fold(host.sparkplug())
            return live, reborn

        live, reborn = asyncio.run(first_run())
        subject = site.anon.subject_pseudonym("ward3-bed7")
        steps = told(live, subject, SENSOR)
        assert [x for x in steps if x[0] == "DDATA"] == [
            ("DDATA", True, "rule"),  # 30 %: implausible
            ("DDATA", "-", "quality,rule"),  # and flagged off: still on (unchanged, not repeated)
            ("DDATA", "-", "rule"),  # the flags end: the implausible value still holds
        ]
        # New metrics (the windows' features, a limit) brought rebirths: each says what is on then.
        first = steps.index(("DDATA", True, "rule"))
        assert steps[:first] == [("DBIRTH", None, None)]  # announced before anything was reported
        assert all(active is True for kind, active, _ in steps[first:] if kind == "DBIRTH")
        assert any(kind == "DBIRTH" for kind, _, _ in steps[first:])
        assert view.now[subject][f"{SENSOR}/Active"] is True
        assert told(reborn, subject, SENSOR) == [("DBIRTH", True, "rule")]

        async def restart() -> tuple[list[Any], int]:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db"), flush_interval_s=0.02) as outbox:
                # The gateway starts again: its ledger hands the fault back to its judge, which
                # raises nothing while the value stays implausible.
                pipeline = Pipeline(config(tmp_path, BED7), site.anon, outbox)
                t = await spo2(pipeline, SPO2, 30.0, 4, 40.0)
                await outbox.flush()
                queued = await outbox.lease(100)
                raised = sum(i.lane is Lane.ALARMS for i in queued)
                await outbox.release([i.id for i in queued])
                node = new_node(broker, outbox, site.anon, state)
                async with running(node, "test-sparkplug-conditions-restart"):
                    await settle(outbox, node, host)
                    born = view.fold(host.sparkplug())
                    # Plausible again: the last condition ends, the host is told it is off.
                    await spo2(pipeline, SPO2, 97.0, 8, t)
                    await settle(outbox, node, host)
                    born += view.fold(host.sparkplug())
            return born, raised

        after, raised = asyncio.run(restart())
    assert raised == 0
    steps = told(after, subject, SENSOR)
    assert steps[:2] == [("DBIRTH", True, "rule"), ("DDATA", False, "")], steps
    # The 30 % windows were left out of the features (gaps), so the 97 % ones bring new metrics:
    # a rebirth each time, every one saying the stream is off now.
    assert all(step == ("DBIRTH", False, "") for step in steps[2:]), steps


def test_the_host_is_told_how_many_samples_each_window_left_out(tmp_path: Path, tahu: Tahu) -> None:
    """Bed 7's SpO2 at 97 %, then 3 s at 30 % (implausible), then 3 s flagged off: each window's counts reach the host."""
    site = Site(tmp_path)
    flagged, implausible = f"{SPO2.metric.name}/left_out/flagged", f"{SPO2.metric.name}/left_out/implausible"
    with broker_and_host(tmp_path) as (broker, host):
        view = HostView(tahu)

        async def body() -> Steps:
            async with bed7_delivered(tmp_path, broker, site.anon, tmp_path, "test-sparkplug-left-out") as (
                outbox,
                node,
                pipeline,
            ):
                t = 1.0
                stretches = ((97.0, 0, 6), (30.0, 0, 3), (97.0, 0, 6), (97.0, OFF, 3), (97.0, 0, 6))
                for value, flags, seconds in stretches:
                    t = await spo2(pipeline, SPO2, value, seconds, t, flags)
                await settle(outbox, node, host)
                return view.fold(host.sparkplug())

        steps = asyncio.run(body())
    subject = site.anon.subject_pseudonym("ward3-bed7")
    # Every birth that announces the stream's features announces its counts.
    mean = f"{SPO2.metric.name}/mean"
    births = [v for kind, dev, v in steps if kind == "DBIRTH" and dev == subject and mean in v]
    assert births
    assert all({flagged, implausible} <= set(v) for v in births)
    types = {name: kind for (dev, _), (name, kind) in view.born.items() if dev == subject}
    assert types[flagged] == types[implausible] == "Int64"

    def counts(name: str) -> list[int]:
        """The current values the host was told for ``name``, in order, repeats folded."""
        out: list[int] = []
        for kind, dev, v in steps:
            value = v.get(name)
            if kind == "DDATA" and dev == subject and value is not None and (not out or out[-1] != value):
                out.append(value)
        return out

    # A 4 s window over the 30 % stretch leaves out up to its 3 samples; the flagged stretch likewise.
    assert counts(implausible)[0] == counts(flagged)[0] == 0
    assert max(counts(implausible)) == 3, counts(implausible)
    assert max(counts(flagged)) == 3, counts(flagged)
    # Clean again: the host holds 0 for both.
    assert (view.now[subject][flagged], view.now[subject][implausible]) == (0, 0)


def test_nodes_streams_and_estimates_each_have_their_own_alarm_metric(tmp_path: Path, tahu: Tahu) -> None:
    """Two unresolved nodes, a stream lost and faulted by its driver, two estimates' limits: each ends only its own."""
    n1, n2 = "n1n1n1n1n1n1n1n1", "n2n2n2n2n2n2n2n2"
    temp = "Alarms/sensor/Pump/temp"
    pump = {"dev": DEV_B, "metric": "Pump/temp"}

    def node(n: str, item: int, status: str = "bad_nomatch") -> dict[str, Any]:
        """A fault of a node that never resolved (no stream), or its ending (``status`` good)."""
        ending = {"after": "sensor_fault"} if status == "good" else {}
        return {"dev": DEV_B, "detail": {**ending, "status": status, "item": item, "node": n}}

    table: list[tuple[str, dict[str, Any]]] = [
        ("sensor_fault", {**node(n1, 1), "priority": "low"}),
        ("sensor_fault", {**node(n2, 2), "priority": "low"}),
        ("sensor_lost", {**pump, "priority": "medium"}),
        ("sensor_fault", {**pump, "priority": "low", "detail": {"status": "bad_nodata"}}),
        ("limit", {"priority": "high", "limit": 40.0, "value": 35.0, "detail": {"estimate": "hr"}}),
        ("limit", {"priority": "medium", "limit": 92.0, "value": 90.0, "detail": {"estimate": "spo2"}}),
        # Endings: node 1, the stream's loss, the heart rate's limit.
        ("sensor_restored", node(n1, 1, "good")),
        ("sensor_restored", {**pump, "detail": {"after": "sensor_lost"}}),
        ("limit_cleared", {"detail": {"estimate": "hr"}}),
    ]
    steps = [alarm(SUBJ_B, float(t), kind, **kw) for t, (kind, kw) in enumerate(table, 1)]
    with broker_and_host(tmp_path) as (broker, host):
        view = HostView(tahu)

        async def body() -> None:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db"), flush_interval_s=0.02) as outbox:
                cfg = uplink_config(broker, broker.pki)
                node = SparkplugNode(
                    outbox, cfg, SparkplugSection(), NODE_ID, anonymizer=scan(), state_dir=tmp_path
                )
                async with running(node, "test-sparkplug-node-conditions"):
                    await wait_until(lambda: node.connected, 10, "the node born")
                    for item in steps:
                        outbox.submit(item)
                        await outbox.flush()
                    await settle(outbox, node, host)

        asyncio.run(body())
        view.fold(host.sparkplug())
    now = view.now[SUBJ_B]
    assert now[f"Alarms/sensor/node/{n1}/Active"] is False
    assert now[f"Alarms/sensor/node/{n2}/Active"] is True
    assert now[f"Alarms/sensor/node/{n2}/Conditions"] == "driver"
    # Lost, then faulted by its driver; found again: the driver's fault still holds.
    assert now[f"{temp}/Active"] is True
    assert now[f"{temp}/Conditions"] == "driver"
    assert now[f"{temp}/Priority"] == 1  # the loss's medium ended: the fault's low holds
    assert now["Alarms/limit/estimate/hr/Active"] is False
    assert now["Alarms/limit/estimate/spo2/Active"] is True
    assert "Alarms/sensor/subject/Active" not in now
    assert "Alarms/limit/subject/Active" not in now


def test_a_node_with_a_new_state_learns_at_its_start_the_conditions_the_gateway_carried_over(
    tmp_path: Path, tahu: Tahu
) -> None:
    """A fault raised before the restart (delivered as SenML, say) is on at the births of a node with no state."""
    site = Site(tmp_path)

    async def before() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db"), flush_interval_s=0.02) as outbox:
            pipeline = Pipeline(config(tmp_path, BED7), site.anon, outbox)
            await spo2(pipeline, SPO2, 30.0, 5, 1.0)  # implausible: a fault of a plausibility rule
            await outbox.flush()
            items = await outbox.lease(1000)
            assert any(i.lane is Lane.ALARMS for i in items)
            await outbox.ack([i.id for i in items])  # delivered by another uplink

    asyncio.run(before())
    with broker_and_host(tmp_path) as (broker, host):
        view = HostView(tahu)

        async def after() -> list[Any]:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db"), flush_interval_s=0.02) as outbox:
                pipeline = Pipeline(config(tmp_path, BED7), site.anon, outbox)
                (tmp_path / "new-state").mkdir()
                node = new_node(broker, outbox, site.anon, tmp_path / "new-state")
                node.carry(pipeline.alarms_on_records())  # as edgetwin run does at its start
                async with running(node, "test-sparkplug-carried"):
                    await wait_until(lambda: node.connected, 10, "the node born")
                    await settle(outbox, node, host)
                    steps = view.fold(host.sparkplug())
                    await spo2(pipeline, SPO2, 97.0, 8, 10.0)  # plausible again: the fault ends
                    await settle(outbox, node, host)
                    return steps + view.fold(host.sparkplug())

        steps = asyncio.run(after())
    seen = told(steps, site.anon.subject_pseudonym("ward3-bed7"), SENSOR)
    assert seen[0] == ("DBIRTH", True, "rule")  # the first births: on, by the rule
    assert [x for x in seen if x[0] == "DDATA"] == [("DDATA", False, "")]
    ended = seen.index(("DDATA", False, ""))
    # Births for the windows' new metrics say what is on at each moment.
    assert set(seen[:ended]) == {("DBIRTH", True, "rule")}
    assert set(seen[ended + 1 :]) <= {("DBIRTH", False, "")}


def test_an_ending_the_host_cannot_see_is_on_disk_before_its_record_leaves_the_outbox(tmp_path: Path) -> None:
    """SpO2 lost on two devices, then found on one: the metric stays on (nothing to send), but the
    held conditions change and must be in ``sparkplug.json`` before the ending is deleted from the
    outbox - a power cut in between would otherwise keep the ended loss in every birth for good."""
    lost = {"metric": SPO2.metric.name, "priority": "medium"}
    steps = [
        alarm(SUBJ_B, 1.0, "sensor_lost", dev="devA", **lost),
        alarm(SUBJ_B, 2.0, "sensor_lost", dev="devB", **lost),
    ]
    ending = alarm(
        SUBJ_B, 3.0, "sensor_restored", dev="devA", metric=SPO2.metric.name, detail={"after": "sensor_lost"}
    )
    seen: list[int] = []  # conditions held on disk at the moment the ending's row was gone

    def held_on_disk() -> int:
        doc = json.loads((tmp_path / "sparkplug.json").read_text(encoding="utf-8"))
        return sum(len(on) for bases in doc.get("held", {}).values() for on in bases.values())

    with broker_and_host(tmp_path) as (broker, host):

        async def body() -> None:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db"), flush_interval_s=0.02) as outbox:
                node = new_node(broker, outbox, scan(), tmp_path)
                async with running(node, "test-sparkplug-node-unseen-ending"):
                    await wait_until(lambda: node.connected, 10, "the node born")
                    for item in steps:
                        outbox.submit(item)
                    await settle(outbox, node, host)
                    assert held_on_disk() == 2
                    db = sqlite3.connect(f"file:{tmp_path / 'outbox.db'}?mode=ro", uri=True)
                    try:
                        outbox.submit(ending)
                        await outbox.flush()
                        # Watch the loop's every turn: the moment the row is deleted, read the file.
                        deadline = time.monotonic() + 10.0
                        while db.execute("SELECT count(*) FROM records").fetchone()[0]:
                            assert time.monotonic() < deadline, "the ending was not acknowledged within 10 s"
                            await asyncio.sleep(0)
                        seen.append(held_on_disk())
                    finally:
                        db.close()
                    assert node.counters.unchanged >= 1  # the host was sent nothing for it

        asyncio.run(body())
    assert seen == [1], seen


def v1_entry(alias: int, datatype: int, unit: str | None = None) -> dict[str, Any]:
    """A metric as ``sparkplug.json`` of versions 1 and 2 holds it."""
    return {"alias": alias, "type": datatype, "unit": unit, "low": None, "high": None}


def born_from(
    tmp_path: Path, tahu: Tahu, doc: dict[str, Any], items: list[OutItem]
) -> tuple[HostView, Steps]:
    """A node started on the state file ``doc``, then sending ``items``: the host's view and what it was told."""
    (tmp_path / "sparkplug.json").write_text(json.dumps(doc), encoding="utf-8")
    with broker_and_host(tmp_path) as (broker, host):
        view = HostView(tahu)

        async def body() -> None:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db"), flush_interval_s=0.02) as outbox:
                node = new_node(broker, outbox, scan(), tmp_path)
                async with running(node, "test-sparkplug-node-older-state"):
                    await wait_until(lambda: node.connected, 10, "the node born")
                    for item in items:
                        outbox.submit(item)
                    await settle(outbox, node, host)

        asyncio.run(body())
        return view, view.fold(host.sparkplug())


DOUBLE, BOOLEAN, INT32 = 10, 11, 3  # Sparkplug B datatypes


def alarm_entries(base: str, alias: int) -> dict[str, dict[str, Any]]:
    """An alarm metric's Active, Priority, Value and Limit as an older state file holds them, aliases from ``alias``."""
    leaves = (("Active", BOOLEAN), ("Priority", INT32), ("Value", DOUBLE), ("Limit", DOUBLE))
    return {f"{base}/{leaf}": v1_entry(alias + k, datatype) for k, (leaf, datatype) in enumerate(leaves)}


def episodes_on(**priorities: int) -> dict[str, list[Any]]:
    """Models' episodes on (model -> priority) as an older state file holds them under one metric."""
    return {
        json.dumps(["anomaly", model]): ["anomaly", priority, True] for model, priority in priorities.items()
    }


def test_a_version_1_state_retires_the_alarm_metrics_it_named_by_the_subject(
    tmp_path: Path, tahu: Tahu
) -> None:
    """``sparkplug.json`` as version 1 wrote it: its node-fault, estimate-limit and episode metrics named
    by the subject are not in the births after the upgrade; the rest keep their aliases, none is reused."""
    kept = {
        "SpO2/mean": v1_entry(1, DOUBLE, "%"),
        "Alarms/sensor/SpO2/Active": v1_entry(5, BOOLEAN),
    }
    retired = {
        "Alarms/anomaly/SpO2/Active": v1_entry(2, BOOLEAN),  # a stream's anomaly, by the stream alone
        "Alarms/sensor/subject/Active": v1_entry(6, BOOLEAN),
        "Alarms/limit/subject/Active": v1_entry(7, BOOLEAN),
        "Alarms/limit/subject/Value": v1_entry(8, DOUBLE),
        "Alarms/anomaly/subject/Active": v1_entry(9, BOOLEAN),
    }
    v1 = {"version": 1, "bdseq": 4, "devices": {SUBJ_B: {**kept, **retired}}}
    limit = alarm(SUBJ_B, 1.0, "limit", priority="high", limit=40.0, value=35.0, detail={"estimate": "hr"})
    view, steps = born_from(tmp_path, tahu, v1, [limit])  # a new metric: a rebirth
    births = [v for kind, dev, v in steps if kind == "DBIRTH" and dev == SUBJ_B]
    assert len(births) >= 2  # the first births and the rebirth for the new metric
    for names in births:
        assert not set(retired) & set(names)
        assert set(kept) <= set(names)
    aliases = {name: alias for (dev, alias), (name, _) in view.born.items() if dev == SUBJ_B}
    assert {name: aliases[name] for name in kept} == {name: e["alias"] for name, e in kept.items()}
    assert aliases["Alarms/limit/estimate/hr/Active"] > 9  # 2 and 6 to 9 were the retired ones
    doc = json.loads((tmp_path / "sparkplug.json").read_text(encoding="utf-8"))
    assert doc["version"] == 4
    assert not set(retired) & set(doc["devices"][SUBJ_B])
    assert view.now[SUBJ_B]["Alarms/limit/estimate/hr/Active"] is True


def test_two_models_episodes_on_one_subject_each_have_their_own_metric_after_the_upgrade(
    tmp_path: Path, tahu: Tahu
) -> None:
    """Version 2 held both models' episodes under one metric: each is on under its own at the first
    births; then one model's episode goes on with its value, the other's ends: neither mixes."""
    old = "Alarms/anomaly/subject"
    mimic, novelty = "Alarms/anomaly/model/vitals_mimic", "Alarms/anomaly/model/novelty"
    v2 = {
        "version": 2,
        "bdseq": 7,
        "devices": {SUBJ_B: alarm_entries(old, 1)},
        "held": {SUBJ_B: {old: episodes_on(vitals_mimic=2, novelty=3)}},
    }
    items = [
        alarm(
            SUBJ_B, 1.0, "anomaly", priority="medium", value=4.0, limit=3.0, detail={"model": "vitals_mimic"}
        ),
        alarm(SUBJ_B, 2.0, "anomaly_cleared", detail={"model": "novelty"}),
    ]
    view, steps = born_from(tmp_path, tahu, v2, items)
    first = next(v for kind, dev, v in steps if kind == "DBIRTH" and dev == SUBJ_B)
    assert not any(name.startswith(old) for _, _, v in steps for name in v)
    assert (first[f"{mimic}/Active"], first[f"{mimic}/Priority"]) == (True, 2)
    assert (first[f"{novelty}/Active"], first[f"{novelty}/Priority"]) == (True, 3)
    now = view.now[SUBJ_B]
    assert (now[f"{mimic}/Active"], now[f"{mimic}/Value"], now[f"{mimic}/Limit"]) == (True, 4.0, 3.0)
    assert now[f"{novelty}/Active"] is False
    assert now.get(f"{novelty}/Value") is None  # never reported: not the other model's
    doc = json.loads((tmp_path / "sparkplug.json").read_text(encoding="utf-8"))
    assert {base for base, on in doc["held"][SUBJ_B].items() if on} == {mimic}


RR = "MDC_ECG_TIME_PD_RR_GL"  # one ECG stream's RR intervals, which both rhythm models read


def ecg_episode(t: float, kind: str, model: str, **kw: Any) -> OutItem:
    """An alarm of ``model``'s episode on SUBJ_B's ECG stream (its RR intervals)."""
    return alarm(SUBJ_B, t, kind, dev=DEV_B, metric=RR, detail={"model": model}, **kw)


def test_two_models_raising_on_one_stream_at_once_each_keep_their_own_value_and_limit(
    tmp_path: Path, tahu: Tahu
) -> None:
    """The rhythm and the ectopy detector on one ECG stream, both on at once: one metric each, apart
    from the stream's other alarms; one model's ending leaves the other's episode, value and limit."""
    rhythm, ectopy = (
        f"Alarms/anomaly/model/rr_rhythm/stream/{RR}",
        f"Alarms/anomaly/model/rr_ectopic/stream/{RR}",
    )
    items = [
        ecg_episode(1.0, "anomaly", "rr_rhythm", priority="medium", value=0.42, limit=0.2),
        ecg_episode(2.0, "anomaly", "rr_ectopic", priority="high", value=0.31, limit=0.1),
        ecg_episode(3.0, "anomaly_cleared", "rr_rhythm"),
    ]
    view, steps = born_from(tmp_path, tahu, {"version": 4, "bdseq": 0, "devices": {}}, items)
    assert not any(name.startswith(f"Alarms/anomaly/{RR}") for _, _, v in steps for name in v)
    held: dict[str, Any] = {}  # what the host held after each message
    moments = []
    for _, dev, values in steps:
        if dev == SUBJ_B:
            held.update(values)
            moments.append(dict(held))
    both = next(m for m in moments if m.get(f"{rhythm}/Active") is True and m.get(f"{ectopy}/Active") is True)
    assert (both[f"{rhythm}/Priority"], both[f"{rhythm}/Value"], both[f"{rhythm}/Limit"]) == (2, 0.42, 0.2)
    assert (both[f"{ectopy}/Priority"], both[f"{ectopy}/Value"], both[f"{ectopy}/Limit"]) == (3, 0.31, 0.1)
    now = view.now[SUBJ_B]
    assert now[f"{rhythm}/Active"] is False
    assert (now[f"{ectopy}/Active"], now[f"{ectopy}/Value"], now[f"{ectopy}/Limit"]) == (True, 0.31, 0.1)


def test_a_version_3_state_moves_a_streams_episodes_to_each_models_own_metric(
    tmp_path: Path, tahu: Tahu
) -> None:
    """Version 3 held two models' episodes on one stream under the stream's metric: after the upgrade each
    is on under its own at the first births, the old metric is in none and its aliases go to no other."""
    old = f"Alarms/anomaly/{RR}"
    subject_wide = "Alarms/anomaly/model/vitals_mimic"
    rhythm, ectopy = (
        f"Alarms/anomaly/model/rr_rhythm/stream/{RR}",
        f"Alarms/anomaly/model/rr_ectopic/stream/{RR}",
    )
    v3 = {
        "version": 3,
        "bdseq": 9,
        "next_alias": 9,
        "devices": {SUBJ_B: {**alarm_entries(old, 1), **alarm_entries(subject_wide, 5)}},
        "held": {
            SUBJ_B: {old: episodes_on(rr_rhythm=2, rr_ectopic=3), subject_wide: episodes_on(vitals_mimic=1)}
        },
    }
    view, steps = born_from(tmp_path, tahu, v3, [ecg_episode(1.0, "anomaly_cleared", "rr_ectopic")])
    first = next(v for kind, dev, v in steps if kind == "DBIRTH" and dev == SUBJ_B)
    assert not any(name.startswith(f"{old}/") for _, _, v in steps for name in v)
    assert (first[f"{rhythm}/Active"], first[f"{rhythm}/Priority"]) == (True, 2)
    assert (first[f"{ectopy}/Active"], first[f"{ectopy}/Priority"]) == (True, 3)
    assert (first[f"{subject_wide}/Active"], first[f"{subject_wide}/Priority"]) == (True, 1)
    aliases = {name: alias for (dev, alias), (name, _) in view.born.items() if dev == SUBJ_B}
    assert (aliases[f"{subject_wide}/Active"], aliases[f"{subject_wide}/Priority"]) == (5, 6)
    assert min(aliases[f"{rhythm}/Active"], aliases[f"{ectopy}/Active"]) >= 9  # 1 to 4 stay retired
    now = view.now[SUBJ_B]
    assert (now[f"{rhythm}/Active"], now[f"{ectopy}/Active"]) == (True, False)
    doc = json.loads((tmp_path / "sparkplug.json").read_text(encoding="utf-8"))
    assert doc["version"] == 4
    assert {base for base, on in doc["held"][SUBJ_B].items() if on} == {rhythm, subject_wide}
