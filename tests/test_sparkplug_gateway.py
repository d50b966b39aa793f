"""``edgetwin run`` as a Sparkplug B edge node, killed, restarted and cut off from its broker.

A real gateway process (a simulated patient, the pipeline, the outbox) publishes to mosquitto with
TLS and client certificates; a host application records ``spBv1.0/#`` and Eclipse Tahu's
JavaScript codec decodes it.  SIGKILL (after the first data, and right after a CONNECT): the
broker publishes the NDEATH Will with the bdSeq of the NBIRTH, and the restarted gateway is born
with bdSeq + 1, never one already used.  Broker outage (campaign): what
was queued meanwhile comes back as historical data, none of it lost.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import LoggedProcess
from sparkplug_support import Host, Message, Tahu
from uplink_support import require_mosquitto

from gateway.outbox import Outbox
from gateway.records.thin import HEARTBEAT_WINDOWS
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI, demo_pki

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_NAME = "ward7-hub"
PATIENT = "MRN-7731-JONES"


def _config(
    tmp: Path, broker: MosquittoBroker, pki: DemoPKI, extra: str = "", device: str = "A4:C1:38:00:00:07"
) -> Path:
    path = tmp / "edgetwin.toml"
    path.write_text(
        f"""
[gateway]
name = "{GATEWAY_NAME}"
state_dir = "{tmp / "state"}"
[pipeline]
window_s = 1.0
hop_s = 0.5
grace_s = 0.2
[runtime]
drain_deadline_s = 1.0
start_timeout_s = 10.0
[uplink]
kind = "mqtt"
encoding = "sparkplug"
[uplink.mqtt]
host = "{broker.host}"
port = {broker.port}
ca_file = "{pki.ca_file}"
cert_file = "{pki.gateway.cert}"
key_file = "{pki.gateway.key}"
reconnect_min_s = 0.2
reconnect_max_s = 1.0
connect_timeout_s = 3.0
keepalive_s = 5
[uplink.sparkplug]
group_id = "ward7"
{extra}
[[sources]]
name = "bed7-sim"
driver = "sim"
subject = "{PATIENT}"
profile = "patient"
device = "{device}"
"""
    )
    return path


class Gateway:
    def __init__(self, config: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("NOTIFY_SOCKET", None)
        env.pop("RUNTIME_DIRECTORY", None)
        self.proc = LoggedProcess(
            [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
            log=config.parent / "gateway.log",
            env=env,
            stdout=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> str:
        return self.proc.stop()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, DemoPKI, Host, Tahu]]:
    require_mosquitto()
    pki = demo_pki(tmp_path / "pki")
    broker = MosquittoBroker(tmp_path / "broker", pki)
    broker.start()
    tahu = Tahu(tmp_path / "tahu.log")
    host = Host(broker, pki)
    try:
        yield broker, pki, host, tahu
    finally:
        host.close()
        tahu.close()
        broker.stop()


def _bdseq(tahu: Tahu, msg: Message) -> int:
    metrics = tahu.decode(msg.payload)["metrics"]
    value = next(m["value"] for m in metrics if m["name"] == "bdSeq")
    assert isinstance(value, int)
    return value


def _aliases(tahu: Tahu, births: list[Message]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in births:
        out.update({x["name"]: x["alias"] for x in tahu.decode(m.payload)["metrics"] if "alias" in x})
    return out


def _after(msgs: list[Message], start: int, kind: str) -> list[Message]:
    return [m for m in msgs[start:] if m.kind == kind]


def test_tck_id_message_flow_edge_node_birth_publish_will_message_payload_bdseq(
    tmp_path: Path, setup: tuple[MosquittoBroker, DemoPKI, Host, Tahu]
) -> None:
    """SIGKILL: the broker's NDEATH (our Will) carries the NBIRTH's bdSeq; each restart uses bdSeq + 1, killed right after its CONNECT too."""
    broker, pki, host, tahu = setup
    config = _config(tmp_path, broker, pki)
    gw = Gateway(config)
    try:
        msgs = host.wait(lambda ms: any(m.kind == "DDATA" for m in ms), 40, "the first DDATA")
        births = _after(msgs, 0, "NBIRTH")
        node_id = births[0].topic.split("/")[3]
        assert GATEWAY_NAME not in node_id  # the gateway's pseudonym, never its name
        assert PATIENT not in " ".join(m.topic for m in msgs)
        assert _bdseq(tahu, births[0]) == 0
        gw.kill()
        msgs = host.wait(lambda ms: any(m.kind == "NDEATH" for m in ms), 15, "the NDEATH Will")
        death = _after(msgs, 0, "NDEATH")[0]
        assert death.topic == f"spBv1.0/ward7/NDEATH/{node_id}"
        assert death.qos == 1  # tck-id-message-flow-edge-node-birth-publish-will-message-qos
        assert not death.retain  # ...-will-message-will-retained
        decoded = tahu.decode(death.payload)
        assert [m["name"] for m in decoded["metrics"]] == ["bdSeq"]
        assert decoded["metrics"][0]["type"] == "Int64"
        assert _bdseq(tahu, death) == 0
        mark = len(msgs)
        first = _aliases(tahu, _after(msgs, 0, "DBIRTH"))
        gw = Gateway(config)
        msgs = host.wait(lambda ms: bool(_after(ms, mark, "DBIRTH")), 40, "the births after the restart")
        assert _bdseq(tahu, _after(msgs, mark, "NBIRTH")[0]) == 1
        # Metric names and aliases are the same after the restart (kept in the state directory).
        again = _aliases(tahu, _after(msgs, mark, "DBIRTH"))
        assert first
        assert set(first) <= set(again)
        assert all(again[name] == alias for name, alias in first.items())
        # SIGKILL as soon as the NBIRTH is out (right after the CONNECT), twice: the bdSeq was on
        # disk before the CONNECT, so each Will names its NBIRTH's and each restart takes the next.
        for expected in (2, 3):
            mark = len(msgs)
            gw.kill()
            msgs = host.wait(lambda ms, m=mark: bool(_after(ms, m, "NDEATH")), 15, "the NDEATH Will")
            assert _bdseq(tahu, _after(msgs, mark, "NDEATH")[0]) == expected - 1
            mark = len(msgs)
            gw = Gateway(config)
            msgs = host.wait(
                lambda ms, m=mark: bool(_after(ms, m, "NBIRTH")), 40, "the NBIRTH after the restart"
            )
            assert _bdseq(tahu, _after(msgs, mark, "NBIRTH")[0]) == expected
        # An orderly stop: NDEATH (the Will, sent on DISCONNECT "with Will message") with the same bdSeq.
        mark = len(msgs)
        gw.stop()
        msgs = host.wait(lambda ms: bool(_after(ms, mark, "NDEATH")), 15, "the NDEATH of the stop")
        assert _bdseq(tahu, _after(msgs, mark, "NDEATH")[0]) == 3
    finally:
        gw.stop()


def test_a_monitor_whose_mac_is_the_nbirths_last_bytes_is_born_and_delivers(
    tmp_path: Path, setup: tuple[MosquittoBroker, DemoPKI, Host, Tahu]
) -> None:
    """MAC 20:0B:70:00:18:00 is the NBIRTH's Rebirth = false and seq 0 as bytes: no identity there.

    Scanned as whole bytes, the NBIRTH of a gateway with that monitor was refused at every
    connection: nothing was ever published.  Scanned field by field, it is born and delivers.
    """
    broker, pki, host, tahu = setup
    gw = Gateway(_config(tmp_path, broker, pki, device="20:0B:70:00:18:00"))
    try:
        msgs = host.wait(lambda ms: sum(m.kind == "DDATA" for m in ms) >= 2, 40, "the first DDATA")
    finally:
        log = gw.stop()
    nbirth = _after(msgs, 0, "NBIRTH")[0]
    # Born at the start with no device and no node metric yet: the payload ends with those bytes.
    assert nbirth.payload.endswith(bytes.fromhex("200b70001800"))
    assert tahu.decode(nbirth.payload)["seq"] == 0
    assert "appears in an outgoing record" not in log, log[-2000:]
    for m in msgs:  # the monitor's address appears nowhere as text, in any letter case
        assert b"200b70001800" not in (m.topic.encode() + m.payload).lower()


@pytest.mark.campaign
def test_broker_outage_history_replayed_nothing_lost(
    tmp_path: Path, setup: tuple[MosquittoBroker, DemoPKI, Host, Tahu]
) -> None:
    """Broker down for 8 s: everything queued meanwhile arrives, historical, in time order; 0 lost."""
    broker, pki, _, tahu = setup
    # The primary host announces itself at each connection: the gateway waits for it after the outage.
    host = Host(broker, pki, "scada-9", announce=True)
    config = _config(tmp_path, broker, pki, 'primary_host = "scada-9"')
    gw = Gateway(config)
    try:
        host.wait(lambda ms: sum(m.kind == "DDATA" for m in ms) >= 3, 40, "live data")
        broker.stop()
        time.sleep(8.0)
        broker.start()
        # The host's client reconnects by itself; the gateway's births, then the backlog.
        host.wait(lambda ms: sum(m.kind == "NBIRTH" for m in ms) >= 2, 40, "the births after the outage")
        time.sleep(4.0)
        msgs = host.sparkplug()
    finally:
        gw.stop()
        host.close()
    names: dict[int, str] = {}
    historical: list[int] = []
    for m in msgs:
        decoded = tahu.decode(m.payload)
        if m.kind == "DBIRTH":
            names.update({x["alias"]: x["name"] for x in decoded["metrics"] if "alias" in x})
        if m.kind != "DDATA":
            continue
        metrics = decoded["metrics"]
        windows = any(names.get(x["alias"], "").endswith("/mean") for x in metrics)
        if windows and all(x.get("isHistorical") for x in metrics):
            historical.append(metrics[0]["timestamp"])
    assert len(historical) >= 5
    # Windows follow each other by hops (0.5 s); an unchanged window is not sent (records schema 3)
    # but the subject's heartbeat bounds the gap: none longer than HEARTBEAT_WINDOWS hops.
    steps = {round((b - a) / 1000.0, 1) for a, b in itertools.pairwise(historical)}
    allowed = {round(0.5 * k, 1) for k in range(1, HEARTBEAT_WINDOWS + 1)}
    assert steps <= allowed, steps
    # Nothing left, nothing dropped, nothing set aside, no recovery lost any: 0 records lost.
    with Outbox(tmp_path / "state" / "outbox.db") as outbox:
        stats = outbox.stats()
    assert stats.queued == 0
    assert stats.dead_letters == 0
    assert stats.losses == ()
    assert all(sum(lane.dropped.values()) == 0 for lane in stats.lanes.values())
