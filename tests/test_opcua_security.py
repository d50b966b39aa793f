"""OPC UA security against a real asyncua server with generated certificates and a user list.

Untrusted server certificate rejected with a message naming the file; ``edgetwin opcua trust``;
every policy and mode asyncua offers; a wrong password; a server that does not trust us.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import free_port

from drivers.opcua import lean
from drivers.opcua.config import OpcUaConfig
from drivers.opcua.driver import factory
from drivers.opcua.pki import Pki
from drivers.opcua.plcsim import PlcSimProcess
from gateway.cli import main as edgetwin
from gateway.contracts import Alarm, Diagnostic, SourceInfo
from gateway.errors import AuthError, ConfigError
from gateway.sample import Sample, SampleBlock

INFO = SourceInfo("pump-3-plc", "plant-A/pump-3", "industrial")


class Recorder:
    def __init__(self) -> None:
        self.samples: list[Sample] = []

    def put(self, sample: Sample) -> None:
        self.samples.append(sample)

    def put_block(self, block: SampleBlock) -> None:
        raise AssertionError("unexpected block")

    def alarm(self, alarm: Alarm) -> None:
        pass

    def diagnostic(self, diagnostic: Diagnostic) -> None:
        pass


def secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n", encoding="utf-8")
    os.chmod(path, 0o600)
    return path


@pytest.fixture(scope="module")
def secure_plc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PlcSimProcess, Path]]:
    tmp = tmp_path_factory.mktemp("opcua-sec")
    (tmp / "users").write_text("gateway:correct horse\n", encoding="utf-8")
    sim = PlcSimProcess(
        free_port(),
        "--pki",
        str(tmp / "server-pki"),
        "--policies",
        "Basic256Sha256,Aes128_Sha256_RsaOaep,Aes256_Sha256_RsaPss",
        "--users",
        str(tmp / "users"),
    )
    sim.start()
    yield sim, tmp
    sim.stop()


async def attempt(
    endpoint: str, pki: Path, password_file: Path, **over: Any
) -> tuple[int, BaseException | None]:
    """Run the driver until it delivers samples (-> count) or fails (-> the error)."""
    cfg: dict[str, Any] = {
        "endpoint": endpoint,
        "security_policy": "Basic256Sha256",
        "security_mode": "SignAndEncrypt",
        "pki_dir": str(pki),
        "username": "gateway",
        "password_file": str(password_file),
        "publishing_interval_ms": 100.0,
        "nodes": [{"browse_path": "2:Pump1/2:Motor/2:Current"}],
    }
    cfg.update(over)
    driver = factory(INFO, OpcUaConfig.model_validate(cfg))
    sink = Recorder()
    task = asyncio.create_task(driver.run(sink, started=lambda: None), name="test:opcua")
    # Every case ends early (samples or an error); the bound is for a loaded machine, where key
    # generation and the handshakes of the Python stacks on both ends take long.
    deadline = time.monotonic() + 60
    while not task.done() and len(sink.samples) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if task.done():
        return len(sink.samples), task.exception()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return len(sink.samples), None


def test_untrusted_server_then_trust_then_every_policy_and_mode(
    secure_plc: tuple[PlcSimProcess, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    sim, tmp = secure_plc
    pki = tmp / "gateway-pki"
    password = secret(tmp / "pw", "correct horse")

    count, error = asyncio.run(attempt(sim.endpoint, pki, password))
    assert isinstance(error, AuthError)
    assert count == 0
    rejected = Pki(pki).rejected()
    assert len(rejected) == 1
    message = str(error)
    assert str(rejected[0]) in message
    assert "edgetwin opcua trust" in message
    assert "untrusted" in message
    assert (
        pki / "own" / "cert.der"
    ).is_file()  # the application instance certificate, created on first start
    assert (pki / "own" / "private" / "key.pem").stat().st_mode & 0o777 == 0o600

    assert edgetwin(["opcua", "trust", "--pki-dir", str(pki), "--list"]) == 0
    assert rejected[0].name in capsys.readouterr().out
    thumb = rejected[0].name.partition("[")[2][:12]
    assert edgetwin(["opcua", "trust", "--pki-dir", str(pki), thumb]) == 0
    assert not Pki(pki).rejected()
    assert len(list((pki / "trusted").iterdir())) == 1

    for policy in ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"):
        for mode in ("Sign", "SignAndEncrypt"):
            count, error = asyncio.run(
                attempt(sim.endpoint, pki, password, security_policy=policy, security_mode=mode)
            )
            assert error is None, (policy, mode, error)
            assert count >= 3, (policy, mode)
    # They ran on the asyncua package served without its server import (drivers/opcua/lean.py),
    # with the client's and the crypto module's imports of cryptography deferred to first use.
    assert lean.served()
    assert lean.deferred() == sorted(lean.DEFERRED)


def test_wrong_password_is_refused_with_a_clear_auth_error(secure_plc: tuple[PlcSimProcess, Path]) -> None:
    sim, tmp = secure_plc
    pki = tmp / "gateway-pki-2"
    Pki(pki).ensure_folders()
    server_cert = tmp / "server-pki" / "own" / "cert.der"
    Pki(pki).trust(server_cert)
    count, error = asyncio.run(attempt(sim.endpoint, pki, secret(tmp / "bad", "battery staple")))
    assert isinstance(error, AuthError)
    assert count == 0
    assert "refused user 'gateway'" in str(error)
    assert "bad_useraccessdenied" in str(error)
    assert str(tmp / "bad") in str(error)


def test_a_server_offering_no_such_policy_is_a_config_error(secure_plc: tuple[PlcSimProcess, Path]) -> None:
    sim, tmp = secure_plc

    count, error = asyncio.run(
        attempt(
            sim.endpoint,
            tmp / "gateway-pki-3",
            secret(tmp / "pw3", "x"),
            security_policy="None",
            security_mode="None",
        )
    )
    assert isinstance(error, ConfigError)
    assert count == 0
    assert "offers no None/None endpoint" in str(error)
    assert "Basic256Sha256/SignAndEncrypt" in str(error)


def test_server_that_does_not_trust_the_gateway(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("gateway:pw\n", encoding="utf-8")
    (tmp_path / "trusted-clients").mkdir()
    sim = PlcSimProcess(
        free_port(),
        "--pki",
        str(tmp_path / "server-pki"),
        "--policies",
        "Basic256Sha256",
        "--users",
        str(tmp_path / "users"),
        "--trusted-clients",
        str(tmp_path / "trusted-clients"),
    )
    sim.start()
    try:
        pki = tmp_path / "gateway-pki"
        Pki(pki).trust(tmp_path / "server-pki" / "own" / "cert.der")
        count, error = asyncio.run(attempt(sim.endpoint, pki, secret(tmp_path / "pw", "pw")))
        assert isinstance(error, AuthError)
        assert count == 0
        assert "refused the gateway's certificate" in str(error)
        assert str(pki / "own" / "cert.der") in str(error)
    finally:
        sim.stop()
