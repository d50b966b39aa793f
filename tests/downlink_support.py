"""Shared pieces of the downlink tests and benchmark: a site with a broker, a gateway process, a twin."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from peers import stop_process
from uplink_support import running_broker

from gateway.anonymize import Anonymizer, Pseudonymizer, load_or_create_key
from gateway.downlink.signing import key_id, public_hex, sign, write_private_key
from gateway.downlink.twin_link import Broker, collect_reported, publish_desired
from gateway.records.topics import DEFAULT_PREFIX
from gateway.twin.listen import Listener
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoCA, DemoPKI
from gateway.uplink.commands import _gateway_pseudonym

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 20.0  # a good revision passes as soon as it is healthy: a margin for a loaded machine
# A revision that is meant to fail needs no margin for a slow start: it carries a shorter deadline.
SHORT_DEADLINE_S = 4.0


def source(name: str, profile: str = "patient", device: str = "A4:C1:38:00:00:07") -> str:
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


# The serial number in the by-id path must stay local: never in the retained reported state.
BROKEN_SERIAL = "SN-EDGETWIN-TEST"
BROKEN_SOURCE = """
[[sources]]
name = "bed7-sim"
driver = "serial"
subject = "bed7-sim-subject"
port = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_SN-EDGETWIN-TEST-if00-port0"
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
    env: dict[str, str] = field(default_factory=dict)  # more environment for the gateway process

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
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
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
        stop_process(self.proc)
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
        self, until: Callable[[dict[str, Any]], bool], what: str, timeout: float = 90.0
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

    def retained(self) -> dict[str, Any]:
        """The reported state the broker holds now: the last process's, whether it still runs or not."""
        return collect_reported(self.twin, DEFAULT_PREFIX, [self.gateway], 1.0).get(self.gateway, {})

    def unit(self, name: str) -> str:
        """A source's unit as the reported state names it: by its pseudonym under the site's key."""
        return source_label(self.config, name)

    def events(self) -> list[dict[str, Any]]:
        path = self.tmp / "state" / "downlink" / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


def new_site(tmp: Path, pki: DemoPKI, broker: MosquittoBroker) -> Site:
    """A site: a twin signing key trusted by a gateway config with one simulated patient source."""
    key = Ed25519PrivateKey.generate()
    write_private_key(tmp / "twin.key", key)
    pub = key.public_key()
    (tmp / "trust.json").write_text(json.dumps({"keys": {key_id(pub): public_hex(pub)}}))
    config = tmp / "edgetwin.toml"
    site = Site(tmp, pki, broker, config, key, "")
    config.write_text(site.text(source("bed7-sim")))
    site.gateway = _gateway_pseudonym(config)
    return site


def running_site(tmp: Path, pki: DemoPKI, sources: str | None = None) -> Iterator[Site]:
    """A site with its broker (``sources`` instead of the one patient), stopped after: a yield fixture's body."""
    for broker in running_broker(tmp, pki):
        s = new_site(tmp, pki, broker)
        if sources is not None:
            s.config.write_text(s.text(sources))
        try:
            yield s
        finally:
            s.stop()


def source_label(config_path: Path, name: str) -> str:
    """``source~<pseudonym>`` of source ``name`` of the gateway a config file describes (its site key)."""
    from drivers import REGISTRY  # noqa: PLC0415
    from gateway.config import load  # noqa: PLC0415

    key = load_or_create_key(load(config_path, REGISTRY).core.site_key_path)
    return Anonymizer(Pseudonymizer(key), time_mode="relative").source_label(name)


def running(name: str) -> Callable[[dict[str, Any]], bool]:
    """A predicate on the reported state: unit ``name`` runs."""
    return lambda rep: rep.get("units", {}).get(name) == "running"


def anew(before: dict[str, Any], until: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
    """``until``, on a reported state of a process other than the one that reported ``before``.

    The reported state is retained: right after a restart the broker still hands out the last
    process's, which says its units ran while the new process may still be importing (seconds on
    a loaded machine), not yet counted as a run.
    """
    started = (before.get("process") or {}).get("started_at")
    return lambda rep: (rep.get("process") or {}).get("started_at") != started and until(rep)


def applied(version: int) -> Callable[[dict[str, Any]], bool]:
    """A predicate on the reported state: ``version`` is applied."""
    return lambda rep: (rep.get("applied") or {}).get("version") == version


def renewal_pki(
    directory: Path, *, valid_until: dt.datetime, valid_from: dt.datetime | None = None
) -> tuple[DemoCA, Path, DemoPKI]:
    """A CA with its key on disk (0600, for ``twin renew``) and a PKI whose gateway certificate ends at ``valid_until``."""
    ca = DemoCA(directory)
    ca_key = directory / "ca.key"
    ca_key.write_bytes(
        ca.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ca_key.chmod(0o600)
    pki = DemoPKI(
        ca.ca_file,
        ca.issue("broker", "edgetwin demo broker", server=True, hosts=("127.0.0.1", "localhost")),
        ca.issue("gateway", "gateway", valid_from=valid_from, valid_until=valid_until),
        ca.issue("twin", "edgetwin-twin"),
    )
    return ca, ca_key, pki


def renew_with_the_twin_cli(site: Site, ca_file: Path, ca_key: Path) -> dict[str, Any]:
    """``edgetwin twin renew`` signs the pending CSR; the reported state once the new pair connected."""
    b, pki = site.broker, site.pki
    cli = [sys.executable, "-m", "gateway.cli", "twin", "renew", "--gateway", site.gateway]
    cli += ["--ca-cert", str(ca_file), "--ca-key", str(ca_key), "--days", "90"]
    cli += ["--broker", f"{b.host}:{b.port}", "--ca", str(ca_file)]
    cli += ["--cert", str(pki.twin.cert), "--key", str(pki.twin.key)]
    done = subprocess.run(cli, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    rep = site.reported(
        lambda r: (
            (r.get("certificate") or {}).get("days_left", 0) > 80 and r["certificate"]["renewal"] is None
        ),
        "renewed and connected",
    )
    assert [e["event"] for e in site.events()] == ["csr-made", "received", "cert-installed", "cert-connected"]
    return rep


def assert_no_record_lost(site: Site, twin: Listener) -> None:
    """Records flow again, and after an orderly stop the twin's sequence check shows none missing."""
    wanted = twin.records_received + 5
    assert twin.wait_for(lambda t: t.records_received > wanted, 20), "records after the switch"
    site.stop()  # an orderly stop drains what is queued
    time.sleep(0.5)
    (state,) = twin.checker.gateways.values()
    assert state.missing == 0, state.summary()


@contextlib.contextmanager
def broker_running(tmp: Path, pki: DemoPKI) -> Iterator[MosquittoBroker]:
    """A started mosquitto, stopped when the block ends, whether its test passed or failed."""
    broker = MosquittoBroker(tmp / "broker", pki)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
