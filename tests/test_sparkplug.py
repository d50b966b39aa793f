"""The Sparkplug B edge node against mosquitto (TLS, client certificates), read by Eclipse Tahu's codec.

One scenario runs once per module (:func:`session`): a backlog queued while the primary host is
away, the host coming online, live records, a rebirth command, a device lost and back, a new
metric, the host going offline and back, and an intended stop.  Every message the broker
delivered is decoded by Tahu's JavaScript codec in its own process; each test below checks one
normative statement of the Sparkplug 3.0 specification and is named after its ``tck-id``
(docs/sparkplug.md maps them).  The bdSeq across SIGKILL of a real ``edgetwin run`` is in
test_sparkplug_gateway.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from peers import background
from sparkplug_support import Host, Message, Tahu
from tcp_proxy import TcpProxy
from uplink_support import LeaseLog, LeaseRecorder, mosquitto_pki, uplink_config, wait_until

from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.contracts import Lane
from gateway.errors import AnonymizationError
from gateway.outbox import AsyncOutbox, Outbox, OutItem
from gateway.records import AlarmRecord, DiagnosticRecord, FeaturesWindow, StreamWindow, encode
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.sparkplug import codec
from gateway.uplink.sparkplug.config import SparkplugSection
from gateway.uplink.sparkplug.node import SparkplugNode

pytestmark = pytest.mark.slow

GROUP = "plant"
NODE_ID = "gwk3j2x7q9m4t8vb"
HOST = "scada-1"
SUBJ_A = "k3j2x7q9m4t8vbaa"
SUBJ_B = "p9q8r7s6t5u4v3ww"
DEV_A = "d0d0d0d0d0d0d0d0"
DEV_B = "e1e1e1e1e1e1e1e1"
SPO2 = "MDC_PULS_OXIM_SAT_O2"
SECRET = "SN-PLC-20931"  # an identity the anonymizer knows: must never leave


def window(subject: str, t: float, dev: str, metric: str, unit: str, **features: float) -> OutItem:
    rec = FeaturesWindow(
        subject=subject,
        kind="medical",
        t=t,
        win=2.0,
        streams=(StreamWindow(metric, unit, dev, n=10, features=features, shape="level"),),
        run=1,
    )
    return OutItem(Lane.FEATURES, f"features/{subject}", encode(rec), time.time())


def alarm(subject: str, t: float, kind: str, **kw: Any) -> OutItem:
    rec = AlarmRecord(alarm=kind, subject=subject, t=t, run=1, **kw)
    return OutItem(Lane.ALARMS, f"alarms/{subject}", encode(rec), time.time())


def diag(t: float, kind: str, **detail: float | str) -> OutItem:
    rec = DiagnosticRecord(diag=kind, t=t, detail=detail, run=1)
    return OutItem(Lane.DIAGNOSTICS, "diag", encode(rec), time.time())


def scan(*identities: str) -> Anonymizer:
    """The anonymizer the runtime hands over, knowing ``SECRET`` (and ``identities``)."""
    return Anonymizer(Pseudonymizer(b"s" * 32), time_mode="relative", local_identities=(SECRET, *identities))


@contextlib.asynccontextmanager
async def running(node: SparkplugNode, name: str) -> AsyncIterator[None]:
    """``node`` runs (a task named ``name``) inside the block and is cancelled at its end."""
    async with background(node.run(lambda: None), name):
        yield


async def deliver(node: SparkplugNode, n: int, name: str) -> None:
    """Run ``node`` (a task named ``name``) until it has delivered ``n`` records, then stop it."""
    async with running(node, name):
        await wait_until(lambda: node.delivered >= n, 10, f"{n} record(s) delivered")


def current(msgs: list[Message]) -> list[Message]:
    """The data messages that carry current (not historical) values."""
    return [
        m
        for m in msgs
        if m.kind in ("DDATA", "NDATA") and not all(x.is_historical for x in codec.decode(m.payload).metrics)
    ]


@dataclass
class Run:
    messages: list[Message]
    node: SparkplugNode
    marks: dict[str, int]  # index into messages where each step began
    dead_lettered: int
    pending_after: int
    began_ms: int
    ended_ms: int


async def _scenario(tmp: Path, broker: MosquittoBroker, host: Host, tahu: Tahu) -> Run:
    marks: dict[str, int] = {}
    began_ms = int(time.time() * 1000)
    cfg = uplink_config(broker, broker.pki)
    sp = SparkplugSection(group_id=GROUP, primary_host=HOST)
    async with AsyncOutbox(lambda: Outbox(tmp / "outbox.db"), flush_interval_s=0.02) as outbox:
        # The backlog: queued before the node was ever born.
        backlog = [
            window(SUBJ_A, 10.0, DEV_A, SPO2, "%", mean=97.0),
            window(SUBJ_A, 11.0, DEV_A, SPO2, "%", mean=96.0),
            window(SUBJ_B, 11.5, DEV_B, "Pump/temp", "Cel", mean=41.5, sd=0.2),
            window(SUBJ_B, 11.6, DEV_B, "Pump/flow", "L/min", mean=12.0),
            alarm(SUBJ_A, 12.0, "limit", dev=DEV_A, metric=SPO2, priority="medium", limit=90.0, value=88.0),
            diag(12.5, "clock_step", step_s=-3600.0),
            window(f"x{SECRET}", 12.7, DEV_A, SPO2, "%", mean=90.0),  # would leak: dead-lettered
        ]
        for item in backlog:
            outbox.submit(item)
        await outbox.flush()
        node = SparkplugNode(outbox, cfg, sp, NODE_ID, anonymizer=scan(), state_dir=tmp)
        task = asyncio.create_task(node.run(lambda: None), name="test-sparkplug")

        async def mark(step: str) -> None:
            # The broker acknowledged what the node sent; the host may still be receiving it.
            await wait_until(
                lambda: sum(m.kind != "NDEATH" for m in host.sparkplug()) >= node.counters.messages,
                10,
                "the host to receive everything published",
            )
            marks[step] = len(host.sparkplug())

        try:
            # Connected, but the primary host has said nothing: no birth yet.
            await wait_until(
                lambda: node.problem is not None and "primary host" in node.problem, 10, "waiting"
            )
            await asyncio.sleep(0.5)
            await mark("before_online")
            host.state(online=False, ts=500)  # an offline STATE: still waiting
            host.state(online=True, ts=600, host_id="other-host")  # not the primary host: still waiting
            await asyncio.sleep(0.3)
            await mark("after_offline_state")
            host.state(online=True, ts=1000)
            await wait_until(lambda: node.delivered >= 6, 10, "the backlog delivered")
            # The alarm raised in the backlog is history: the host is then told it is on now.
            await wait_until(lambda: bool(current(host.sparkplug())), 10, "the alarm's current value")
            await mark("live")
            host.state(online=False, ts=900)  # older than the online STATE: ignored, the session goes on
            # Live: a change, the same values again (nothing to report), one changed value.
            for item in (
                window(SUBJ_A, 13.0, DEV_A, SPO2, "%", mean=93.0),
                window(SUBJ_A, 14.0, DEV_A, SPO2, "%", mean=93.0),
                window(SUBJ_A, 15.0, DEV_A, SPO2, "%", mean=92.0),
            ):
                outbox.submit(item)
            await wait_until(lambda: node.delivered >= 9, 10, "live records")
            # A rebirth request, encoded by Tahu.
            await mark("rebirth")
            cmd = tahu.encode(
                {
                    "timestamp": int(time.time() * 1000),
                    "metrics": [{"name": codec.REBIRTH, "type": "Boolean", "value": True}],
                }
            )
            host.command(codec.topic(GROUP, "NCMD", NODE_ID), cmd)
            await wait_until(
                lambda: sum(m.kind == "NBIRTH" for m in host.sparkplug()) >= 2, 10, "the rebirth"
            )
            # Device B's only sensor is lost: a quality change, then DDEATH; back: births again.
            await mark("device_lost")
            outbox.submit(alarm(SUBJ_B, 16.0, "device_lost", dev=DEV_B, priority="medium"))
            await wait_until(lambda: any(m.kind == "DDEATH" for m in host.sparkplug()), 10, "DDEATH")
            await mark("device_back")
            outbox.submit(alarm(SUBJ_B, 17.0, "device_restored", dev=DEV_B))
            outbox.submit(window(SUBJ_B, 17.5, DEV_B, "Pump/temp", "Cel", mean=40.0, sd=0.3))
            await wait_until(lambda: node.delivered >= 12, 10, "device B back")
            # A metric never seen before: a complete birth sequence announces it first.
            await mark("new_metric")
            outbox.submit(window(SUBJ_A, 18.0, DEV_A, "MDC_TEMP_BODY", "Cel", mean=37.1))
            await wait_until(lambda: node.delivered >= 13, 10, "the new metric")
            # An OPC UA node of device B goes bad: its values null, quality bad, the status code with them.
            await mark("fault")
            outbox.submit(
                alarm(
                    SUBJ_B,
                    18.5,
                    "sensor_fault",
                    dev=DEV_B,
                    metric="Pump/temp",
                    detail={"status": "bad_nodeidunknown"},
                )
            )
            await wait_until(lambda: node.delivered >= 14, 10, "the sensor fault")
            # The primary host goes offline: NDEATH, disconnect, reconnect with bdSeq + 1, wait.
            await mark("host_offline")
            bdseq_before = node.bdseq
            host.state(online=False, ts=2000)
            await wait_until(lambda: node.bdseq == bdseq_before + 1 and not node.connected, 10, "reconnected")
            outbox.submit(window(SUBJ_A, 20.0, DEV_A, SPO2, "%", mean=91.0))  # history by the time it leaves
            await asyncio.sleep(0.5)
            await wait_until(
                lambda: any(m.kind == "NDEATH" for m in host.sparkplug()[marks["host_offline"] :]),
                10,
                "NDEATH",
            )
            await mark("host_back")
            host.state(online=True, ts=3000)
            await wait_until(lambda: node.delivered >= 15, 10, "the record queued while the host was away")
            await mark("stop")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        host.wait(
            lambda ms: len(ms) > marks["stop"] and ms[-1].kind == "NDEATH", 10, "the NDEATH of the stop"
        )
        stats = await outbox.stats()
    msgs = host.sparkplug()
    for m in msgs:
        m.decoded = tahu.decode(m.payload)
    return Run(
        msgs, node, marks, node.counters.dead_lettered, stats.queued, began_ms, int(time.time() * 1000)
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    pki = mosquitto_pki(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("sparkplug")
    broker = MosquittoBroker(tmp / "broker", pki)
    broker.start()
    tahu = Tahu(tmp / "tahu.log")
    host = Host(broker, pki, HOST)
    try:
        yield asyncio.run(_scenario(tmp, broker, host, tahu))
    finally:
        host.close()
        tahu.close()
        broker.stop()


# --- helpers over the recorded messages ---------------------------------------------------------------


def sessions(msgs: list[Message]) -> list[list[Message]]:
    """Messages split at each NBIRTH (NDEATH ends a session)."""
    out: list[list[Message]] = []
    for m in msgs:
        if m.kind == "NBIRTH":
            out.append([m])
        elif m.kind != "NDEATH" and out:
            out[-1].append(m)
    return out


def of(run: Run, *kinds: str) -> list[Message]:
    return [m for m in run.messages if m.kind in kinds]


def metric(msg: Message, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [x for x in msg.decoded["metrics"] if x.get("name") == name]
    assert found, f"{name} not in {msg.topic}"
    return found[0]


def births_alias(run: Run, upto: int) -> dict[tuple[str | None, int], dict[str, Any]]:
    """(device, alias) -> metric, from every birth before message ``upto``."""
    out: dict[tuple[str | None, int], dict[str, Any]] = {}
    for m in run.messages[:upto]:
        if m.kind in ("NBIRTH", "DBIRTH"):
            for x in m.decoded["metrics"]:
                if "alias" in x:
                    out[(m.device, x["alias"])] = x
    return out


def data_values(run: Run, index: int) -> dict[str, Any]:
    """Name -> value of the data message at ``index``, its types taken from the births before it.

    Tahu's decoder is stateless: a data metric carries an alias and no datatype (as the
    specification says it should), so the value is read with the type its birth announced.
    """
    msg = run.messages[index]
    known = births_alias(run, index)
    out: dict[str, Any] = {}
    for x in codec.decode(msg.payload).metrics:
        born = known[(msg.device, x.alias)]
        field = {
            "Boolean": "boolean_value",
            "Int32": "int_value",
            "Int64": "long_value",
            "String": "string_value",
        }.get(born["type"], "double_value")
        assert x.WhichOneof("value") in (field, None)
        out[born["name"]] = None if x.is_null else getattr(x, field)
    return out


def sent_during_run(run: Run, msgs: list[Message]) -> bool:
    """Every payload timestamp is UTC milliseconds within the scenario's run."""
    return bool(msgs) and all(
        run.began_ms - 1000 <= m.decoded["timestamp"] <= run.ended_ms + 1000 for m in msgs
    )


# --- topic namespace ------------------------------------------------------------------------------------------


def test_tck_id_topic_structure(run: Run) -> None:
    for m in run.messages:
        parts = m.topic.split("/")
        assert parts[0] == "spBv1.0"
        assert parts[1] == GROUP
        assert parts[3] == NODE_ID
        assert parts[2] in {"NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA"}


def test_tck_id_topic_structure_namespace_a(run: Run) -> None:
    assert run.messages
    assert all(m.topic.startswith("spBv1.0/") for m in run.messages)


def test_tck_id_topic_structure_namespace_valid_group_id() -> None:
    for bad in ("a/b", "a+b", "a#", ""):
        with pytest.raises(ValueError, match="group_id"):
            SparkplugSection(group_id=bad)
    with pytest.raises(codec.SparkplugError):
        codec.check_id("group_id", "a/b")


def test_tck_id_topic_structure_namespace_valid_edge_node_id(run: Run) -> None:
    for bad in ("n/1", "n+", "#"):
        with pytest.raises(ValueError, match="edge_node_id"):
            SparkplugSection(edge_node_id=bad)
    assert all(m.topic.split("/")[3] == NODE_ID for m in run.messages)


def test_tck_id_topic_structure_namespace_valid_device_id(run: Run) -> None:
    devices = {m.device for m in run.messages if m.device is not None}
    assert devices == {SUBJ_A, SUBJ_B}
    with pytest.raises(codec.SparkplugError):
        codec.check_id("device_id", "a/b")


def test_tck_id_topic_structure_namespace_unique_device_id(run: Run) -> None:
    for s in sessions(run.messages):
        born = [m.device for m in s if m.kind == "DBIRTH"]
        assert len(born) == len(set(born)) or "DDEATH" in {m.kind for m in s}


def test_tck_id_topic_structure_namespace_device_id_associated_message_types(run: Run) -> None:
    assert of(run, "DBIRTH", "DDATA", "DDEATH")
    assert all(len(m.topic.split("/")) == 5 for m in of(run, "DBIRTH", "DDATA", "DDEATH"))


def test_tck_id_topic_structure_namespace_device_id_non_associated_message_types(run: Run) -> None:
    assert all(len(m.topic.split("/")) == 4 for m in of(run, "NBIRTH", "NDATA", "NDEATH"))


def test_tck_id_case_sensitivity_metric_names(run: Run) -> None:
    for m in of(run, "NBIRTH", "DBIRTH"):
        names = [x["name"] for x in m.decoded["metrics"]]
        assert len({n.lower() for n in names}) == len(names)


# --- NBIRTH -------------------------------------------------------------------------------------------------------


def test_tck_id_topics_nbirth_topic(run: Run) -> None:
    assert {m.topic for m in of(run, "NBIRTH")} == {f"spBv1.0/{GROUP}/NBIRTH/{NODE_ID}"}


def test_tck_id_topics_nbirth_mqtt(run: Run) -> None:
    assert all(m.qos == 0 and not m.retain for m in of(run, "NBIRTH"))


def test_tck_id_topics_nbirth_seq_num(run: Run) -> None:
    assert all(m.decoded["seq"] == 0 for m in of(run, "NBIRTH"))


def test_tck_id_topics_nbirth_timestamp(run: Run) -> None:
    assert sent_during_run(run, of(run, "NBIRTH"))


def test_tck_id_topics_nbirth_bdseq_included(run: Run) -> None:
    for m in of(run, "NBIRTH"):
        assert metric(m, "bdSeq")["type"] == "Int64"


def test_tck_id_topics_nbirth_bdseq_matching(run: Run) -> None:
    # Each NDEATH (the Will, or published for an intended disconnect) names its NBIRTH's bdSeq.
    current = None
    checked = 0
    for m in run.messages:
        if m.kind == "NBIRTH":
            current = metric(m, "bdSeq")["value"]
        elif m.kind == "NDEATH":
            assert metric(m, "bdSeq")["value"] == current
            checked += 1
    assert checked == 2


def test_tck_id_topics_nbirth_bdseq_increment(run: Run) -> None:
    values = [metric(m, "bdSeq")["value"] for m in of(run, "NBIRTH")]
    assert values[0] == 0  # a fresh state directory
    # Births of one connection repeat it; the reconnection after the host went offline adds one.
    assert sorted(set(values)) == [0, 1]
    assert values == sorted(values)
    assert run.node.catalog.bdseq == 1


def test_tck_id_topics_nbirth_rebirth_metric(run: Run) -> None:
    for m in of(run, "NBIRTH"):
        r = metric(m, codec.REBIRTH)
        assert r["type"] == "Boolean"
        assert r["value"] is False


def test_tck_id_topics_nbirth_metric_reqs(run: Run) -> None:
    # Every alias a data message uses was announced in a birth before it, for that device.
    for i, m in enumerate(run.messages):
        if m.kind in ("DDATA", "NDATA"):
            known = births_alias(run, i)
            for x in m.decoded["metrics"]:
                assert (m.device, x["alias"]) in known, (m.topic, x)


def test_tck_id_topics_nbirth_metrics(run: Run) -> None:
    for m in of(run, "NBIRTH", "DBIRTH"):
        for x in m.decoded["metrics"]:
            assert x["name"]
            assert x["type"]
            assert "value" in x


def test_tck_id_operational_behavior_data_publish_nbirth(run: Run) -> None:
    node_births = of(run, "NBIRTH")
    names = {x["name"] for x in node_births[-1].decoded["metrics"]}
    assert "Diagnostics/clock_step" in names  # the node-level metric, announced in every later NBIRTH


def test_tck_id_operational_behavior_data_publish_nbirth_values(run: Run) -> None:
    # Before anything was reported the value is unknown: null (no value), never a made-up one.
    first = of(run, "DBIRTH")[0]
    for x in first.decoded["metrics"]:
        assert x["value"] is None
    later = [m for m in of(run, "DBIRTH") if m.device == SUBJ_A][-1]
    assert metric(later, f"{SPO2}/mean")["value"] in (91.0, 92.0)


# --- DBIRTH ---------------------------------------------------------------------------------------------------------


def test_tck_id_topics_dbirth_topic(run: Run) -> None:
    assert {m.topic for m in of(run, "DBIRTH")} == {
        f"spBv1.0/{GROUP}/DBIRTH/{NODE_ID}/{s}" for s in (SUBJ_A, SUBJ_B)
    }


def test_tck_id_topics_dbirth_mqtt(run: Run) -> None:
    assert all(m.qos == 0 and not m.retain for m in of(run, "DBIRTH"))


def test_tck_id_topics_dbirth_seq(run: Run) -> None:
    for s in sessions(run.messages):
        for prev, m in itertools.pairwise(s):
            if m.kind == "DBIRTH":
                assert m.decoded["seq"] == (prev.decoded["seq"] + 1) % 256


def test_tck_id_topics_dbirth_timestamp(run: Run) -> None:
    assert sent_during_run(run, of(run, "DBIRTH"))


def test_tck_id_topics_dbirth_metric_reqs(run: Run) -> None:
    test_tck_id_topics_nbirth_metric_reqs(run)
    a = [m for m in of(run, "DBIRTH") if m.device == SUBJ_A][-1]
    names = {x["name"] for x in a.decoded["metrics"]}
    assert {f"{SPO2}/mean", f"{SPO2}/missing", "MDC_TEMP_BODY/mean", f"Alarms/limit/{SPO2}/Active"} <= names


def test_tck_id_topics_dbirth_metrics(run: Run) -> None:
    test_tck_id_topics_nbirth_metrics(run)


def test_tck_id_payloads_dbirth_order(run: Run) -> None:
    # After an NBIRTH come the DBIRTHs, then data.
    for s in sessions(run.messages):
        kinds = [m.kind for m in s]
        births = [k for k in kinds if k == "DBIRTH"]
        assert kinds[: 1 + len(births)] == ["NBIRTH", *births]


def test_tck_id_message_flow_device_birth_publish_nbirth_wait(run: Run) -> None:
    seen_nbirth = False
    for m in run.messages:
        if m.kind == "NBIRTH":
            seen_nbirth = True
        elif m.kind == "NDEATH":
            seen_nbirth = False
        elif m.kind == "DBIRTH":
            assert seen_nbirth


def test_tck_id_message_flow_device_birth_publish_dbirth_match_edge_node_topic(run: Run) -> None:
    nb = of(run, "NBIRTH")[0].topic.split("/")
    assert all(m.topic.split("/")[1] == nb[1] and m.topic.split("/")[3] == nb[3] for m in of(run, "DBIRTH"))


def test_tck_id_operational_behavior_data_publish_dbirth_values(run: Run) -> None:
    test_tck_id_operational_behavior_data_publish_nbirth_values(run)


def test_tck_id_operational_behavior_data_publish_dbirth(run: Run) -> None:
    # A metric never seen before is announced by a complete birth sequence before its first value.
    new = run.marks["new_metric"]
    after = run.messages[new:]
    kinds = [m.kind for m in after]
    first_data = next(i for i, m in enumerate(after) if m.kind == "DDATA")
    assert kinds[0] == "NBIRTH"
    assert first_data > 0
    assert any("MDC_TEMP_BODY/mean" in {x["name"] for x in m.decoded["metrics"]} for m in after[:first_data])


# --- DDATA / NDATA ----------------------------------------------------------------------------------------------


def test_tck_id_topics_ddata_topic(run: Run) -> None:
    assert all(m.topic == f"spBv1.0/{GROUP}/DDATA/{NODE_ID}/{m.device}" for m in of(run, "DDATA"))


def test_tck_id_topics_ndata_topic(run: Run) -> None:
    assert [m.topic for m in of(run, "NDATA")] == [f"spBv1.0/{GROUP}/NDATA/{NODE_ID}"]


def test_tck_id_topics_ddata_mqtt(run: Run) -> None:
    # Deviation, on purpose: data goes at QoS 1 so a record leaves the outbox only on its PUBACK.
    assert all(m.qos == 1 and not m.retain for m in of(run, "DDATA", "NDATA"))


def test_tck_id_payloads_sequence_num_incrementing(run: Run) -> None:
    for s in sessions(run.messages):
        seqs = [m.decoded["seq"] for m in s]
        assert seqs == [i % 256 for i in range(len(seqs))]


def test_tck_id_payloads_sequence_num_always_included(run: Run) -> None:
    assert all(isinstance(m.decoded.get("seq"), int) for m in run.messages if m.kind != "NDEATH")


def test_tck_id_topics_ddata_timestamp(run: Run) -> None:
    assert sent_during_run(run, of(run, "DDATA", "NDATA"))


def test_tck_id_topics_ddata_payload(run: Run) -> None:
    # Report by exception: the live record with the same values sent nothing; the next only its change.
    live = [i for i in range(run.marks["live"], run.marks["rebirth"]) if run.messages[i].kind == "DDATA"]
    assert len(live) == 2
    assert data_values(run, live[0]) == {
        f"{SPO2}/mean": 93.0,
        f"{SPO2}/left_out/flagged": 0,
        f"{SPO2}/left_out/implausible": 0,
        f"{SPO2}/missing": 0.0,
    }
    assert data_values(run, live[1]) == {f"{SPO2}/mean": 92.0}
    assert run.node.counters.unchanged >= 1


def test_tck_id_operational_behavior_data_publish_dbirth_change(run: Run) -> None:
    test_tck_id_topics_ddata_payload(run)


def test_tck_id_payloads_ddata_order(run: Run) -> None:
    born = False
    for m in run.messages:
        if m.kind == "NBIRTH":
            born = True
        elif m.kind == "NDEATH":
            born = False
        elif m.kind in ("DDATA", "NDATA"):
            assert born


# --- DDEATH, NDEATH ------------------------------------------------------------------------------------------------


def test_tck_id_operational_behavior_device_ddeath(run: Run) -> None:
    after = run.messages[run.marks["device_lost"] : run.marks["device_back"]]
    # The alarm's metrics are new: births announce them, then the alarm, then DDEATH.
    assert [m.kind for m in after] == ["NBIRTH", "DBIRTH", "DBIRTH", "DDATA", "DDEATH"]
    assert after[3].device == SUBJ_B
    assert after[4].device == SUBJ_B
    values = data_values(run, run.marks["device_lost"] + 3)
    assert values[f"Alarms/device/{DEV_B}/Active"] is True
    # Every value the device delivers (both of its streams) is stale: null, quality "stale" (500).
    stale = [
        x
        for x in after[3].decoded["metrics"]
        if x.get("properties", {}).get("Quality", {}).get("value") == 500
    ]
    assert (
        len(stale) == 9
    )  # temp: mean, sd, missing; flow: mean, missing; both: left_out/flagged, /implausible
    assert all(x["value"] is None for x in stale)
    nulls = {name for name, v in values.items() if v is None}
    assert {"Pump/temp/mean", "Pump/temp/sd", "Pump/flow/mean", "Pump/flow/missing"} <= nulls


def test_tck_id_topics_ddeath_topic(run: Run) -> None:
    assert [m.topic for m in of(run, "DDEATH")] == [f"spBv1.0/{GROUP}/DDEATH/{NODE_ID}/{SUBJ_B}"]


def test_tck_id_topics_ddeath_mqtt(run: Run) -> None:
    assert all(m.qos == 0 and not m.retain for m in of(run, "DDEATH"))


def test_tck_id_topics_ddeath_seq_num(run: Run) -> None:
    test_tck_id_payloads_sequence_num_incrementing(run)
    assert all(isinstance(m.decoded["seq"], int) for m in of(run, "DDEATH"))


def test_tck_id_payloads_ddeath_timestamp(run: Run) -> None:
    assert sent_during_run(run, of(run, "DDEATH"))


def test_tck_id_topics_ndeath_topic(run: Run) -> None:
    assert {m.topic for m in of(run, "NDEATH")} == {f"spBv1.0/{GROUP}/NDEATH/{NODE_ID}"}


def test_tck_id_topics_ndeath_payload(run: Run) -> None:
    for m in of(run, "NDEATH"):
        assert [x["name"] for x in m.decoded["metrics"]] == ["bdSeq"]
        assert m.decoded["metrics"][0]["type"] == "Int64"


def test_tck_id_topics_ndeath_seq(run: Run) -> None:
    assert all("seq" not in m.decoded or m.decoded["seq"] is None for m in of(run, "NDEATH"))


def test_tck_id_operational_behavior_edge_node_intentional_disconnect_ndeath(run: Run) -> None:
    assert run.messages[-1].kind == "NDEATH"
    last_birth = of(run, "NBIRTH")[-1]
    assert metric(run.messages[-1], "bdSeq")["value"] == metric(last_birth, "bdSeq")["value"]


def test_tck_id_payloads_ndeath_will_message_publisher_disconnect_mqtt50(run: Run) -> None:
    # MQTT 5: the stop sends DISCONNECT "with Will message", so the broker published the NDEATH Will.
    assert run.messages[-1].qos == 1
    assert not run.messages[-1].retain


# --- rebirth -------------------------------------------------------------------------------------------------------


def test_tck_id_message_flow_edge_node_ncmd_subscribe(run: Run) -> None:
    assert run.node.counters.rebirth_requests == 1


def test_tck_id_operational_behavior_data_commands_rebirth_action_1(run: Run) -> None:
    after = run.messages[run.marks["rebirth"] : run.marks["device_lost"]]
    assert after[0].kind == "NBIRTH"  # nothing else between the command and the births


def test_tck_id_operational_behavior_data_commands_rebirth_action_2(run: Run) -> None:
    after = run.messages[run.marks["rebirth"] : run.marks["device_lost"]]
    assert [m.kind for m in after] == ["NBIRTH", "DBIRTH", "DBIRTH"]


def test_tck_id_operational_behavior_data_commands_rebirth_action_3(run: Run) -> None:
    births = of(run, "NBIRTH")
    assert metric(births[1], "bdSeq")["value"] == metric(births[0], "bdSeq")["value"]


def test_tck_id_operational_behavior_data_commands_rebirth_name_aliases(run: Run) -> None:
    for m in of(run, "NBIRTH"):
        assert "alias" not in metric(m, codec.REBIRTH)


# --- primary host -------------------------------------------------------------------------------------------------


def test_tck_id_message_flow_edge_node_birth_publish_phid_wait(run: Run) -> None:
    assert run.marks["before_online"] == 0
    assert run.messages[0].kind == "NBIRTH"


def test_tck_id_message_flow_edge_node_birth_publish_phid_wait_online(run: Run) -> None:
    assert run.marks["after_offline_state"] == 0  # an online=false STATE does not start the births


def test_tck_id_message_flow_edge_node_birth_publish_phid_wait_id(run: Run) -> None:
    # "other-host" said online=true while the node waited for scada-1: nothing was published.
    assert run.marks["after_offline_state"] == 0


def test_tck_id_operational_behavior_edge_node_termination_host_offline_timestamp(run: Run) -> None:
    # The offline STATE stamped 900, older than the online one (1000), ended nothing.
    live = run.messages[run.marks["live"] : run.marks["rebirth"]]
    assert [m.kind for m in live] == ["DDATA", "DDATA"]
    assert run.node.bdseq >= 1
    assert [m.kind for m in run.messages[: run.marks["host_offline"]]].count("NDEATH") == 0


def test_tck_id_operational_behavior_edge_node_termination_host_offline(run: Run) -> None:
    after = run.messages[run.marks["host_offline"] : run.marks["host_back"]]
    assert [m.kind for m in after] == ["NDEATH"]


def test_tck_id_operational_behavior_edge_node_termination_host_offline_reconnect(run: Run) -> None:
    after = run.messages[run.marks["host_back"] :]
    assert after[0].kind == "NBIRTH"
    assert metric(after[0], "bdSeq")["value"] == 1


def test_tck_id_operational_behavior_edge_node_birth_sequence_wait(run: Run) -> None:
    test_tck_id_message_flow_edge_node_birth_publish_phid_wait(run)
    assert run.marks["host_back"] - run.marks["host_offline"] == 1  # only the NDEATH while away


# --- payload details --------------------------------------------------------------------------------------------


def test_tck_id_payloads_alias_uniqueness(run: Run) -> None:
    for s in sessions(run.messages):
        aliases = [
            x["alias"]
            for m in s
            if m.kind in ("NBIRTH", "DBIRTH")
            for x in m.decoded["metrics"]
            if "alias" in x
        ]
        assert len(aliases) == len(set(aliases))


def test_tck_id_payloads_alias_birth_requirement(run: Run) -> None:
    for m in of(run, "NBIRTH", "DBIRTH"):
        for x in m.decoded["metrics"]:
            assert x["name"]
            assert "alias" in x or x["name"] in (codec.BDSEQ, codec.REBIRTH)


def test_tck_id_payloads_alias_data_cmd_requirement(run: Run) -> None:
    for m in of(run, "DDATA", "NDATA"):
        assert all("alias" in x and not x.get("name") for x in m.decoded["metrics"])


def test_tck_id_payloads_name_birth_data_requirement(run: Run) -> None:
    for m in of(run, "NBIRTH", "DBIRTH", "DDATA", "NDATA"):
        assert all(isinstance(x.get("timestamp"), int) for x in m.decoded["metrics"])


def test_tck_id_payloads_metric_datatype_req(run: Run) -> None:
    valid = {"Int32", "Int64", "Double", "Boolean", "String"}
    for m in of(run, "NBIRTH", "DBIRTH"):
        assert all(x.get("type") in valid for x in m.decoded["metrics"])


def test_tck_id_payloads_metric_datatype_not_req(run: Run) -> None:
    for m in of(run, "DDATA", "NDATA"):
        assert all(not x.get("type") for x in m.decoded["metrics"])


def test_tck_id_payloads_propertyset_quality_value_type(run: Run) -> None:
    qualities = [
        x["properties"]["Quality"]
        for m in run.messages
        for x in m.decoded["metrics"]
        if "Quality" in x.get("properties", {})
    ]
    assert qualities
    assert all(q["type"] == "Int32" for q in qualities)


def test_tck_id_payloads_propertyset_quality_value_value(run: Run) -> None:
    values = {
        x["properties"]["Quality"]["value"]
        for m in run.messages
        for x in m.decoded["metrics"]
        if "Quality" in x.get("properties", {})
    }
    assert values <= {0, 192, 500}
    assert {192, 500} <= values


def test_tck_id_payloads_propertyset_keys_array_size(run: Run) -> None:
    for m in run.messages:
        for x in codec.decode(m.payload).metrics:
            assert len(x.properties.keys) == len(x.properties.values)


def test_tck_id_payloads_metric_propertyvalue_type_req(run: Run) -> None:
    for m in of(run, "NBIRTH", "DBIRTH"):
        for x in codec.decode(m.payload).metrics:
            assert all(v.HasField("type") for v in x.properties.values)


# --- store and forward, alarms, identities --------------------------------------------------------------------


def test_historical_backlog_replayed_after_births_with_original_timestamps(run: Run) -> None:
    first = sessions(run.messages)[0]
    data = [m for m in first if m.kind in ("DDATA", "NDATA")][:6]
    assert [m.kind for m in first[:3]] == ["NBIRTH", "DBIRTH", "DBIRTH"]
    stamps = sorted({x["timestamp"] for m in data for x in m.decoded["metrics"]})
    assert stamps == [10_000, 11_000, 11_500, 11_600, 12_000, 12_500]
    assert all(x.get("isHistorical") is True for m in data for x in m.decoded["metrics"])
    # The record queued while the host was offline went out as history after the new births.
    back = run.messages[run.marks["host_back"] :]
    replay = [m for m in back if m.kind == "DDATA"]
    assert replay
    assert all(x.get("isHistorical") for x in replay[0].decoded["metrics"])
    assert {x["timestamp"] for x in replay[0].decoded["metrics"]} == {20_000}
    assert run.pending_after == 0


def test_an_alarm_replayed_as_history_is_then_told_as_on_now(run: Run) -> None:
    # History is not a current value: after the backlog the host holds what the births said
    # (never reported: null) until the node tells it what the backlog left on.
    first = sessions(run.messages)[0]
    birth = next(m for m in first if m.kind == "DBIRTH" and m.device == SUBJ_A)
    assert metric(birth, f"Alarms/limit/{SPO2}/Active")["value"] is None
    told = current(run.messages[: run.marks["live"]])
    assert [m.device for m in told] == [SUBJ_A]
    index = run.messages.index(told[0])
    values = data_values(run, index)
    assert values == {f"Alarms/limit/{SPO2}/Active": True, f"Alarms/limit/{SPO2}/Priority": 2}
    assert all(x.timestamp >= run.began_ms for x in codec.decode(told[0].payload).metrics)


def test_sensor_fault_as_quality_with_the_opcua_status_code(run: Run) -> None:
    after = run.messages[run.marks["fault"] : run.marks["host_offline"]]
    data = [m for m in after if m.kind == "DDATA"]
    assert len(data) == 1
    faulted = [x for x in data[0].decoded["metrics"] if "opcuaStatus" in x.get("properties", {})]
    assert len(faulted) == 5  # Pump/temp/mean, /sd, /missing, /left_out/flagged and /left_out/implausible
    for x in faulted:
        props = x["properties"]
        assert x["value"] is None
        assert props["Quality"]["value"] == 0
        assert props["opcuaStatus"]["value"] == "bad_nodeidunknown"
        assert props["opcuaStatusCode"]["value"] == 0x80340000  # OPC UA BadNodeIdUnknown


def test_alarm_metrics_active_priority_value_limit(run: Run) -> None:
    a = [m for m in of(run, "DBIRTH") if m.device == SUBJ_A][-1]
    base = f"Alarms/limit/{SPO2}"
    assert metric(a, f"{base}/Active")["type"] == "Boolean"
    assert metric(a, f"{base}/Priority")["type"] == "Int32"
    assert metric(a, f"{base}/Value")["type"] == "Double"
    values: dict[str, Any] = {}
    for i, m in enumerate(sessions(run.messages)[0]):
        if m.kind == "DDATA" and m.device == SUBJ_A:
            values.update(data_values(run, i))
    assert values[f"{base}/Active"] is True
    assert values[f"{base}/Priority"] == 2
    assert values[f"{base}/Value"] == 88.0
    assert values[f"{base}/Limit"] == 90.0


def test_identity_never_leaves(run: Run) -> None:
    assert run.dead_lettered == 1
    for m in run.messages:
        assert SECRET.lower().encode() not in (m.topic.encode() + m.payload).lower()


def test_bdseq_and_aliases_persist(run: Run, tmp_path: Path) -> None:
    path = run.node.catalog.path
    assert path is not None
    from gateway.uplink.sparkplug.state import Catalog  # noqa: PLC0415

    copy = tmp_path / "sparkplug.json"
    copy.write_bytes(path.read_bytes())
    again = Catalog.load(copy)
    assert again.bdseq == 1
    assert again.alias(SUBJ_A, f"{SPO2}/mean") == run.node.catalog.alias(SUBJ_A, f"{SPO2}/mean")
    assert asyncio.run(again.next_bdseq()) == 2


# --- configuration ----------------------------------------------------------------------------------------------


def _load(tmp_path: Path, uplink: str) -> None:
    from drivers import REGISTRY  # noqa: PLC0415
    from gateway.config import load  # noqa: PLC0415

    path = tmp_path / "edgetwin.toml"
    path.write_text(f'[gateway]\nname = "gw"\nstate_dir = "{tmp_path}"\n{uplink}')
    load(path, REGISTRY)


def test_encoding_key_is_checked(tmp_path: Path) -> None:
    from gateway.errors import ConfigError  # noqa: PLC0415

    mqtt = '[uplink.mqtt]\nhost = "127.0.0.1"\n'
    _load(
        tmp_path,
        f'[uplink]\nkind = "mqtt"\nencoding = "sparkplug"\n{mqtt}[uplink.sparkplug]\ngroup_id = "ward7"\n',
    )
    with pytest.raises(ConfigError, match="encoding"):
        _load(tmp_path, f'[uplink]\nkind = "mqtt"\nencoding = "protobuf"\n{mqtt}')
    with pytest.raises(ConfigError, match='encoding = "sparkplug" needs kind = "mqtt"'):
        _load(tmp_path, '[uplink]\nkind = "local"\nencoding = "sparkplug"\n')
    with pytest.raises(ConfigError, match="group_id"):
        _load(
            tmp_path,
            f'[uplink]\nkind = "mqtt"\nencoding = "sparkplug"\n{mqtt}[uplink.sparkplug]\ngroup_id = "a/b"\n',
        )
    with pytest.raises(ConfigError, match=r"downlink\.trust_file"):
        _load(
            tmp_path,
            f'[uplink]\nkind = "mqtt"\nencoding = "sparkplug"\n{mqtt}[downlink]\ntrust_file = "{tmp_path}/trust.pem"\n',
        )
    azure = '[uplink.mqtt]\nhost = "h.example"\nprofile = "azure"\nprotocol = "3.1.1"\nazure_hub = "hub"\n'
    with pytest.raises(ConfigError, match="static"):
        _load(tmp_path, f'[uplink]\nkind = "mqtt"\nencoding = "sparkplug"\n{azure}')


def test_docs_table_names_existing_tests() -> None:
    """Every test docs/sparkplug.md names exists, so the tck-id table cannot go stale."""
    import re  # noqa: PLC0415

    doc = (Path(__file__).resolve().parent.parent / "docs" / "sparkplug.md").read_text()
    here = Path(__file__).read_text() + "".join(
        (Path(__file__).parent / f"test_sparkplug_{name}.py").read_text()
        for name in ("gateway", "conditions")
    )
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", doc))
    assert len(named) > 40
    missing = [n for n in named if f"def {n}(" not in here]
    assert not missing, missing


def test_tck_id_payloads_sequence_num_incrementing_wraps_after_255(tmp_path: Path) -> None:
    """300 records in one session: seq runs 0..255 and on from 0, every record delivered."""
    from gateway.uplink.certs import demo_pki  # noqa: PLC0415

    pki = demo_pki(tmp_path / "pki")
    broker = MosquittoBroker(tmp_path / "broker", pki)
    broker.start()
    tahu = Tahu(tmp_path / "tahu.log")
    host = Host(broker, pki)
    try:

        async def body() -> None:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db"), flush_interval_s=0.02) as outbox:
                for i in range(300):
                    outbox.submit(window(SUBJ_A, float(i), DEV_A, SPO2, "%", mean=80.0 + i / 10))
                await outbox.flush()
                node = SparkplugNode(
                    outbox,
                    uplink_config(broker, pki),
                    SparkplugSection(),
                    NODE_ID,
                    anonymizer=scan(),
                    state_dir=tmp_path,
                )
                task = asyncio.create_task(node.run(lambda: None), name="test-sparkplug-wrap")
                try:
                    await wait_until(lambda: node.delivered >= 300, 30, "300 records")
                    await wait_until(lambda: len(host.sparkplug()) >= 302, 10, "every message at the host")
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        asyncio.run(body())
        msgs = [m for m in host.sparkplug() if m.kind != "NDEATH"]
        seqs = [tahu.decode(m.payload)["seq"] for m in msgs]
        assert [m.kind for m in msgs[:2]] == ["NBIRTH", "DBIRTH"]
        assert len(msgs) == 302
        assert seqs == [i % 256 for i in range(302)]
        assert seqs[255:258] == [255, 0, 1]
    finally:
        host.close()
        tahu.close()
        broker.stop()


def test_ids_naming_an_identity_publish_nothing(tmp_path: Path) -> None:
    """An edge node id that is a known identity (a serial here) is a configuration error, before connecting."""
    from gateway.errors import ConfigError  # noqa: PLC0415
    from gateway.uplink.config import MqttSection  # noqa: PLC0415

    async def body() -> None:
        async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db")) as outbox:
            cfg = MqttSection(host="127.0.0.1", port=1, tls=False)
            node = SparkplugNode(
                outbox, cfg, SparkplugSection(edge_node_id=SECRET), NODE_ID, anonymizer=scan(), state_dir=None
            )
            with pytest.raises(ConfigError, match="edge_node_id"):
                await node.run(lambda: None)

    asyncio.run(body())


def test_tck_id_payloads_ndeath_will_message_publisher_disconnect_mqtt311(tmp_path: Path) -> None:
    """MQTT 3.1.1 has no "DISCONNECT with Will": the node publishes the NDEATH itself before DISCONNECT."""
    from gateway.uplink.certs import demo_pki  # noqa: PLC0415

    pki = demo_pki(tmp_path / "pki")
    broker = MosquittoBroker(tmp_path / "broker", pki)
    broker.start()
    tahu = Tahu(tmp_path / "tahu.log")
    host = Host(broker, pki)
    try:

        async def body() -> None:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db"), flush_interval_s=0.02) as outbox:
                outbox.submit(window(SUBJ_A, 1.0, DEV_A, SPO2, "%", mean=97.0))
                cfg = uplink_config(broker, pki, protocol="3.1.1")
                node = SparkplugNode(
                    outbox, cfg, SparkplugSection(), NODE_ID, anonymizer=scan(), state_dir=tmp_path
                )
                await deliver(node, 1, "test-sparkplug-311")

        asyncio.run(body())
        msgs = host.wait(lambda ms: any(m.kind == "NDEATH" for m in ms), 10, "the NDEATH")
        assert [m.kind for m in msgs] == ["NBIRTH", "DBIRTH", "DDATA", "NDEATH"]
        death = tahu.decode(msgs[-1].payload)
        birth = tahu.decode(msgs[0].payload)
        assert [x["name"] for x in death["metrics"]] == ["bdSeq"]
        assert death["metrics"][0]["value"] == next(
            x["value"] for x in birth["metrics"] if x["name"] == "bdSeq"
        )
        assert msgs[-1].qos == 1
    finally:
        host.close()
        tahu.close()
        broker.stop()


def test_a_mac_spelt_across_nbirth_fields_is_no_identity(tmp_path: Path) -> None:
    """A device whose MAC is the NBIRTH's last bytes (Rebirth = false, seq 0): the node is born and delivers.

    The bytes 20 0B 70 00 18 00 are the Rebirth metric's datatype and value (tag 0x70) and the
    payload's seq, four fields: no reader sees them as one value.  Scanned as whole bytes, every
    NBIRTH was refused and the node never published anything.
    """
    from gateway.uplink.certs import demo_pki  # noqa: PLC0415

    mac = "20:0B:70:00:18:00"
    pki = demo_pki(tmp_path / "pki")
    broker = MosquittoBroker(tmp_path / "broker", pki)
    broker.start()
    tahu = Tahu(tmp_path / "tahu.log")
    host = Host(broker, pki)
    anon = scan(mac)
    try:

        async def body() -> SparkplugNode:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db"), flush_interval_s=0.02) as outbox:
                for i in range(3):
                    outbox.submit(window(SUBJ_A, float(i), DEV_A, SPO2, "%", mean=97.0 - i))
                node = SparkplugNode(
                    outbox,
                    uplink_config(broker, pki),
                    SparkplugSection(),
                    NODE_ID,
                    anonymizer=anon,
                    state_dir=tmp_path,
                )
                await deliver(node, 3, "test-sparkplug-spanning")
                return node

        node = asyncio.run(body())
        msgs = host.wait(lambda ms: sum(m.kind == "DDATA" for m in ms) >= 3, 10, "three DDATA")
        assert [m.kind for m in msgs[:2]] == ["NBIRTH", "DBIRTH"]
        nbirth = msgs[0].payload
        assert nbirth.endswith(bytes.fromhex("200b70001800"))  # the MAC's own 6 bytes
        with pytest.raises(AnonymizationError):
            anon.check(nbirth)  # what the node scanned before: the bytes as a whole
        decoded = tahu.decode(nbirth)
        assert decoded["seq"] == 0
        assert {m["name"]: m["value"] for m in decoded["metrics"]}[codec.REBIRTH] is False
        assert node.counters.dead_lettered == 0
        # The windows' means, in order (Tahu reads a value by its alias only with the births at hand).
        means = [codec.decode(m.payload).metrics[0].double_value for m in msgs if m.kind == "DDATA"]
        assert means[:3] == [97.0, 96.0, 95.0]
    finally:
        host.close()
        tahu.close()
        broker.stop()


def test_bdseq_not_writable_means_no_connect(tmp_path: Path) -> None:
    """A state directory that cannot take the next bdSeq stops the CONNECT (a restart must never reuse one)."""
    from gateway.errors import TransientError  # noqa: PLC0415
    from gateway.uplink.sparkplug.state import Catalog  # noqa: PLC0415

    (tmp_path / "a-file").write_text("where the state directory should be")
    cat = Catalog.load(tmp_path / "a-file" / "sparkplug.json")
    with pytest.raises(TransientError, match="cannot be written"):
        asyncio.run(cat.next_bdseq())
    ok = Catalog.load(tmp_path / "sparkplug.json")

    async def taken(n: int) -> list[int]:
        return [await ok.next_bdseq() for _ in range(n)]

    assert asyncio.run(taken(257))[-2:] == [255, 0]  # 0..255, wrapping
    (tmp_path / "sparkplug.json").write_text("{not json")
    fresh = Catalog.load(tmp_path / "sparkplug.json")  # set aside, said so, starts again
    assert fresh.bdseq == -1
    assert (tmp_path / "sparkplug.corrupt").exists()


def test_a_batch_cut_short_is_released_and_delivered_after_reconnecting(tmp_path: Path) -> None:
    """The state file cannot be written mid-batch (a new metric): the session ends, nothing stays leased.

    The record that failed and the rest of its batch go back to the queue and are delivered once
    the state can be written again: none waits for a restart.
    """
    from gateway.uplink.certs import demo_pki  # noqa: PLC0415

    pki = demo_pki(tmp_path / "pki")
    broker = MosquittoBroker(tmp_path / "broker", pki)
    broker.start()
    host = Host(broker, pki)
    blocker = tmp_path / ".sparkplug.json.tmp"  # where the state is written before its rename
    try:

        async def body() -> None:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db"), flush_interval_s=0.02) as outbox:
                outbox.submit(window(SUBJ_A, 0.0, DEV_A, SPO2, "%", mean=80.0))
                await outbox.flush()
                node = SparkplugNode(
                    outbox,
                    uplink_config(broker, pki),
                    SparkplugSection(),
                    NODE_ID,
                    anonymizer=scan(),
                    state_dir=tmp_path,
                )
                task = asyncio.create_task(node.run(lambda: None), name="test-sparkplug-cut")
                try:
                    await wait_until(lambda: node.delivered >= 1, 10, "the first record")
                    blocker.mkdir()  # the state cannot be written from now on
                    for i in range(1, 41):
                        if i == 6:  # a metric not announced yet: learnt, saved (fails), reborn
                            outbox.submit(window(SUBJ_A, float(i), DEV_A, "Pump/temp", "Cel", mean=40.0))
                        else:
                            outbox.submit(window(SUBJ_A, float(i), DEV_A, SPO2, "%", mean=80.0 + i / 10))
                    await outbox.flush()
                    await wait_until(lambda: not node.connected, 10, "the session to end")
                    await asyncio.sleep(0.5)  # a few reconnects fail too: the bdSeq cannot be written
                    assert not node.connected
                    blocker.rmdir()
                    deadline = time.monotonic() + 15
                    while (stats := await outbox.stats()).queued and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    leased = sum(lane.leased for lane in stats.lanes.values())
                    assert (stats.queued, leased) == (0, 0)
                    assert node.delivered == 41
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        asyncio.run(body())
    finally:
        host.close()
        broker.stop()


@contextlib.contextmanager
def broker_and_host(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, Host]]:
    """A TLS broker and a host application on it, both stopped afterwards."""
    from gateway.uplink.certs import demo_pki  # noqa: PLC0415

    pki = demo_pki(tmp_path / "pki")
    broker = MosquittoBroker(tmp_path / "broker", pki)
    broker.start()
    host = Host(broker, pki)
    try:
        yield broker, host
    finally:
        host.close()
        broker.stop()


def limit_alarm(value: float) -> OutItem:
    """A limit alarm of SUBJ_A's SpO2 whose value (and time) is ``value``: each one a change to report."""
    return alarm(SUBJ_A, value, "limit", dev=DEV_A, metric=SPO2, priority="medium", limit=90.0, value=value)


def limit_alarm_values(msgs: list[Message]) -> list[float]:
    """The values of SUBJ_A's limit alarm in its DDATA, in the order the host received them."""
    name = f"Alarms/limit/{SPO2}/Value"
    aliases: dict[int, str] = {}
    out: list[float] = []
    for m in msgs:
        if m.device != SUBJ_A:
            continue
        payload = codec.decode(m.payload)
        if m.kind == "DBIRTH":
            aliases.update((x.alias, x.name) for x in payload.metrics)
        elif m.kind == "DDATA":
            out += [x.double_value for x in payload.metrics if aliases.get(x.alias) == name]
    return out


def test_live_alarms_go_out_from_their_commit_in_order_and_are_acknowledged(tmp_path: Path) -> None:
    """Each live alarm is handed over by the commit that made it durable: no lease to wait for, in order, deleted on its PUBACK."""
    leases = LeaseLog()
    with broker_and_host(tmp_path) as (broker, host):

        async def body() -> int:
            async with AsyncOutbox(
                lambda: LeaseRecorder(tmp_path / "outbox.db", leases), flush_interval_s=0.02
            ) as outbox:
                outbox.submit(window(SUBJ_A, 0.0, DEV_A, SPO2, "%", mean=80.0))
                cfg = uplink_config(broker, broker.pki)
                node = SparkplugNode(
                    outbox, cfg, SparkplugSection(), NODE_ID, anonymizer=scan(), state_dir=tmp_path
                )
                async with running(node, "test-sparkplug-alarms"):
                    await wait_until(lambda: node.delivered >= 1, 10, "the node delivering")
                    # Alarms between windows, some in one commit, some alone, while windows stream.
                    n = 0
                    for i in range(1, 41):
                        outbox.submit(window(SUBJ_A, float(i), DEV_A, SPO2, "%", mean=80.0 + i / 10))
                        if i % 3 == 0:
                            n += 1
                            outbox.submit(limit_alarm(float(n)))
                        if i % 7 == 0:
                            n += 1
                            outbox.submit(limit_alarm(float(n)))
                            await asyncio.sleep(0.005)
                    await outbox.flush()
                    last = await outbox.last_id()
                    await wait_until(lambda: node.delivered == last, 20, "every record acknowledged")
                    assert (await outbox.stats()).queued == 0  # deleted once acknowledged
                    host.wait(lambda ms: len(limit_alarm_values(ms)) >= n, 10, "every alarm at the host")
                return n

        n = asyncio.run(body())
        values = limit_alarm_values(host.sparkplug())
    assert values == [float(v) for v in range(1, n + 1)]  # each once, in order
    # None of them waited for a lease: each was handed over by the commit that made it durable.
    assert Lane.ALARMS not in leases.lanes
    assert leases.lanes.count(Lane.FEATURES) == 41


def test_alarms_handed_over_on_a_connection_that_dies_are_released_and_sent_again(tmp_path: Path) -> None:
    """Alarms handed over and published into a dead link go back to the queue and out on the next connection, in order."""
    leases = LeaseLog()
    with broker_and_host(tmp_path) as (broker, host), TcpProxy(broker.host, broker.port) as proxy:

        async def body() -> None:
            async with AsyncOutbox(
                lambda: LeaseRecorder(tmp_path / "outbox.db", leases), flush_interval_s=0.02
            ) as outbox:
                outbox.submit(limit_alarm(0.0))  # its metrics are born with the first births
                cfg = uplink_config(broker, broker.pki, port=proxy.port)
                node = SparkplugNode(
                    outbox, cfg, SparkplugSection(), NODE_ID, anonymizer=scan(), state_dir=tmp_path
                )
                async with running(node, "test-sparkplug-alarms-lost"):
                    await wait_until(lambda: node.delivered >= 1, 10, "the node delivering")
                    published = node.counters.published
                    proxy.stall()  # published into a black hole: no PUBACK comes
                    for v in range(1, 6):
                        outbox.submit(limit_alarm(float(v)))
                        await outbox.flush()
                    await wait_until(
                        lambda: node.counters.published >= published + 5, 10, "the alarms published"
                    )
                    proxy.clear()  # the stalled connection is reset: a new one takes over
                    await wait_until(lambda: node.delivered >= 6, 20, "the alarms acknowledged")
                    assert (await outbox.stats()).queued == 0
                    host.wait(lambda ms: len(limit_alarm_values(ms)) >= 6, 10, "the alarms at the host")

        asyncio.run(body())
        values = limit_alarm_values(host.sparkplug())
    # Handed over by their commits (no lease), released when the connection died, then leased by
    # the next connection as records sent once already.
    assert [leases.attempts.get(rid) for rid in range(2, 7)] == [[1]] * 5
    assert values[-5:] == [1.0, 2.0, 3.0, 4.0, 5.0]  # sent again, in order, after the connection died
    assert list(dict.fromkeys(values)) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_state_writes_leave_the_loop_free_and_each_bdseq_is_on_disk_before_its_connect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each fsync 0.3 s slower (an SD card at its worst): the bdSeq written at each CONNECT and the
    catalog written when the births forget a device never hold the event loop, and every CONNECT
    goes out with its bdSeq already in ``sparkplug.json``."""
    import json  # noqa: PLC0415

    from durability import syncs  # noqa: PLC0415
    from test_step_turns import SLOW_SYNC_S, _watch  # noqa: PLC0415

    from gateway.uplink.connection import PahoClient  # noqa: PLC0415

    state = tmp_path / "sparkplug.json"
    # A device learnt before its id became a known identity: the births forget it and write the catalog.
    entry = {"alias": 1, "type": codec.DOUBLE, "unit": "%", "low": None, "high": None}
    state.write_text(
        json.dumps({"version": 4, "bdseq": 4, "devices": {f"x{SECRET}": {f"{SPO2}/mean": entry}}})
    )
    at_connect: list[tuple[int, int]] = []  # (the bdSeq on disk, the node's) as each CONNECT goes out
    nodes: list[SparkplugNode] = []
    real_connect = PahoClient.connect

    def connect(self: PahoClient, *args: Any, **kwargs: Any) -> Any:
        at_connect.append((json.loads(state.read_text())["bdseq"], nodes[0].bdseq))
        return real_connect(self, *args, **kwargs)

    monkeypatch.setattr(PahoClient, "connect", connect)  # the gateway's client only, passed through
    with broker_and_host(tmp_path) as (broker, host):

        async def body() -> tuple[float, list[int]]:
            async with AsyncOutbox(lambda: Outbox(tmp_path / "outbox.db"), flush_interval_s=0.02) as outbox:
                node = SparkplugNode(
                    outbox,
                    uplink_config(broker, broker.pki),
                    SparkplugSection(),
                    NODE_ID,
                    anonymizer=scan(),
                    state_dir=tmp_path,
                )
                nodes.append(node)
                with syncs(monkeypatch, SLOW_SYNC_S):
                    async with _watch(0.005) as loop, running(node, "test-sparkplug-slow-disk"):
                        await wait_until(lambda: node.connected, 10, "the node born")
                        bdseqs = [node.bdseq]
                        broker.stop()  # the connection drops: a new bdSeq at the next CONNECT
                        await wait_until(lambda: not node.connected, 10, "the connection lost")
                        broker.start()
                        await wait_until(lambda: node.connected, 20, "the node born again")
                        bdseqs.append(node.bdseq)
                        await asyncio.sleep(4 * SLOW_SYNC_S)  # the forgetting's write, not awaited, lands
                return loop.held_s, bdseqs

        held, bdseqs = asyncio.run(body())
        births = [m for m in host.sparkplug() if m.kind == "NBIRTH"]
    assert held < SLOW_SYNC_S, held  # the loop ran on while each write waited for two slow syncs
    assert bdseqs[0] == 5
    assert bdseqs[1] > bdseqs[0]  # one per CONNECT, the failed ones while the broker was down too
    assert at_connect[0] == (5, 5)
    assert all(disk == mine for disk, mine in at_connect), at_connect
    assert len(births) >= 2
    assert json.loads(state.read_text())["bdseq"] == bdseqs[1]
    doc = json.loads(state.read_text())
    assert f"x{SECRET}" not in doc["devices"]  # forgotten, and written so
