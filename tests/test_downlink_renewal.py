"""Certificate renewal: what the gateway takes back from the twin, and putting the old pair back."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.downlink.errors import RefusedError
from gateway.downlink.renewal import Renewal, sign_csr
from gateway.uplink.certs import DemoCA
from gateway.uplink.config import MqttSection

GW = "gwk3j2x7q9m4t8vb"


def _setup(tmp_path: Path) -> tuple[DemoCA, Renewal]:
    ca = DemoCA(tmp_path / "ca")
    pair = ca.issue("gateway", GW)
    mqtt = MqttSection.model_validate(
        {"host": "127.0.0.1", "ca_file": ca.ca_file, "cert_file": pair.cert, "key_file": pair.key}
    )
    return ca, Renewal(mqtt, tmp_path / "renew", GW)


def _refused(renewal: Renewal, pem: bytes) -> str:
    with pytest.raises(RefusedError) as info:
        renewal.check(pem, dt.datetime.now(dt.UTC))
    return info.value.reason


def test_only_a_certificate_for_the_pending_key_from_our_ca_is_taken(tmp_path: Path) -> None:
    ca, renewal = _setup(tmp_path)
    assert renewal.enabled
    assert renewal.days_left(dt.datetime.now(dt.UTC)) > 80
    assert _refused(renewal, b"junk") == "malformed"
    other = ca.issue("other", GW).cert.read_bytes()
    assert _refused(renewal, other) == "not-requested"
    csr = renewal.make_csr()
    assert (renewal.key.stat().st_mode & 0o777) == 0o600
    assert _refused(renewal, other) == "wrong-key"  # right CA and name, another key
    rogue = DemoCA(tmp_path / "rogue")
    assert _refused(renewal, sign_csr(csr, rogue.cert, rogue.key, days=30, gateway=GW)) == "bad-signature"
    with pytest.raises(RefusedError, match="names"):
        sign_csr(csr, ca.cert, ca.key, days=30, gateway="gwsomeoneelse001")
    good = sign_csr(csr, ca.cert, ca.key, days=90, gateway=GW)
    assert renewal.check(good, dt.datetime.now(dt.UTC)).not_valid_after_utc > dt.datetime.now(dt.UTC)


def test_install_keeps_the_old_pair_and_restore_puts_it_back(tmp_path: Path) -> None:
    ca, renewal = _setup(tmp_path)
    cert_file, key_file = renewal.mqtt.cert_file, renewal.mqtt.key_file
    assert cert_file is not None
    assert key_file is not None
    old_cert, old_key = cert_file.read_bytes(), key_file.read_bytes()
    good = sign_csr(renewal.make_csr(), ca.cert, ca.key, days=90, gateway=GW)
    renewal.install(good)
    assert renewal.on_trial
    assert not renewal.pending
    assert cert_file.read_bytes() == good
    assert (key_file.stat().st_mode & 0o777) == 0o600
    new_key = serialization.load_pem_private_key(key_file.read_bytes(), None).public_key()
    assert x509.load_pem_x509_certificate(good).public_key() == new_key
    renewal.restore()
    assert (cert_file.read_bytes(), key_file.read_bytes()) == (old_cert, old_key)
    assert not renewal.on_trial
