"""``twin listen`` with a persistent session: restarted mid-stream, it reports only real gaps.

A real broker (mosquitto, TLS, client certificates); a publisher sends numbered records at QoS 1
while the twin is away.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from uplink_support import listener, require_mosquitto

from gateway.records import FeaturesWindow, SeqMeta, StreamWindow, encode, wrap
from gateway.twin.listen import Listener
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI, demo_pki
from gateway.uplink.commands import main as commands_main

pytestmark = pytest.mark.slow
GW = "gwk3j2x7q9m4t8vb"
EPOCH = 4242


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    require_mosquitto()
    return demo_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path: Path, pki: DemoPKI) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker", pki)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def publisher(broker: MosquittoBroker, pki: DemoPKI) -> Iterator[Any]:
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="publisher", protocol=paho.MQTTv5)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.load_cert_chain(pki.gateway.cert, pki.gateway.key)
    client.tls_set_context(ctx)
    client.connect(broker.host, broker.port)
    client.loop_start()
    yield client
    client.disconnect()
    client.loop_stop()


def _publish(client: Any, seqs: range) -> None:
    stream = StreamWindow("MDC_PULS_OXIM_SAT_O2", "%", "d" * 16, 10, features={"mean": 97.0})
    for seq in seqs:
        pack = encode(FeaturesWindow("s" * 16, "medical", float(seq), 10.0, (stream,), run=1))
        info = client.publish(f"edgetwin/v1/{GW}/features/{'s' * 16}", wrap(pack, SeqMeta(seq, EPOCH)), qos=1)
        info.wait_for_publish(10)


def _seqs(twin: Listener) -> set[int]:
    return {m.seq for m in twin.records() if m.seq is not None}


def test_a_listener_restarted_mid_stream_with_a_session_misses_nothing(
    broker: MosquittoBroker, pki: DemoPKI, publisher: Any
) -> None:
    session = {"client_id": "twin-ops-1", "session_expiry_s": 300}
    first = listener(broker, pki, **session)
    _publish(publisher, range(1, 21))
    assert first.wait_for(lambda t: t.records_received >= 20, 10)
    first.stop()
    _publish(publisher, range(21, 51))  # while the twin is away
    second = listener(broker, pki, **session)
    _publish(publisher, range(51, 61))
    assert second.wait_for(lambda t: t.records_received >= 40, 10)
    second.stop()
    assert _seqs(first) | _seqs(second) == set(range(1, 61))
    # QoS 1 is at least once: the broker sends again what the first listener received but had not
    # acknowledged when it stopped (on a loaded machine, its last few), and nothing else.
    again = _seqs(second) - set(range(21, 61))
    assert again <= _seqs(first), again
    assert again == set(range(21 - len(again), 21)), again
    (state,) = second.checker.gateways.values()
    assert (state.missing, state.duplicates, state.received) == (0, 0, 40 + len(again)), state.summary()

    # The same restart without a session: what was published meanwhile is lost to this twin.
    third = listener(broker, pki, client_id="twin-ops-2")
    _publish(publisher, range(61, 66))
    assert third.wait_for(lambda t: t.records_received >= 5, 10)
    third.stop()
    _publish(publisher, range(66, 76))
    fourth = listener(broker, pki, client_id="twin-ops-2")
    _publish(publisher, range(76, 81))
    assert fourth.wait_for(lambda t: t.records_received >= 5, 10)
    fourth.stop()
    assert not (_seqs(third) | _seqs(fourth)) & set(range(66, 76))


def test_the_command_asks_for_a_client_id_with_a_session(capsys: pytest.CaptureFixture[str]) -> None:
    code = commands_main(["twin", "listen", "--broker", "127.0.0.1:1", "--session-expiry", "60", "--no-tls"])
    assert code != 0
    assert "--session-expiry needs --client-id" in capsys.readouterr().err


def test_the_downlink_topics_beside_the_records_are_not_counted_corrupt(
    broker: MosquittoBroker, pki: DemoPKI, publisher: Any
) -> None:
    """A gateway with a downlink reports JSON and receives envelopes and chunks under the same prefix."""
    root = f"edgetwin/v1/{GW}"
    for topic, payload in (
        ("reported", b'{"revision": 3}'),
        ("desired", b"\x00signed envelope"),
        ("model", b"\x01signed manifest"),
        ("chunk/0123456789abcdef0123456789abcdef/0", b"\x02" * 64),
        ("csr", b"-----BEGIN CERTIFICATE REQUEST-----"),
    ):
        publisher.publish(f"{root}/{topic}", payload, qos=1, retain=True).wait_for_publish(10)
    twin = listener(broker, pki)
    try:
        _publish(publisher, range(1, 4))
        publisher.publish(f"{root}/features/{'s' * 16}", b"\xff not cbor", qos=1).wait_for_publish(10)
        assert twin.wait_for(lambda t: t.records_received >= 3 and t.corrupt >= 1, 10)
    finally:
        twin.stop()
    # The broken record is counted; the downlink's own messages are not records at all.
    assert twin.corrupt == 1
    assert _seqs(twin) == {1, 2, 3}
