"""The OPC UA PKI folder: the gateway's application instance certificate and trusted/rejected servers.

Layout (the usual OPC UA one, so a technician recognises it)::

    <pki_dir>/own/cert.der        the gateway's certificate, created on first start
    <pki_dir>/own/private/key.pem its private key, mode 0600
    <pki_dir>/trusted/            server certificates (or their issuing CAs) the gateway accepts
    <pki_dir>/rejected/           server certificates seen but not trusted; move one to trusted/
                                  (or run ``edgetwin opcua trust``) to accept it

Only the filesystem and ``cryptography``: no network, no asyncua.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import ConfigError
from gateway.privatefile import write_atomic

log = logging.getLogger(__name__)

KEY_BITS = 2048  # the size every OPC UA security policy we offer accepts (Basic256Sha256 .. Aes256)
CERT_DAYS = 5 * 365
RENEW_BEFORE_DAYS = 30  # warn this long before the own certificate expires


def thumbprint(der: bytes) -> str:
    """The certificate's SHA-1 thumbprint in hex, as OPC UA tools show it."""
    return hashlib.sha1(der, usedforsecurity=False).hexdigest()


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else "unnamed"
    return value if isinstance(value, str) else value.decode(errors="replace")


def generate_certificate(
    cert_path: Path,
    key_path: Path,
    *,
    application_uri: str,
    hostname: str,
    common_name: str,
    days: int = CERT_DAYS,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None = None,
    ca: bool = False,
) -> x509.Certificate:
    """Write a fresh RSA key (PEM, 0600) and an OPC UA application certificate (DER) for it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    try:
        alt.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        alt.append(x509.DNSName(hostname))
    sign_cert, sign_key = issuer or (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(sign_cert.subject if sign_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=ca or issuer is None,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = builder.sign(sign_key, hashes.SHA256())
    # Each whole and synced (a power cut leaves the old file or the new one): a torn certificate
    # would be replaced by a new key pair at the next start, which every server must trust again.
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.DER), 0o644)
    return cert


def load_certificate(path: Path) -> x509.Certificate:
    """A certificate file, DER or PEM."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the PKI says about a server certificate."""

    trusted: bool
    reason: str  # "trusted", "untrusted", "expired", "not yet valid"
    thumbprint: str


def _safe_file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:48] or "server"


class Pki:
    """The PKI folder of one gateway (shared by its OPC UA sources)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.own_cert = root / "own" / "cert.der"
        self.own_key = root / "own" / "private" / "key.pem"
        self.trusted_dir = root / "trusted"
        self.rejected_dir = root / "rejected"

    def ensure_folders(self) -> None:
        """Create the folder layout; a folder that cannot be created is a config error."""
        try:
            for d in (self.root, self.trusted_dir, self.rejected_dir, self.own_cert.parent):
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(
                f"opcua pki {self.root}: cannot create the PKI folder: {exc.strerror}: "
                "make it writable by the gateway's user or set pki_dir"
            ) from exc

    def ensure_own(self, *, application_uri: str, hostname: str) -> tuple[Path, Path]:
        """The gateway's certificate and key, created on first start (or when the URI changed or it expired)."""
        self.ensure_folders()
        reason = self._own_problem(application_uri)
        if reason is not None:
            if self.own_cert.exists():
                old = self.own_cert.with_name(f"cert.der.replaced-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}")
                self.own_cert.replace(old)
                log.warning(
                    "opcua pki %s: own certificate replaced (%s); old one kept as %s", self.root, reason, old
                )
            try:
                cert = generate_certificate(
                    self.own_cert,
                    self.own_key,
                    application_uri=application_uri,
                    hostname=hostname,
                    common_name=f"edgetwin@{hostname}",
                )
            except OSError as exc:
                raise ConfigError(
                    f"opcua pki {self.root}: cannot write the gateway's certificate: {exc.strerror}: "
                    "make the PKI folder writable by the gateway's user"
                ) from exc
            log.info(
                "opcua pki %s: created the gateway's application certificate %s (thumbprint %s); "
                "servers must trust it before a secure connection works",
                self.root,
                self.own_cert,
                thumbprint(cert.public_bytes(serialization.Encoding.DER)),
            )
        return self.own_cert, self.own_key

    def _own_problem(self, application_uri: str) -> str | None:
        if not (self.own_cert.exists() and self.own_key.exists()):
            return "none yet"
        try:
            cert = load_certificate(self.own_cert)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except (ValueError, x509.ExtensionNotFound, OSError) as exc:
            return f"unreadable: {exc}"
        if application_uri not in uris:
            return f"application URI changed to {application_uri}"
        left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
        if left <= dt.timedelta(0):
            return "expired"
        if left < dt.timedelta(days=RENEW_BEFORE_DAYS):
            log.warning(
                "opcua pki %s: the gateway's certificate expires in %d days; it is replaced when expired "
                "and servers must then trust the new one",
                self.root,
                left.days,
            )
        return None

    def _trusted(self) -> list[x509.Certificate]:
        out: list[x509.Certificate] = []
        if not self.trusted_dir.is_dir():
            return out
        for path in sorted(self.trusted_dir.iterdir()):
            if path.suffix.lower() not in (".der", ".pem", ".crt", ".cer"):
                continue
            try:
                out.append(load_certificate(path))
            except (ValueError, OSError) as exc:
                log.warning("opcua pki: skipping unreadable trusted certificate %s: %s", path, exc)
        return out

    def verdict(self, der: bytes, now: dt.datetime | None = None) -> Verdict:
        """Whether a server certificate is trusted: itself in trusted/, or issued by a CA there."""
        now = now or dt.datetime.now(dt.UTC)
        thumb = thumbprint(der)
        cert = x509.load_der_x509_certificate(der)
        if cert.not_valid_after_utc < now:
            return Verdict(False, "expired", thumb)
        if cert.not_valid_before_utc > now:
            return Verdict(False, "not yet valid", thumb)
        for trusted in self._trusted():
            if trusted.public_bytes(serialization.Encoding.DER) == der:
                return Verdict(True, "trusted", thumb)
            if trusted.subject == cert.issuer and trusted.subject != cert.subject:
                try:
                    cert.verify_directly_issued_by(trusted)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                return Verdict(True, "trusted", thumb)
        return Verdict(False, "untrusted", thumb)

    def reject(self, der: bytes) -> Path:
        """Store a server certificate in rejected/ (once) and return its path."""
        self.ensure_folders()
        cert = x509.load_der_x509_certificate(der)
        path = self.rejected_dir / f"{_safe_file_name(_common_name(cert))}[{thumbprint(der)}].der"
        if not path.exists():
            # Whole or absent after a power cut: a torn one would be the file the operator trusts.
            write_atomic(path, der, 0o644)
        return path

    def rejected(self) -> list[Path]:
        """Certificates in rejected/, oldest first."""
        if not self.rejected_dir.is_dir():
            return []
        return sorted(
            (p for p in self.rejected_dir.iterdir() if p.is_file()), key=lambda p: (p.stat().st_mtime, p.name)
        )

    def find_rejected(self, wanted: str) -> Path:
        """A rejected certificate by path, file name or thumbprint prefix (at least 8 hex digits)."""
        candidate = Path(wanted)
        if candidate.is_file():
            return candidate
        matches = [
            p
            for p in self.rejected()
            if p.name == wanted or (len(wanted) >= 8 and f"[{wanted.lower()}" in p.name.lower())
        ]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ConfigError(
                f"opcua pki {self.root}: no rejected certificate matches {wanted!r}: "
                "list them with 'edgetwin opcua trust --list'"
            )
        raise ConfigError(
            f"opcua pki {self.root}: {len(matches)} rejected certificates match {wanted!r}: give more of the thumbprint"
        )

    def trust(self, path: Path) -> Path:
        """Move (or copy, when it is not in rejected/) a certificate into trusted/; return its new path."""
        self.ensure_folders()
        try:
            cert = load_certificate(path)
        except (ValueError, OSError) as exc:
            raise ConfigError(
                f"opcua pki {path}: not a certificate: {exc}: give a .der or .pem file"
            ) from exc
        der = cert.public_bytes(serialization.Encoding.DER)
        target = self.trusted_dir / f"{_safe_file_name(_common_name(cert))}[{thumbprint(der)}].der"
        # On disk (synced, its folder too) before the rejected copy goes: a power cut leaves it in one place or both.
        write_atomic(target, der, 0o644)
        if path.resolve().parent == self.rejected_dir.resolve():
            path.unlink()
        return target

    def describe(self, paths: Sequence[Path]) -> list[str]:
        """One line per certificate file: file name, subject, validity."""
        lines = []
        for path in paths:
            try:
                cert = load_certificate(path)
            except (ValueError, OSError) as exc:
                lines.append(f"{path.name}: unreadable ({exc})")
                continue
            lines.append(
                f"{path.name}: CN={_common_name(cert)}, valid {cert.not_valid_before_utc:%Y-%m-%d}"
                f" .. {cert.not_valid_after_utc:%Y-%m-%d}"
            )
        return lines
