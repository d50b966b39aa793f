"""``edgetwin rotate-key`` offline: what it changes on disk, and the certificate request it leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from cryptography import x509
from cryptography.x509.oid import NameOID

from drivers import REGISTRY
from gateway.anonymize import Pseudonymizer, load_or_create_key
from gateway.cli import main
from gateway.config import load
from gateway.contracts import Lane
from gateway.outbox import Outbox, OutItem
from gateway.timebase import FILE_NAME, TimeBase
from gateway.uplink.certs import demo_pki


def _config(tmp: Path) -> Path:
    pki = demo_pki(tmp / "pki")
    path = tmp / "gw.toml"
    path.write_text(
        f"""
[gateway]
name = "ward3-hub-17"
state_dir = "{tmp / "state"}"
[uplink]
kind = "mqtt"
[uplink.mqtt]
host = "127.0.0.1"
ca_file = "{pki.ca_file}"
cert_file = "{pki.gateway.cert}"
key_file = "{pki.gateway.key}"
""",
        encoding="utf-8",
    )
    return path


def test_rotate_key_sets_the_outbox_aside_restarts_time_and_asks_for_a_new_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path)
    core = load(path, REGISTRY).core
    old = Pseudonymizer(load_or_create_key(core.site_key_path))("gateway", "ward3-hub-17")
    with Outbox(core.outbox_path) as outbox:
        outbox.put_many([OutItem(Lane.FEATURES, "features/x", b"\x80", 1.0)] * 3)
    for _ in range(3):
        TimeBase.open(core.gateway.state_dir).close()  # three runs of the old identity

    assert main(["rotate-key", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    new = Pseudonymizer(load_or_create_key(core.site_key_path))("gateway", "ward3-hub-17")
    assert new != old
    assert new in out
    assert "3 undelivered record(s)" in out
    # The next start opens a new outbox: a new epoch, and seq from 1 (no id floor carried over).
    assert not core.outbox_path.exists()
    assert not core.outbox_path.with_name(core.outbox_path.name + ".state").exists()
    with Outbox(core.outbox_path) as fresh:
        fresh.put_many([OutItem(Lane.FEATURES, "features/y", b"\x80", 1.0)])
        assert [item.id for item in fresh.lease(10)] == [1]
    assert list(core.outbox_path.parent.glob("outbox.db.retired-*"))
    assert json.loads((core.gateway.state_dir / FILE_NAME).read_text())["boot"] == 0
    csr_path = core.uplink.mqtt.key_file.parent / "gateway-next.csr"  # type: ignore[union-attr]
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == new
    assert (csr_path.parent / "gateway-next.key").stat().st_mode & 0o077 == 0
