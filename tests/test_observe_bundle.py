"""``edgetwin support-bundle`` from a running gateway: everything a technician needs, no secret, no identity."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from peers import LoggedProcess
from uplink_support import require_mosquitto

from gateway.cli import main
from gateway.observe.bundle import Redactor, redacted_config
from gateway.uplink.broker import MosquittoBroker
from gateway.uplink.certs import demo_pki

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PATIENT = "MRN-0099-OKAFOR"
MAC = "A4:C1:38:9E:11:42"
GATEWAY = "ward9-bed3-hub"
SOURCE = "bed3-monitor"
USER = "ward9-uplink"
PASSWORD = "correct-horse-battery-staple-9"


def test_bundle_has_everything_and_no_secret_or_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_mosquitto()
    pki = demo_pki(tmp_path / "pki")
    broker = MosquittoBroker(tmp_path / "broker", pki)
    broker.start()
    pw = tmp_path / "mqtt.password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    state = tmp_path / "state"
    config = tmp_path / "edgetwin.toml"
    config.write_text(
        f"""
[gateway]
name = "{GATEWAY}"
state_dir = "{state}"
[uplink]
kind = "mqtt"
[uplink.mqtt]
host = "{broker.host}"
port = {broker.port}
ca_file = "{pki.ca_file}"
cert_file = "{pki.gateway.cert}"
key_file = "{pki.gateway.key}"
username = "{USER}"
password_file = "{pw}"
connect_timeout_s = 3.0
[[sources]]
name = "{SOURCE}"
driver = "sim"
subject = "{PATIENT}"
profile = "patient"
device = "{MAC}"
"""
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("NOTIFY_SOCKET", None)
    gw = LoggedProcess(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
        log=tmp_path / "gateway.log",
        env=env,
        stdout=subprocess.DEVNULL,
    )
    out = tmp_path / "bundle.tar.gz"
    try:
        deadline = time.monotonic() + 60
        while not (state / "control.sock").exists():
            assert gw.poll() is None, gw.err()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # A few samples and windows: the source starts after the status socket, later under load.
        while True:
            assert gw.poll() is None, gw.err()
            assert time.monotonic() < deadline + 30, "no samples from the source"
            if main(["status", "--config", str(config), "--json"]) != 3:
                snap = json.loads(capsys.readouterr().out)
                if snap["sources"] and snap["sources"][0]["streams"]:
                    break
            time.sleep(0.3)
        capsys.readouterr()
        assert (
            main(["support-bundle", "--config", str(config), "--output", str(out), "--journal-lines", "50"])
            == 0
        )
    finally:
        gw.stop()
        broker.stop()
    assert f"support bundle written to {out} (mode 0600)" in capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    members: dict[str, bytes] = {}
    with tarfile.open(out) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            members[m.name.removeprefix("edgetwin-support/")] = f.read()
    assert set(members) == {
        "README.txt",
        "versions.txt",
        "config.toml",
        "check.txt",
        "status.txt",
        "status.json",
        "outbox.json",
        "journal.txt",
        "unit.txt",
        "hardening.txt",
    }
    text = {name: data.decode() for name, data in members.items()}
    assert text["versions.txt"].startswith("edgetwin 0.1.0\npython 3.")
    assert "paho-mqtt==" in text["versions.txt"]
    assert "kernel Linux " in text["versions.txt"]
    assert "pass  tls: TLS" in text["check.txt"]
    snap = json.loads(text["status.json"])
    assert snap["health"] in {"healthy", "degraded"}
    assert snap["sources"][0]["streams"]
    outbox = json.loads(text["outbox.json"])
    assert outbox["from"] == "the running gateway"
    assert set(outbox["lanes"]) == {"alarms", "features", "diagnostics"}
    assert "[Service]" in text["unit.txt"]
    assert "Overall exposure level" in text["hardening.txt"]
    # The config is there, with its identities replaced.
    assert 'subject = "id-' in text["config.toml"]
    assert 'device = "id-' in text["config.toml"]
    assert f'password_file = "{pw}"' in text["config.toml"]
    # No secret: neither key nor password nor site key, in any form.
    blob = b"\n".join(members.values())
    secrets_ = [
        PASSWORD.encode(),
        pki.gateway.key.read_bytes().split(b"\n")[1],  # a line of the private key's base64
        (state / "site.key").read_bytes(),
        (state / "site.key").read_bytes().hex().encode(),
    ]
    for secret in secrets_:
        assert secret not in blob
    assert b"PRIVATE KEY" not in blob
    # No identity, in any case.
    lowered = blob.lower()
    host = socket.gethostname()
    # A host name of two letters ("vm") is inside ordinary words and cannot be replaced; the
    # bundle replaces names of three characters or more, wherever they stand.
    for identity in (PATIENT, MAC, GATEWAY, SOURCE, USER, *([host] if len(host) >= 3 else [])):
        assert identity.lower().encode() not in lowered, identity


def test_redactor_and_config_redaction() -> None:
    r = Redactor(["bed-7", "MRN-1", "bed-7-monitor"], b"k" * 32)
    out = r("source BED-7-MONITOR on bed-7 for mrn-1")
    assert "bed-7" not in out.lower()
    assert "mrn-1" not in out.lower()
    assert out.count("id-") == 3
    assert r("bed-7") == r("BED-7")  # one identity, one pseudonym
    assert r("bed-7") != r("bed-7-monitor")  # the longest match wins
    assert redacted_config('password = "x"\n[a]\ntoken="y"\nname = "n"\n') == (
        'password = "<removed>"\n[a]\ntoken="<removed>"\nname = "n"\n'
    )
