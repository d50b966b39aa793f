"""The test and demo broker: mosquitto on a loopback port it picks, started again on the same port."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from uplink_support import mosquitto_pki

from gateway.errors import TransientError
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


def _listening() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_a_picked_port_taken_before_mosquitto_binds_it_is_picked_again(tmp_path: Path, pki: DemoPKI) -> None:
    with _listening() as other:
        taken = other.getsockname()[1]
        broker = MosquittoBroker(tmp_path / "b", pki)
        broker.port = taken  # as if another process bound the picked port between pick and start
        broker.start()
        try:
            assert broker.pid is not None
            assert broker.port != taken
            with socket.create_connection((broker.host, broker.port), timeout=5):
                pass
            broker.stop()
            broker.start()  # a restart keeps its port: clients reconnect to where it was
            assert broker.port != taken
        finally:
            broker.stop()


def test_a_port_the_caller_named_is_kept_and_a_taken_one_is_an_error(tmp_path: Path, pki: DemoPKI) -> None:
    with _listening() as other:
        taken = other.getsockname()[1]
        broker = MosquittoBroker(tmp_path / "b", pki, port=taken)
        with pytest.raises(TransientError, match=f"127.0.0.1:{taken}: exited"):
            broker.start()
        assert broker.port == taken
