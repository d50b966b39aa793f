"""``edgetwin check``: broken configurations and environments, each with its exact output and exit code.

Offline cases need no peer; online cases talk to a real mosquitto with TLS and client
certificates on loopback.  The output compared is ``--quiet`` (failures, warnings, the summary),
with the test's temporary directory written as ``<tmp>`` and the broker's port as ``<port>``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers import free_port
from test_outbox_faults import small_tmpfs
from uplink_support import require_mosquitto

from drivers import REGISTRY
from drivers.ble.testbed.harness import Testbed
from drivers.opcua.plcsim import PlcSimProcess
from drivers.serial.sim import PtyOximeter, VitalsModel
from gateway.cli import main
from gateway.config import load
from gateway.observe.check import Level, run_check
from gateway.runtime import build_problems, config_held_names
from gateway.timebase import clock_synchronised
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import DemoCA, DemoPKI, demo_pki

SIM = """
[[sources]]
name = "bed1"
driver = "sim"
subject = "bed-1"
profile = "patient"
device = "A4:C1:38:00:00:01"
"""


@dataclass
class Env:
    tmp: Path
    pki: DemoPKI
    broker: MosquittoBroker

    def mqtt(self, **over: object) -> str:
        keys: dict[str, object] = {
            "host": self.broker.host,
            "port": self.broker.port,
            "ca_file": str(self.pki.ca_file),
            "cert_file": str(self.pki.gateway.cert),
            "key_file": str(self.pki.gateway.key),
            "connect_timeout_s": 3.0,
        }
        keys.update(over)
        body = "\n".join(f"{k} = {_toml(v)}" for k, v in keys.items() if v is not None)
        return f'[uplink]\nkind = "mqtt"\n[uplink.mqtt]\n{body}\n'

    def config(self, text: str, *, state: bool = True) -> Path:
        head = f'[gateway]\nstate_dir = "{self.tmp / "state"}"\n' if state else ""
        path = self.tmp / "edgetwin.toml"
        path.write_text(head + text)
        return path

    def ca2(self) -> DemoCA:
        return DemoCA(self.tmp / "other-ca", "unrelated CA")


def _toml(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    require_mosquitto()
    return demo_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: DemoPKI) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path_factory.mktemp("broker"), pki)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def env(tmp_path: Path, pki: DemoPKI, broker: MosquittoBroker) -> Env:
    return Env(tmp_path, pki, broker)


def _issue(e: Env, stem: str, **kw: object) -> tuple[Path, Path]:
    """A client certificate from the demo CA (re-created in the test's directory) with extra options."""
    ca = DemoCA(e.tmp / "ca", "edgetwin demo CA")
    issued = ca.issue(stem, "gateway", **kw)  # type: ignore[arg-type]
    return ca.ca_file, issued.cert


def _write_key_0644(e: Env) -> Path:
    key = e.tmp / "loose.key"
    key.write_bytes(e.pki.gateway.key.read_bytes())
    key.chmod(0o644)
    return key


NOW = dt.datetime.now(dt.UTC)
DAYS = (NOW + dt.timedelta(days=90)).strftime("%Y-%m-%d")


# Each case: (id, build config -> path, online?, expected lines, exit code).
Case = tuple[str, Callable[[Env], Path], bool, list[str], int]


def _expired(e: Env) -> Path:
    ca, cert = _issue(
        e, "old", valid_from=NOW - dt.timedelta(days=60), valid_until=NOW - dt.timedelta(days=1)
    )
    # The key of that certificate sits beside it; the CA is the one that issued it.
    return e.config(
        e.mqtt(ca_file=str(ca), cert_file=str(cert), key_file=str(cert.with_suffix(".key"))) + SIM
    )


def _expiring(e: Env) -> Path:
    ca, cert = _issue(e, "soon", valid_until=NOW + dt.timedelta(days=10, hours=1))
    return e.config(
        e.mqtt(ca_file=str(ca), cert_file=str(cert), key_file=str(cert.with_suffix(".key"))) + SIM
    )


def _future(e: Env) -> Path:
    ca, cert = _issue(
        e, "future", valid_from=NOW + dt.timedelta(days=2), valid_until=NOW + dt.timedelta(days=90)
    )
    return e.config(
        e.mqtt(ca_file=str(ca), cert_file=str(cert), key_file=str(cert.with_suffix(".key"))) + SIM
    )


def _unchained(e: Env) -> Path:
    other = e.ca2().issue("stray", "gateway")
    return e.config(e.mqtt(cert_file=str(other.cert), key_file=str(other.key)) + SIM)


def _four_at_once(e: Env) -> Path:
    ca, cert = _issue(
        e, "old", valid_from=NOW - dt.timedelta(days=60), valid_until=NOW - dt.timedelta(days=1)
    )
    loose = _write_key_0644(e)  # the gateway's key: mode 0644 and not the key of ``cert``
    return e.config(e.mqtt(port=70000, ca_file=str(ca), cert_file=str(cert), key_file=str(loose)) + SIM)


def _garbage_key(e: Env) -> Path:
    key = e.tmp / "garbage.key"
    key.write_text("not a key\n")
    key.chmod(0o600)
    return e.config(e.mqtt(key_file=str(key)) + SIM)


def _loose_site_key(e: Env) -> Path:
    key = e.tmp / "site.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o640)
    return e.config(f'[privacy]\nsite_key_file = "{key}"\n' + SIM)


def _missing_password(e: Env) -> Path:
    return e.config(e.mqtt(username="gw", password_file=str(e.tmp / "pw")) + SIM)


def _not_pem_ca(e: Env) -> Path:
    bad = e.tmp / "ca.pem"
    bad.write_text("-----BEGIN NOTHING-----\n")
    return e.config(e.mqtt(ca_file=str(bad)) + SIM)


def _mismatch(e: Env) -> Path:
    return e.config(e.mqtt(key_file=str(e.pki.twin.key)) + SIM)


def _wrong_ca(e: Env) -> Path:
    # An unrelated CA bundle: the client certificate does not chain to it, and the broker's
    # certificate cannot be verified with it.
    return e.config(e.mqtt(ca_file=str(e.ca2().ca_file)) + SIM)


def _fmt(e: Env, lines: list[str]) -> list[str]:
    return [line.replace("<tmp>", str(e.tmp)).replace("<port>", str(e.broker.port)) for line in lines]


CFG = "<tmp>/edgetwin.toml"
SUMMARY_FAIL = "config <tmp>/edgetwin.toml: {f} failure(s), {w} warning(s): fix them and run 'edgetwin check --config <tmp>/edgetwin.toml' again"
OK = "config <tmp>/edgetwin.toml: ok (1 source(s): bed1 (sim, medical))"
RENEW = "      fix: renew it (edgetwin provision key, have the CSR signed, edgetwin provision import)"
PAIR = "      fix: configure the key the certificate was issued for (edgetwin provision import checks pairs)"
BUILD_FIX = "      fix: change the setting named; see the driver's README"

CASES: list[Case] = [
    (
        "missing-file",
        lambda e: e.tmp / "nope.toml",
        False,
        [
            "fail  config: no file at <tmp>/nope.toml",
            "      fix: give the config's path",
            "config <tmp>/nope.toml: 1 failure(s), 0 warning(s): fix them and run 'edgetwin check --config <tmp>/nope.toml' again",
        ],
        78,
    ),
    (
        "toml-syntax",
        lambda e: e.config("[pipeline\n"),
        False,
        [
            "fail  config: not valid TOML: Expected ']' at the end of a table declaration (at line 3, column 10)",
            "      fix: fix the syntax",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "unknown-key",
        lambda e: e.config("[pipeline]\nwindow = 30.0\n" + SIM),
        False,
        [
            "fail  config: pipeline.window: expected one of the known keys (grace_s, hop_s, sensor_lost_s, "
            "sensor_restore_s, window_s), found unknown key 'window'",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "wrong-type",
        lambda e: e.config("[outbox]\nmax_mb = 'lots'\n" + SIM),
        False,
        ["fail  config: outbox.max_mb: expected a number, found 'lots'", SUMMARY_FAIL.format(f=1, w=0)],
        78,
    ),
    (
        "out-of-range-port",
        lambda e: e.config(e.mqtt(port=70000) + SIM),
        False,
        [
            "fail  config: uplink.mqtt.port: expected a number <= 65535, found 70000",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "inline-secret",
        lambda e: e.config(e.mqtt(username="gw", password="hunter2") + SIM),
        False,
        [
            "fail  config: uplink.mqtt.password: expected a file reference (password_file = "
            '"/etc/edgetwin/secrets/...", mode 0600); secrets are never written inline, found an inline secret',
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "hop-longer-than-window",
        lambda e: e.config("[pipeline]\nwindow_s = 10.0\nhop_s = 20.0\n" + SIM),
        False,
        [
            "fail  config: pipeline.hop_s: expected at most window_s (10), or samples between windows are never "
            "used, found 20.0",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "unknown-driver",
        lambda e: e.config(SIM.replace('driver = "sim"', 'driver = "modbus"')),
        False,
        [
            "fail  config: sources[0].driver: expected one of the drivers (ble, mcu, opcua, serial, sim), found 'modbus'",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "duplicate-source",
        lambda e: e.config(SIM + SIM),
        False,
        [
            "fail  config: sources[1].name: expected a name not used by another source (sources[0] has it), found 'bed1'",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "key-mode-0644",
        lambda e: e.config(e.mqtt(key_file=str(_write_key_0644(e))) + SIM),
        False,
        [
            "fail  config: uplink.mqtt.key_file: expected a file only its owner can read (run 'chmod 600 "
            "<tmp>/loose.key'), found mode 0644",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "key-missing",
        lambda e: e.config(e.mqtt(key_file=str(e.tmp / "none.key")) + SIM),
        False,
        [
            "fail  config: uplink.mqtt.key_file: expected an existing secret file (create it with mode 0600), "
            "found no file at <tmp>/none.key",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "password-file-missing",
        _missing_password,
        False,
        [
            "fail  config: uplink.mqtt.password_file: expected an existing secret file (create it with mode 0600), "
            "found no file at <tmp>/pw",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "site-key-mode",
        _loose_site_key,
        False,
        [
            "fail  config: privacy.site_key_file: expected a file only its owner can read (run 'chmod 600 "
            "<tmp>/site.key'), found mode 0640",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "cert-missing",
        lambda e: e.config(e.mqtt(cert_file=str(e.tmp / "none.crt")) + SIM),
        False,
        [
            "fail  certificates: uplink.mqtt.cert_file: no file at <tmp>/none.crt",
            "      fix: put the gateway's certificate there (edgetwin provision import), or correct the path",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "ca-missing",
        lambda e: e.config(e.mqtt(ca_file=str(e.tmp / "none-ca.crt")) + SIM),
        False,
        [
            "fail  certificates: uplink.mqtt.ca_file: no file at <tmp>/none-ca.crt",
            "      fix: copy the CA that issued the broker's certificate there (PEM), or correct the path",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "ca-not-pem",
        _not_pem_ca,
        False,
        [
            "fail  certificates: uplink.mqtt.ca_file: <tmp>/ca.pem holds no PEM certificate",
            "      fix: give the CA bundle in PEM",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "cert-expired",
        _expired,
        False,
        [
            f"fail  certificates: uplink.mqtt.cert_file: client certificate <tmp>/ca/old.crt (CN=gateway) expired on "
            f"{(NOW - dt.timedelta(days=1)):%Y-%m-%d}",
            RENEW,
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "cert-not-yet-valid",
        _future,
        False,
        [
            f"fail  certificates: uplink.mqtt.cert_file: client certificate <tmp>/ca/future.crt (CN=gateway) is not "
            f"valid before {(NOW + dt.timedelta(days=2)):%Y-%m-%d %H:%M} UTC",
            "      fix: check the clock (timedatectl) or wait until the certificate is valid",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "cert-expiring-soon",
        _expiring,
        False,
        [
            f"warn  certificates: uplink.mqtt.cert_file: client certificate <tmp>/ca/soon.crt (CN=gateway) expires on "
            f"{(NOW + dt.timedelta(days=10, hours=1)):%Y-%m-%d}, in 10 day(s)",
            "      fix: renew it before then",
            "config <tmp>/edgetwin.toml: ok (1 source(s): bed1 (sim, medical)), 1 warning(s)",
        ],
        0,
    ),
    (
        "key-not-of-cert",
        _mismatch,
        False,
        [
            "fail  certificates: uplink.mqtt.key_file: {twin_key} is not the key of the certificate {gw_cert}",
            PAIR,
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "key-not-pem",
        _garbage_key,
        False,
        [
            "fail  certificates: uplink.mqtt.key_file: <tmp>/garbage.key is not an unencrypted PEM private key",
            "      fix: give the key in PEM (PKCS#8 or traditional) without a passphrase",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "cert-not-chaining",
        _unchained,
        False,
        [
            "warn  certificates: client certificate <tmp>/other-ca/stray.crt (issued by CN=unrelated CA) does not "
            "chain to {demo_ca}",
            "      fix: fine when the broker trusts another CA for clients; otherwise have the certificate issued by "
            "the fleet CA",
            OK + ", 1 warning(s)",
        ],
        0,
    ),
    (
        "cert-without-key",
        lambda e: e.config(e.mqtt(key_file=None) + SIM),
        False,
        [
            "fail  config: uplink.mqtt: expected a valid value, found a table (cert_file and key_file go together: "
            "give both (mTLS) or neither)",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        78,
    ),
    (
        "four-at-once",
        _four_at_once,
        False,
        [
            "fail  config: uplink.mqtt.port: expected a number <= 65535, found 70000",
            "fail  config: uplink.mqtt.key_file: expected a file only its owner can read (run 'chmod 600 "
            "<tmp>/loose.key'), found mode 0644",
            f"fail  certificates: uplink.mqtt.cert_file: client certificate <tmp>/ca/old.crt (CN=gateway) expired on "
            f"{(NOW - dt.timedelta(days=1)):%Y-%m-%d}",
            RENEW,
            "fail  certificates: uplink.mqtt.key_file: <tmp>/loose.key is not the key of the certificate "
            "<tmp>/ca/old.crt",
            PAIR,
            SUMMARY_FAIL.format(f=4, w=0),
        ],
        78,
    ),
    (
        "model-and-driver-refuse",
        lambda e: e.config("[models]\nuse = [{ name = 'nope' }]\n" + SIM.replace('"patient"', '"pump"')),
        False,
        [
            "fail  build: {build0}",
            BUILD_FIX,
            "fail  build: {build1}",
            BUILD_FIX,
            SUMMARY_FAIL.format(f=2, w=0),
        ],
        78,
    ),
    # --- online ---------------------------------------------------------------------------------
    (
        "online-healthy",
        lambda e: e.config(e.mqtt() + SIM),
        True,
        [OK],
        0,
    ),
    (
        "online-dns",
        lambda e: e.config(e.mqtt(host="no-such-host.invalid") + SIM),
        True,
        [
            "fail  dns: cannot resolve no-such-host.invalid: Name or service not known",
            "      fix: check uplink.mqtt.host and the DNS servers (resolvectl status)",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        1,
    ),
    (
        "online-tcp-refused",
        lambda e: e.config(e.mqtt(port="{free_port}") + SIM),
        True,
        [
            "fail  tcp: cannot connect to 127.0.0.1:{free_port}: connection refused (nothing listens there)",
            "      fix: check that the broker runs and uplink.mqtt.port, and that no firewall blocks the port",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        1,
    ),
    (
        "online-unrelated-ca",
        _wrong_ca,
        True,
        [
            "fail  tls: TLS handshake refused: the server certificate is not signed by a CA in {ca}",
            "      fix: set uplink.mqtt.ca_file to the CA that issued the broker's certificate",
            "warn  certificates: client certificate {gw_cert} (issued by CN=edgetwin demo CA) does not chain to {ca}",
            "      fix: fine when the broker trusts another CA for clients; otherwise have the certificate issued by "
            "the fleet CA",
            SUMMARY_FAIL.format(f=1, w=1),
        ],
        1,
    ),
    (
        "online-client-cert-refused",
        lambda e: e.config(
            e.mqtt(cert_file=str((c := e.ca2().issue("stray", "gw")).cert), key_file=str(c.key)) + SIM
        ),
        True,
        [
            "fail  mqtt: no CONNACK from 127.0.0.1:<port>: the broker does not trust the CA of our client certificate "
            "<tmp>/other-ca/stray.crt",
            "      fix: have it issued by a CA the broker trusts",
            "warn  certificates: client certificate <tmp>/other-ca/stray.crt (issued by CN=unrelated CA) does not "
            "chain to {demo_ca}",
            "      fix: fine when the broker trusts another CA for clients; otherwise have the certificate issued by "
            "the fleet CA",
            SUMMARY_FAIL.format(f=1, w=1),
        ],
        1,
    ),
    (
        "online-serial-port-missing",
        lambda e: e.config(
            '[[sources]]\nname = "spo2"\ndriver = "serial"\nsubject = "bed-2"\nport = "/dev/ttyUSB97"\n'
            'protocol = "nonin2"\n'
        ),
        True,
        [
            "fail  serial: source spo2: /dev/ttyUSB97: no such port",
            "      fix: plug the adapter in, or correct the port (ls /dev/serial/by-id/)",
            "config <tmp>/edgetwin.toml: 1 failure(s), 0 warning(s): fix them and run 'edgetwin check --config "
            "<tmp>/edgetwin.toml' again",
        ],
        1,
    ),
    (
        "online-opcua-unreachable",
        lambda e: e.config(
            '[[sources]]\nname = "plc"\ndriver = "opcua"\nsubject = "pump-3"\nkind = "industrial"\n'
            'endpoint = "opc.tcp://127.0.0.1:{free_port}"\nsecurity_policy = "None"\nsecurity_mode = "None"\n'
            "allow_insecure = true\n"
            'nodes = [{ browse_path = "0:Objects/2:Pump/2:Speed" }]\n'
        ),
        True,
        [
            "fail  opcua: source plc: opc.tcp://127.0.0.1:{free_port}: cannot open a session: get endpoints: "
            "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', {free_port})",
            "      fix: check that the PLC's OPC UA server runs and the endpoint in the config",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        1,
    ),
    (
        "online-state-dir-not-writable",
        lambda e: (
            e.tmp.joinpath("blocker").write_text(""),
            e.config(f'[gateway]\nstate_dir = "{e.tmp / "blocker" / "state"}"\n' + SIM, state=False),
        )[1],
        True,
        [
            "fail  state directory: <tmp>/blocker is not writable: Not a directory",
            "      fix: create <tmp>/blocker/state owned by the gateway's user (systemd's StateDirectory= does it)",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        1,
    ),
    (
        "online-disk-too-small",
        lambda e: e.config("[outbox]\nmax_mb = 900000.0\n" + SIM),
        True,
        [
            "fail  disk: the outbox budget of 900000 MB and its 4 MB full-disk reserve do not fit: {free_mb} MB free "
            "on <tmp>/state",
            "      fix: free space, or lower outbox.max_mb",
            SUMMARY_FAIL.format(f=1, w=0),
        ],
        1,
    ),
]


@pytest.mark.parametrize(("name", "build", "online", "expected", "code"), CASES, ids=[c[0] for c in CASES])
def test_check_table(
    env: Env,
    capsys: pytest.CaptureFixture[str],
    name: str,
    build: Callable[[Env], Path],
    online: bool,
    expected: list[str],
    code: int,
) -> None:
    port = free_port()
    (env.tmp / "state").mkdir()
    path = build(env)
    if path.exists():
        path.write_text(
            path.read_text().replace('"{free_port}"', str(port)).replace("{free_port}", str(port))
        )
    argv = ["check", "--config", str(path), "--quiet", *(["--online"] if online else [])]
    rc = main(argv)
    out = capsys.readouterr().out.splitlines()
    other_ca = env.tmp / "other-ca" / "unrelated-ca.crt"
    free_mb = f"{shutil.disk_usage(env.tmp / 'state').free / 1024 / 1024:.0f}"
    subs = {
        "{twin_key}": str(env.pki.twin.key),
        "{gw_cert}": str(env.pki.gateway.cert),
        "{ca}": str(other_ca),
        "{demo_ca}": str(env.pki.ca_file),
        "{free_port}": str(port),
        "{free_mb}": free_mb,
    }
    want = []
    for line in _fmt(env, expected):
        text = line
        for k, v in subs.items():
            text = text.replace(k, v)
        want.append(text)
    if name == "online-disk-too-small":
        # Free space moves while the suite runs: the reported figure must be close to a fresh one.
        found = next(
            (re.search(r"do not fit: (\d+) MB free", line) for line in out if "do not fit" in line), None
        )
        assert found is not None, out
        assert abs(int(found.group(1)) - int(free_mb)) < 500
        want = [w.replace(f"{free_mb} MB free", f"{found.group(1)} MB free") for w in want]
    if name == "model-and-driver-refuse":
        # The drivers' and models' own messages; what is checked here is that both come in one pass.
        build0, build1 = build_problems(load(path, REGISTRY), REGISTRY)
        assert build0.startswith("sources[0] (bed1): ")
        assert build1.startswith("models: ")
        want = [w.replace("{build0}", build0).replace("{build1}", build1) for w in want]
    if online and clock_synchronised() is False:
        # This machine's clock is not synchronised: every online run says so, and only warns.
        clock = [
            "warn  clock: the kernel reports the clock as not synchronised",
            "      fix: enable time synchronisation (timedatectl set-ntp true, or chrony); record times and TLS "
            "depend on it",
        ]
        fails = sum(1 for w in want if w.startswith("fail"))
        warns = sum(1 for w in want if w.startswith("warn"))
        want = [w for w in want if w.startswith(("fail", "warn", "      fix"))]
        want += clock  # after the offline warnings: online findings come last
        if fails:
            want.append(SUMMARY_FAIL.format(f=fails, w=warns + 1).replace("<tmp>", str(env.tmp)))
        else:
            want.append(OK.replace("<tmp>", str(env.tmp)) + f", {warns + 1} warning(s)")
    assert out == want
    assert rc == code


def test_check_at_least_25_cases() -> None:
    assert len(CASES) >= 25
    assert sum(1 for c in CASES if not c[2]) >= 20


def test_verbose_shows_the_passes(env: Env) -> None:
    report = run_check(env.config(env.mqtt() + SIM), REGISTRY, with_online=True)
    passed = {f.check for f in report.findings if f.level is Level.PASS}
    assert {
        "config",
        "certificates",
        "build",
        "state directory",
        "disk",
        "dns",
        "tcp",
        "tls",
        "mqtt",
    } <= passed
    text = report.render(verbose=True)
    assert f"pass  mqtt: CONNACK from 127.0.0.1:{env.broker.port} (MQTT 5), accepted" in text
    assert (
        f"pass  certificates: client certificate {env.pki.gateway.cert} matches its key {env.pki.gateway.key}"
        in text
    )


@pytest.fixture(scope="module")
def plc() -> Iterator[PlcSimProcess]:
    sim = PlcSimProcess(free_port(), "--rate-hz", "5", "--control", "none")
    sim.start()
    yield sim
    sim.stop()


def test_online_opcua_policy_and_every_browse_path(
    env: Env, plc: PlcSimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    ep = plc.endpoint
    path = env.config(
        f"""
[[sources]]
name = "plc"
driver = "opcua"
subject = "pump-3"
kind = "industrial"
endpoint = "{ep}"
security_policy = "None"
security_mode = "None"
namespace_uri = "urn:edgetwin:plcsim"
nodes = [{{ browse_path = "Pump1/Motor/Current" }}, {{ browse_path = "Pump1/Motor/Nope" }}, {{ node_id = "ns=2;s=Nope" }}]
[[sources]]
name = "plc2"
driver = "opcua"
subject = "pump-4"
kind = "industrial"
endpoint = "{ep}"
security_policy = "Aes256_Sha256_RsaPss"
pki_dir = "{env.tmp / "pki-ua"}"
namespace_uri = "urn:edgetwin:plcsim"
nodes = [{{ browse_path = "Pump1/Motor/Current" }}]
"""
    )
    assert main(["check", "--config", str(path), "--online"]) == 1
    out = capsys.readouterr().out.splitlines()
    fails = [line for line in out if line.startswith("fail")]
    assert fails == [
        f"fail  opcua: source plc: {ep}: browse path 'Pump1/Motor/Nope' not found (bad_nomatch)",
        f"fail  opcua: source plc: {ep}: node 'ns=2;s=Nope' not found (bad_nodeidunknown)",
        f"fail  opcua: source plc2: {ep}: security: the server offers no Aes256_Sha256_RsaPss/SignAndEncrypt "
        "endpoint: it offers None/None_",
    ]
    assert f"pass  opcua: source plc: {ep}: session open with None/None" in out
    assert f"pass  opcua: source plc: {ep}: browse path 'Pump1/Motor/Current' found" in out


def test_online_serial_port_probed_when_free(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    oxi = PtyOximeter(
        "nonin2", link=env.tmp / "usb-ox", vitals=VitalsModel(2, desat_every_s=0, sensor_off_every_s=0)
    )
    oxi.start()
    try:
        table = '[[sources]]\nname = "{n}"\ndriver = "serial"\nsubject = "bed-{n}"\nport = "{p}"\nprotocol = "{proto}"\nprobe_s = 1.0\n'
        path = env.config(
            table.format(n="right", p=oxi.path, proto="nonin2")
            + table.format(n="wrong", p=oxi.path, proto="masimo")
        )
        assert main(["check", "--config", str(path), "--online"]) == 1
        out = capsys.readouterr().out.splitlines()
    finally:
        oxi.stop()
    serial = [line for line in out if line.startswith(("pass  serial", "fail  serial"))]
    assert len(serial) == 2, out
    assert re.fullmatch(
        rf"pass  serial: source right: {oxi.path}: speaks nonin2 at .* \(\d+ whole frames\)", serial[1]
    )
    assert serial[0].startswith(f"fail  serial: source wrong: {oxi.path}: no recognisable frames at ")


def test_online_ble_adapter_asked_of_bluez(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    table = (
        '[[sources]]\nname = "{n}"\ndriver = "ble"\nsubject = "bed-{n}"\nadapter = "{a}"\n'
        'devices = [{{ address = "A4:C1:38:00:00:0{i}", profile = "hr" }}]\n'
    )
    path = env.config(table.format(n="wear", a="hci0", i=1) + table.format(n="wear2", a="hci7", i=2))
    with Testbed():  # a private system bus with emulated BlueZ and its adapter hci0
        assert main(["check", "--config", str(path), "--online"]) == 1
        out = capsys.readouterr().out.splitlines()
    assert "pass  ble: source wear: adapter hci0: present and powered (BlueZ)" in out
    assert "fail  ble: source wear2: adapter hci7: BlueZ has no such adapter" in out
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={env.tmp / 'no-bus'}")
    assert main(["check", "--config", str(path), "--online"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert (
        sum(
            line.startswith("fail  ble: source wear") and "cannot reach the system D-Bus" in line
            for line in out
        )
        == 2
    )


def test_a_budget_that_fits_without_room_for_the_full_disk_reserve_fails(tmp_path: Path) -> None:
    # 2 MB of filesystem, a 1 MB budget: the 4 MB reserve does not fit, and without it the outbox
    # would start degraded and refuse every feature window for good.
    with small_tmpfs(tmp_path, 2) as mnt:
        path = tmp_path / "edgetwin.toml"
        path.write_text(
            f'[gateway]\nstate_dir = "{mnt}"\n[outbox]\nmax_mb = 1.0\n[uplink]\nkind = "none"\n' + SIM
        )
        report = run_check(path, REGISTRY, with_online=True)
    (disk,) = [f for f in report.findings if f.check == "disk"]
    assert disk.level is Level.FAIL
    assert disk.message.startswith(
        "the outbox budget of 1 MB and its 4 MB full-disk reserve do not fit: 2 MB free"
    )


def _held_config(tmp: Path, current: str, temperature: str) -> Path:
    """An OPC UA source on subject ``line-10`` with two nodes named as given (the server is not asked)."""
    path = tmp / "edgetwin.toml"
    path.write_text(
        f"""
[gateway]
name = "kiln-2"
state_dir = "{tmp / "state"}"
[[sources]]
name = "plc"
driver = "opcua"
subject = "line-10"
kind = "industrial"
endpoint = "opc.tcp://127.0.0.1:{free_port()}/"
security_policy = "None"
security_mode = "None"
nodes = [
  {{ node_id = "ns=2;s=Pump1.Motor.Current", name = "{current}" }},
  {{ node_id = "ns=2;s=Pump1.Motor.Temperature", name = "{temperature}" }},
]
"""
    )
    return path


def test_a_metric_name_holding_the_subject_fails_with_where_and_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Letter case and the hyphen do not hide it: every window of line-10 would be dropped.
    path = _held_config(tmp_path, "Line10/Motor/Current", "KILN2_temperature")
    assert main(["check", "--config", str(path), "--quiet"]) == 78
    assert capsys.readouterr().out.splitlines() == [
        f"fail  privacy: {path}: source plc: metric 'KILN2_temperature' holds the gateway name (gateway.name): "
        "the anonymizer drops every record carrying it (its subject's windows, its alarms and estimates)",
        "      fix: give the metric a name without it (the name or metric key of its node or channel in "
        "source plc), or rename the gateway name (gateway.name)",
        f"fail  privacy: {path}: source plc: metric 'Line10/Motor/Current' holds the subject of source plc: "
        "the anonymizer drops every record carrying it (its subject's windows, its alarms and estimates)",
        "      fix: give the metric a name without it (the name or metric key of its node or channel in "
        "source plc), or rename the subject of source plc",
        f"config {path}: 2 failure(s), 0 warning(s): fix them and run 'edgetwin check --config {path}' again",
    ]


def test_metric_names_without_an_identity_pass(tmp_path: Path) -> None:
    # "plc" in a metric's name is the source's own label (too short to be scanned as its identity).
    report = run_check(_held_config(tmp_path, "Line/Motor/Current", "plc_temperature"), REGISTRY)
    privacy = [(f.level, f.message) for f in report.findings if f.check == "privacy"]
    assert privacy == [(Level.PASS, "no declared metric name holds an identity the config names")]
    assert report.exit_code() == 0


def test_each_kind_of_configured_identity_is_named_by_where_it_is_configured(tmp_path: Path) -> None:
    host = socket.gethostname()
    path = tmp_path / "edgetwin.toml"
    path.write_text(
        f"""
[gateway]
state_dir = "{tmp_path / "state"}"
[[sources]]
name = "press-4"
driver = "opcua"
subject = "line-2"
kind = "industrial"
endpoint = "opc.tcp://127.0.0.1:{free_port()}/"
security_policy = "None"
security_mode = "None"
username = "shift-lead"
password_file = "{_secret(tmp_path / "ua.pw")}"
nodes = [
  {{ node_id = "ns=2;s=a", name = "PRESS4/Force" }},
  {{ node_id = "ns=2;s=b", name = "ShiftLead_setpoint" }},
  {{ node_id = "ns=2;s=c", name = "{host.upper()}/uptime" }},
  {{ node_id = "ns=2;s=d", name = "Line/Force" }},
]
"""
    )
    found = {h.metric: [i.who for i in h.holds] for h in config_held_names(load(path, REGISTRY))}
    assert found == {
        "PRESS4/Force": ["the name of source press-4"],
        "ShiftLead_setpoint": ["the username of source press-4"],
        f"{host.upper()}/uptime": ["this machine's host name"],
    }


def _secret(path: Path) -> Path:
    path.write_text("pw\n")
    path.chmod(0o600)
    return path
