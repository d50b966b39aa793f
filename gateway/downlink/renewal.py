"""Certificate renewal over the downlink: a new key and CSR before expiry, the signed certificate back.

The gateway makes a new key (0600) and a CSR named by its pseudonym in
``<state_dir>/downlink/renew/`` when its client certificate has fewer than ``renew_before_days``
left, and publishes the CSR (retained) on ``…/csr``.  The twin signs it with the fleet's CA and
publishes the certificate (retained) on ``…/cert``.  The gateway takes it only if it is for the
pending key, names this gateway, is valid now and is issued by the CA the uplink trusts; it then
keeps the old pair aside, installs the new one over ``cert_file``/``key_file`` and reconnects.
The old pair is put back if the new one has not connected within ``apply_deadline_s``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from gateway.downlink import state as persist
from gateway.downlink.clock import RenewalClock
from gateway.downlink.errors import RefusedError
from gateway.uplink import certs
from gateway.uplink.config import MqttSection


class Renewal:
    """The files of one renewal and the checks on the certificate that comes back."""

    def __init__(self, mqtt: MqttSection, directory: Path, gateway_id: str) -> None:
        self.mqtt = mqtt
        self.dir = directory
        self.gateway_id = gateway_id
        self.key = directory / "gateway.key"
        self.csr = directory / "gateway.csr"
        self.previous_cert = directory / "previous.crt"
        self.previous_key = directory / "previous.key"
        self.clock = RenewalClock()  # now for renewal: wall-clock steps do not move it

    @property
    def enabled(self) -> bool:
        """Only a gateway with its own client certificate and key renews them."""
        return self.mqtt.cert_file is not None and self.mqtt.key_file is not None

    def days_left(self, now: dt.datetime) -> float:
        """Days until the client certificate expires."""
        assert self.mqtt.cert_file is not None
        return certs.cert_info(self.mqtt.cert_file).days_left(now)

    def now(self) -> dt.datetime:
        """The time to judge certificates by: monotonic, from the newest sane wall-clock reading."""
        assert self.mqtt.cert_file is not None
        info = certs.cert_info(self.mqtt.cert_file)
        return self.clock.now(info.not_before, info.not_after)

    @property
    def pending(self) -> bool:
        """A CSR was made and no certificate for it installed yet."""
        return self.csr.exists()

    def make_csr(self) -> bytes:
        """A new key (0600) and a CSR for it; the CSR's PEM."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        certs.create_key_and_csr(self.key, self.csr, self.gateway_id, force=True)
        return self.csr.read_bytes()

    def check(self, pem: bytes, now: dt.datetime) -> x509.Certificate:
        """The certificate, if it is for the pending key, this gateway, valid now and from our CA."""
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise RefusedError("malformed", f"not a PEM certificate: {exc}") from exc
        if not self.pending:
            raise RefusedError("not-requested", "no certificate signing request is pending")
        key = certs.load_key(self.key)
        ours = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        theirs = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if ours != theirs:
            raise RefusedError("wrong-key", "the certificate is not for the key of the pending request")
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [self.gateway_id]:
            raise RefusedError("wrong-gateway", f"the certificate names {names}, this is {self.gateway_id}")
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise RefusedError(
                "expired", f"not valid now ({cert.not_valid_before_utc} .. {cert.not_valid_after_utc})"
            )
        if self.mqtt.ca_file is None:
            raise RefusedError("no-ca", "uplink.mqtt.ca_file is not set: the issuer cannot be checked")
        issuers = x509.load_pem_x509_certificates(self.mqtt.ca_file.read_bytes())
        if not any(_issued_by(cert, issuer) for issuer in issuers):
            raise RefusedError("bad-signature", f"not issued by a CA in {self.mqtt.ca_file}")
        return cert

    def install(self, pem: bytes) -> None:
        """Keep the old pair aside and put the new one in place (each file replaced atomically)."""
        cert_file, key_file = self.mqtt.cert_file, self.mqtt.key_file
        assert cert_file is not None
        assert key_file is not None
        persist.write_atomic(self.previous_cert, cert_file.read_bytes())
        persist.write_atomic(self.previous_key, key_file.read_bytes())
        persist.write_atomic(key_file, self.key.read_bytes(), 0o600)
        persist.write_atomic(cert_file, pem, cert_file.stat().st_mode & 0o777)
        self.csr.unlink(missing_ok=True)

    def restore(self) -> None:
        """Put the old pair back (the new one did not connect)."""
        cert_file, key_file = self.mqtt.cert_file, self.mqtt.key_file
        assert cert_file is not None
        assert key_file is not None
        persist.write_atomic(key_file, self.previous_key.read_bytes(), 0o600)
        persist.write_atomic(cert_file, self.previous_cert.read_bytes(), cert_file.stat().st_mode & 0o777)
        self.forget_previous()

    def forget_previous(self) -> None:
        """The new pair connected: the old one is no longer needed."""
        self.previous_cert.unlink(missing_ok=True)
        self.previous_key.unlink(missing_ok=True)

    @property
    def on_trial(self) -> bool:
        """A new pair is installed and has not connected yet."""
        return self.previous_cert.exists()


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def sign_csr(csr_pem: bytes, ca_cert: x509.Certificate, ca_key: Any, *, days: float, gateway: str) -> bytes:
    """The twin's side: a client certificate for a gateway's CSR (whose name must be ``gateway``)."""
    csr = x509.load_pem_x509_csr(csr_pem)
    if not csr.is_signature_valid:
        raise RefusedError("bad-signature", "the CSR's own signature does not verify")
    names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [gateway]:
        raise RefusedError("wrong-gateway", f"the CSR names {names}, not {gateway}")
    cert = certs.client_certificate(csr, ca_cert, ca_key, days)
    return cert.public_bytes(serialization.Encoding.PEM)
