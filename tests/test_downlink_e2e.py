"""The downlink end to end: a real ``edgetwin run`` process, the real TLS mosquitto, the twin's CLI.

A signed config revision published as the gateway's desired state is verified, checked, written
in place, and the gateway restarts onto it (same PID); it is kept only when the gateway comes back
READY with its units healthy and the broker reached, else the old file is restored.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from peers import free_port
from uplink_support import mosquitto_pki, running_broker

from gateway.downlink import audit
from gateway.downlink.signing import key_id, public_hex, sign, write_private_key
from gateway.downlink.twin_link import Broker, collect_reported, publish_desired
from gateway.records.topics import DEFAULT_PREFIX
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoPKI
from gateway.uplink.commands import _gateway_pseudonym

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 8.0
# A revision that is meant to fail needs no margin for a slow start: it carries a shorter deadline.
SHORT_DEADLINE_S = 4.0


def _source(name: str, profile: str = "patient", device: str = "A4:C1:38:00:00:07") -> str:
    kind = "industrial" if profile == "pump" else "medical"
    return f"""
[[sources]]
name = "{name}"
driver = "sim"
subject = "{name}-subject"
kind = "{kind}"
profile = "{profile}"
device = "{device}"
"""


BROKEN_SOURCE = """
[[sources]]
name = "bed7-sim"
driver = "serial"
subject = "bed7-sim-subject"
port = "/dev/edgetwin-test-no-such-port"
protocol = "nonin2"
"""


@dataclass
class Site:
    tmp: Path
    pki: DemoPKI
    broker: MosquittoBroker
    config: Path
    key: Ed25519PrivateKey
    gateway: str
    proc: subprocess.Popen[str] | None = None

    def text(self, sources: str, *, port: int | None = None, deadline_s: float = DEADLINE_S) -> str:
        b = self.broker
        return f"""[gateway]
name = "ward7-hub"
state_dir = "{self.tmp / "state"}"
[pipeline]
window_s = 2.0
hop_s = 1.0
grace_s = 0.3
sensor_lost_s = 2.0
[runtime]
drain_deadline_s = 3.0
start_timeout_s = 10.0
[downlink]
trust_file = "{self.tmp / "trust.json"}"
apply_deadline_s = {deadline_s}
settle_s = 1.0
[uplink]
kind = "mqtt"
[uplink.mqtt]
host = "{b.host}"
port = {port or b.port}
ca_file = "{self.pki.ca_file}"
cert_file = "{self.pki.gateway.cert}"
key_file = "{self.pki.gateway.key}"
reconnect_min_s = 0.2
reconnect_max_s = 1.0
connect_timeout_s = 2.0
{sources}"""

    @property
    def twin(self) -> Broker:
        p = self.pki
        return Broker(self.broker.host, self.broker.port, p.ca_file, p.twin.cert, p.twin.key)

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("NOTIFY_SOCKET", None)
        env.pop("RUNTIME_DIRECTORY", None)
        with (self.tmp / "gateway.log").open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
            )

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def envelope(self, version: int, sources: str, **kw: Any) -> bytes:
        return sign(
            self.text(sources, **kw).encode(),
            keys=[self.key],
            gateway=self.gateway,
            version=version,
            expires=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        )

    def publish(self, envelope: bytes) -> None:
        publish_desired(self.twin, f"{DEFAULT_PREFIX}/{self.gateway}/desired", envelope)

    def reported(
        self, until: Callable[[dict[str, Any]], bool], what: str, timeout: float = 45.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        rep: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.proc is not None
            assert self.proc.poll() is None, (self.tmp / "gateway.log").read_text()[-3000:]
            rep = collect_reported(self.twin, DEFAULT_PREFIX, [self.gateway], 1.0).get(self.gateway, {})
            if rep and until(rep):
                return rep
            time.sleep(0.2)
        raise AssertionError(
            f"not {what} within {timeout} s: {rep}\n{(self.tmp / 'gateway.log').read_text()[-3000:]}"
        )

    def events(self) -> list[dict[str, Any]]:
        path = self.tmp / "state" / "downlink" / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def site(tmp_path: Path, pki: DemoPKI) -> Iterator[Site]:
    for broker in running_broker(tmp_path, pki):
        key = Ed25519PrivateKey.generate()
        write_private_key(tmp_path / "twin.key", key)
        pub = key.public_key()
        (tmp_path / "trust.json").write_text(json.dumps({"keys": {key_id(pub): public_hex(pub)}}))
        config = tmp_path / "edgetwin.toml"
        s = Site(tmp_path, pki, broker, config, key, "")
        config.write_text(s.text(_source("bed7-sim")))
        s.gateway = _gateway_pseudonym(config)
        try:
            yield s
        finally:
            s.stop()


def _running(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda rep: rep.get("units", {}).get(name) == "running"


@pytest.mark.campaign
def test_a_revision_applied_end_to_end_with_the_twin_cli(site: Site) -> None:
    site.start()
    assert site.proc is not None
    pid = site.proc.pid
    before = site.reported(lambda r: r["phase"] == "running" and _running("source:bed7-sim")(r), "running")
    assert before["applied"] is None
    new = site.tmp / "new.toml"
    new.write_text(site.text(_source("bed7-sim") + _source("pump3-sim", "pump", "SN-PLC-1")))
    envelope = site.tmp / "v1.envelope"
    twin = [sys.executable, "-m", "gateway.cli", "twin"]
    subprocess.run(
        [
            *twin,
            "sign-config",
            "--config",
            str(new),
            "--key",
            str(site.tmp / "twin.key"),
            "--version",
            "1",
            "--gateway",
            site.gateway,
            "--out",
            str(envelope),
        ],
        check=True,
        capture_output=True,
    )
    broker = ["--broker", f"{site.broker.host}:{site.broker.port}", "--ca", str(site.pki.ca_file)]
    broker += ["--cert", str(site.pki.twin.cert), "--key", str(site.pki.twin.key)]
    t0 = time.monotonic()
    subprocess.run(
        [*twin, "publish-config", "--gateway", site.gateway, "--envelope", str(envelope), *broker],
        check=True,
        capture_output=True,
    )
    rep = site.reported(lambda r: (r.get("applied") or {}).get("version") == 1, "applied")
    took = time.monotonic() - t0
    assert rep["phase"] == "running"
    assert rep["units"]["source:pump3-sim"] == "running"
    assert site.config.read_text() == new.read_text()
    assert site.proc.pid == pid  # restarted in place
    assert site.proc.poll() is None
    steps = [(e["event"], e.get("version")) for e in site.events()]
    assert steps == [("received", None), ("verified", 1), ("applying", 1), ("applied", 1)]
    head = audit.verify(site.tmp / "state" / "downlink" / "audit.jsonl")
    assert rep["audit"] == {"count": 4, "head": head.hash}
    status = subprocess.run(
        [*twin, "rollout-status", "--gateway", site.gateway, *broker],
        capture_output=True,
        text=True,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert f"{site.gateway:<18} running" in status.stdout
    assert head.hash[:12] in status.stdout
    print(f"publish -> applied: {took:.1f} s")


def test_a_revision_that_breaks_a_source_is_rolled_back(site: Site) -> None:
    site.start()
    site.reported(_running("source:bed7-sim"), "running")
    original = site.config.read_bytes()
    site.publish(site.envelope(1, BROKEN_SOURCE, deadline_s=SHORT_DEADLINE_S))
    rep = site.reported(
        lambda r: r.get("last_rollback") is not None and r["phase"] == "running", "rolled back"
    )
    assert rep["last_rollback"]["version"] == 1
    assert "source:bed7-sim" in rep["last_rollback"]["reason"]
    assert rep["refused"][-1]["reason"] == "rolled-back"
    assert rep["applied"] is None
    assert site.config.read_bytes() == original
    site.reported(_running("source:bed7-sim"), "the old source running again")
    steps = [e["event"] for e in site.events()]
    assert steps == ["received", "verified", "applying", "rolled-back"]
    # The retained revision comes again on every connection: it is not applied a second time.
    assert rep["accepted"] == 1


@pytest.mark.campaign
def test_an_uplink_that_cannot_reach_the_broker_is_rolled_back(site: Site) -> None:
    site.start()
    site.reported(_running("source:bed7-sim"), "running")
    original = site.config.read_bytes()
    site.publish(site.envelope(1, _source("bed7-sim"), port=free_port(), deadline_s=SHORT_DEADLINE_S))
    rep = site.reported(
        lambda r: r.get("last_rollback") is not None and r["phase"] == "running", "rolled back"
    )
    assert "uplink not connected" in rep["last_rollback"]["reason"]
    assert site.config.read_bytes() == original  # and it reported this over the old settings


def test_an_offline_gateway_applies_only_the_newest_of_three(site: Site) -> None:
    site.start()
    site.reported(_running("source:bed7-sim"), "running")
    site.stop()
    for version in (1, 2, 3):
        extra = _source(f"bed{version + 10}-sim", device=f"A4:C1:38:00:00:{version + 10}")
        site.publish(site.envelope(version, _source("bed7-sim") + extra))
    site.start()
    rep = site.reported(lambda r: (r.get("applied") or {}).get("version") == 3, "v3 applied")
    assert rep["units"]["source:bed13-sim"] == "running"
    assert "source:bed11-sim" not in rep["units"]
    assert [(e["event"], e.get("version")) for e in site.events()] == [
        ("received", None),
        ("verified", 3),
        ("applying", 3),
        ("applied", 3),
    ]
