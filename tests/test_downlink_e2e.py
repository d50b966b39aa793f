"""The downlink end to end: a real ``edgetwin run`` process, the real TLS mosquitto, the twin's CLI.

A signed config revision published as the gateway's desired state is verified, checked, written
in place, and the units it changes restart (tests/test_downlink_units.py) or the process restarts
onto it (same PID); it is kept only when the gateway comes back
READY with its units healthy and the broker reached, else the old file is restored.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from downlink_support import (
    BROKEN_SERIAL,
    BROKEN_SOURCE,
    SHORT_DEADLINE_S,
    Site,
    applied,
    assert_no_record_lost,
    broker_running,
    new_site,
    renew_with_the_twin_cli,
    renewal_pki,
    running,
    source,
)
from peers import free_port
from uplink_support import listener, mosquitto_pki, require_mosquitto, running_broker

from gateway.anonymize import identity_forms
from gateway.cli import main
from gateway.downlink import audit
from gateway.downlink.signing import read_private_key, sign
from gateway.downlink.twin_link import send_command, watch
from gateway.records.topics import DEFAULT_PREFIX
from gateway.uplink.certs import DemoPKI

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


@pytest.fixture
def site(tmp_path: Path, pki: DemoPKI) -> Iterator[Site]:
    for broker in running_broker(tmp_path, pki):
        s = new_site(tmp_path, pki, broker)
        try:
            yield s
        finally:
            s.stop()


@pytest.mark.campaign
def test_a_revision_applied_end_to_end_with_the_twin_cli_then_the_keys_rotated(site: Site) -> None:
    site.start()
    assert site.proc is not None
    pid = site.proc.pid
    before = site.reported(lambda r: r["phase"] == "running" and running(site.unit("bed7-sim"))(r), "running")
    assert before["applied"] is None
    new = site.tmp / "new.toml"
    new.write_text(site.text(source("bed7-sim") + source("pump3-sim", "pump", "SN-PLC-1")))
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
    rep = site.reported(applied(1), "applied")
    took = time.monotonic() - t0
    assert rep["phase"] == "running"
    assert rep["units"][site.unit("pump3-sim")] == "running"
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

    # Key rotation over the air: a new key, the old one revoked, signed by both.
    keys = site.tmp / "keys2"
    cli = [*twin, "keygen", "--out-dir", str(keys), "--name", "new"]
    subprocess.run(cli, check=True, capture_output=True)
    old_id = json.loads((site.tmp / "trust.json").read_text())["keys"]
    new_pub = json.loads((keys / "new.pub").read_text())
    rotated = site.tmp / "trust-v1.json"
    rotated.write_text(
        json.dumps({"keys": {**old_id, new_pub["keyid"]: new_pub["public"]}, "revoked": list(old_id)})
    )
    signed = site.tmp / "trust-v1.envelope"
    subprocess.run(
        [
            *twin,
            "sign-trust",
            "--trust",
            str(rotated),
            "--key",
            str(site.tmp / "twin.key"),
            "--key",
            str(keys / "new.key"),
            "--version",
            "1",
            "--gateway",
            site.gateway,
            "--out",
            str(signed),
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*twin, "publish-config", "--gateway", site.gateway, "--envelope", str(signed), *broker],
        check=True,
        capture_output=True,
    )
    site.reported(lambda r: r["trust"]["version"] == 1, "trust v1 taken")
    # The old key no longer signs; the new one does.
    site.publish(site.envelope(2, source("bed7-sim")))
    rep = site.reported(refused("revoked-key"), "old key refused")
    site.key = read_private_key(keys / "new.key")
    site.publish(site.envelope(2, source("bed7-sim")))
    rep = site.reported(applied(2), "v2 signed by the new key applied")
    assert rep["trust"]["keys"] == [new_pub["keyid"][:12]]
    assert site.unit("pump3-sim") not in rep["units"]


BED = "bed7-sim"  # the source's name in downlink_support's configs: a bed number in it


def _leaks(payload: bytes) -> list[bytes]:
    """The forms of the bed's source name and subject found in one published payload."""
    forms = identity_forms(BED) | identity_forms(f"{BED}-subject") | identity_forms(BROKEN_SERIAL)
    lowered = payload.lower()
    return [f for f in forms if f in payload or f.lower() in lowered]


@pytest.mark.slow
def test_a_rolled_back_bed_source_is_named_by_pseudonym_and_the_legend_names_it_on_site(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    client, seen = watch(site.twin, f"{DEFAULT_PREFIX}/{site.gateway}/reported")
    try:
        site.start()
        label = site.unit(BED)
        assert label.startswith("source~")
        site.reported(running(label), "the bed's source running")
        site.publish(site.envelope(1, BROKEN_SOURCE, deadline_s=SHORT_DEADLINE_S))
        rep = site.reported(
            lambda r: r.get("last_rollback") is not None and r["phase"] == "running", "rolled back"
        )
        end = time.monotonic() + 10  # the watcher has had every publish the poll above saw
        while time.monotonic() < end and not any(b'"last_rollback": {' in p for _, p in seen):
            time.sleep(0.1)
    finally:
        client.disconnect()
        client.loop_stop()
    assert (rep["last_rollback"]["reason"], rep["last_rollback"]["units"]) == ("unhealthy", [label])
    assert rep["refused"][-1]["units"] == [label]
    assert rep["withheld"] == 0
    payloads = [p for _, p in seen if p]
    assert len(payloads) >= 3  # running, applying, rolled back at least
    assert [p for p in payloads if _leaks(p)] == []
    # On site the full story stays: the audit file names the unit and the device path.
    assert BROKEN_SERIAL in site.events()[-1]["detail"]

    twin = ["twin", "rollout-status", "--gateway", site.gateway, "--broker"]
    twin += [f"{site.broker.host}:{site.broker.port}", "--ca", str(site.pki.ca_file)]
    twin += ["--cert", str(site.pki.twin.cert), "--key", str(site.pki.twin.key)]
    capsys.readouterr()
    assert main(twin) == 0
    out = capsys.readouterr().out
    assert f"last rollback: v1 unhealthy ({label})" in out
    assert BED not in out
    # The site's legend (local only) names it.
    assert main(["legend", "--config", str(site.config), "--json"]) == 0
    legend = site.tmp / "legend.json"
    legend.write_text(capsys.readouterr().out)
    assert {"pseudonym": label, "what": "source", "identity": BED, "source": ""} in json.loads(
        legend.read_text()
    )
    assert main([*twin, "--legend", str(legend)]) == 0
    assert f"last rollback: v1 unhealthy (source:{BED})" in capsys.readouterr().out


@pytest.mark.campaign
def test_a_revision_that_breaks_a_source_is_rolled_back(site: Site) -> None:
    site.start()
    site.reported(running(site.unit("bed7-sim")), "running")
    original = site.config.read_bytes()
    site.publish(site.envelope(1, BROKEN_SOURCE, deadline_s=SHORT_DEADLINE_S))
    rep = site.reported(
        lambda r: r.get("last_rollback") is not None and r["phase"] == "running", "rolled back"
    )
    assert rep["last_rollback"]["version"] == 1
    assert rep["last_rollback"]["reason"] == "unhealthy"
    assert rep["last_rollback"]["units"] == [site.unit("bed7-sim")]
    assert BROKEN_SERIAL not in json.dumps(rep)  # the device path stays in the log and the audit file
    assert BROKEN_SERIAL in site.events()[-1]["detail"]
    assert rep["refused"][-1]["reason"] == "rolled-back"
    assert rep["applied"] is None
    assert site.config.read_bytes() == original
    site.reported(running(site.unit("bed7-sim")), "the old source running again")
    steps = [e["event"] for e in site.events()]
    assert steps == ["received", "verified", "applying", "rolled-back"]
    # The retained revision comes again on every connection: it is not applied a second time.
    assert rep["accepted"] == 1


@pytest.mark.campaign
def test_an_uplink_that_cannot_reach_the_broker_is_rolled_back(site: Site) -> None:
    site.start()
    before = site.reported(running(site.unit("bed7-sim")), "running")
    original = site.config.read_bytes()
    site.publish(site.envelope(1, source("bed7-sim"), port=free_port(), deadline_s=SHORT_DEADLINE_S))
    rep = site.reported(
        lambda r: r.get("last_rollback") is not None and r["phase"] == "running", "rolled back"
    )
    assert rep["last_rollback"]["reason"] == "uplink"
    assert rep["last_rollback"]["units"] == ["uplink"]
    # Reconnected in place, twice (new settings, then the old ones), without a process restart.
    assert rep["process"]["started_at"] == before["process"]["started_at"]
    assert rep["process"]["connects"] == 2
    assert "uplink not connected" in site.events()[-1]["detail"]
    assert site.config.read_bytes() == original  # and it reported this over the old settings


def refused(reason: str) -> Callable[[dict[str, Any]], bool]:
    """A predicate on the reported state: the newest refusal is for ``reason``."""
    return lambda rep: bool(rep["refused"]) and rep["refused"][-1].get("reason") == reason


def test_offline_newest_of_three_applied_invalid_ones_refused_a_broken_one_rolled_back(site: Site) -> None:
    """The default run's share; the scenarios above run under the campaign marker."""
    # The gateway is offline (not started) while the twin publishes three revisions.
    for version in (1, 2, 3):
        extra = source(f"bed{version + 10}-sim", device=f"A4:C1:38:00:00:{version + 10}")
        site.publish(site.envelope(version, source("bed7-sim") + extra))
    site.start()
    rep = site.reported(applied(3), "v3 applied")
    assert rep["units"][site.unit("bed13-sim")] == "running"
    assert site.unit("bed11-sim") not in rep["units"]
    assert [(e["event"], e.get("version")) for e in site.events()] == [
        ("received", None),
        ("verified", 3),
        ("applying", 3),
        ("applied", 3),
    ]
    # Refused over the live session, without a restart and without touching the running config.
    running_config = site.config.read_bytes()
    attacker = Ed25519PrivateKey.generate()
    forged = sign(
        running_config,
        keys=[attacker],
        gateway=site.gateway,
        version=9,
        expires=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    invalid = source("bed7-sim") + '[[sources]]\nname = "x"\ndriver = "no-such-driver"\nsubject = "s"\n'
    for envelope, reason in (
        (site.envelope(2, source("bed7-sim")), "rollback"),
        (forged, "bad-signature"),
        (site.envelope(4, invalid), "invalid-config"),
    ):
        site.publish(envelope)
        rep = site.reported(refused(reason), reason)
        assert rep["applied"]["version"] == 3
    assert "detail" not in rep["refused"][-1]  # the findings are in the audit file only
    assert "no-such-driver" in site.events()[-1]["detail"]
    assert site.config.read_bytes() == running_config
    assert site.proc is not None
    assert list((site.tmp / "state" / "downlink" / "quarantine").iterdir()) == []
    assert [(e["event"], e.get("version"), e.get("reason")) for e in site.events()[4:]] == [
        ("received", None, None),
        ("refused", None, "rollback"),
        ("received", None, None),
        ("refused", None, "bad-signature"),
        ("received", None, None),
        ("verified", 4, None),
        ("refused", 4, "invalid-config"),
    ]
    assert audit.verify(site.tmp / "state" / "downlink" / "audit.jsonl").hash == rep["audit"]["head"]
    # Commands: the status record again (rebirth), live rather than retained.
    client, seen = watch(site.twin, f"{DEFAULT_PREFIX}/{site.gateway}/status")
    try:
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen[0][0] is True  # the retained one
        send_command(site.twin, f"{DEFAULT_PREFIX}/{site.gateway}/cmd", "rebirth")
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen[1][0] is False  # published again now, forwarded live
    finally:
        client.disconnect()
        client.loop_stop()
    # A revision that breaks a source: applied, judged, rolled back onto v3.
    site.publish(site.envelope(5, BROKEN_SOURCE, deadline_s=SHORT_DEADLINE_S))
    rep = site.reported(lambda r: (r.get("last_rollback") or {}).get("version") == 5, "v5 rolled back")
    assert rep["last_rollback"]["units"] == [site.unit("bed7-sim")]
    assert BROKEN_SERIAL not in json.dumps(rep)  # only reason words and unit names leave
    assert BROKEN_SERIAL in site.events()[-1]["detail"]
    assert site.config.read_bytes() == running_config
    rep = site.reported(lambda r: r["phase"] == "running" and running(site.unit("bed13-sim"))(r), "v3 again")
    assert rep["applied"]["version"] == 3
    assert [e["event"] for e in site.events()[-4:]] == ["received", "verified", "applying", "rolled-back"]
    staged = site.tmp / "state" / "downlink" / "staged"
    assert [p.name for p in staged.iterdir()] == ["config-v5.toml"]  # the newest only


@pytest.mark.campaign
def test_a_revision_published_after_the_broker_restarted_is_applied(site: Site) -> None:
    site.start()
    site.reported(running(site.unit("bed7-sim")), "running")
    site.broker.stop()
    site.broker.start()  # the same port; retained messages are gone with it (no persistence)
    site.reported(lambda r: r["phase"] == "running", "reported again after the reconnect")
    site.publish(site.envelope(1, source("bed7-sim") + source("bed9-sim", device="A4:C1:38:00:00:09")))
    rep = site.reported(applied(1), "applied after the reconnect")
    assert rep["units"][site.unit("bed9-sim")] == "running"


@pytest.mark.campaign
def test_a_certificate_near_expiry_is_renewed_over_the_downlink(tmp_path: Path) -> None:
    require_mosquitto()
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=5)  # inside the default 30 days
    ca, ca_key, pki = renewal_pki(tmp_path / "pki", valid_until=soon)
    with broker_running(tmp_path, pki) as broker:
        site = new_site(tmp_path, pki, broker)
        old_cert = pki.gateway.cert.read_bytes()
        twin = listener(broker, pki)  # the records' sequence across the switch
        try:
            site.start()
            rep = site.reported(
                lambda r: (r.get("certificate") or {}).get("renewal") == "csr sent", "CSR sent"
            )
            assert rep["certificate"]["days_left"] < 6
            rep = renew_with_the_twin_cli(site, ca.ca_file, ca_key)
            assert pki.gateway.cert.read_bytes() != old_cert
            assert rep["units"]["uplink"] == "running"
            assert_no_record_lost(site, twin)  # across the switch
        finally:
            site.stop()
            twin.stop()
