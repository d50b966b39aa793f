"""Gateway certificates: key (0600) and CSR, importing a pair, expiry, a throwaway demo CA.

The demo CA is for the demo and the tests only.

The CSR names the gateway by its pseudonym: the certificate travels in every TLS handshake, so it
must not carry the gateway's real name.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import ConfigError
from gateway.uplink.expiry import EXPIRY_WARN_DAYS, CertInfo, expiry_message

# The expiry names are re-exported: callers that make keys and certificates read expiry here too.
__all__ = [
    "DEMO_VALID_DAYS",
    "EXPIRY_WARN_DAYS",
    "CertInfo",
    "DemoCA",
    "DemoPKI",
    "Issued",
    "cert_info",
    "create_key_and_csr",
    "demo_pki",
    "expiry_message",
    "import_pair",
    "load_cert",
    "load_key",
    "new_key",
]

DEMO_VALID_DAYS = 90  # beyond the expiry warning, so a demo starts without one


def _write_private(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write a secret with mode 0600 from the first byte (never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if path.exists() and not overwrite:
        tmp.unlink()
        raise ConfigError(
            f"provision {path}: a key is already there: refusing to overwrite it: "
            "move it away first, or pass --force to replace it (its certificate stops working)"
        )
    tmp.replace(path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_key() -> ec.EllipticCurvePrivateKey:
    """A new P-256 key: small, fast on a Raspberry Pi, accepted by AWS IoT and Azure IoT Hub."""
    return ec.generate_private_key(ec.SECP256R1())


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read a PEM private key; ConfigError naming the file when it is not one we can use."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"provision {path}: no key there: create one with 'edgetwin provision key'"
        ) from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"provision {path}: not an unencrypted PEM private key: {exc}: "
            "give the key in PEM (PKCS#8 or traditional), without a passphrase"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"provision {path}: key type {type(key).__name__}: use an EC or RSA key")
    return key  # type: ignore[return-value]  # RSA keys work as well for TLS; the type names the usual case


def load_cert(path: Path) -> x509.Certificate:
    """Read the first PEM certificate of a file; ConfigError naming the file otherwise."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"certificate {path}: no such file: check the path in the config") from exc
    except ValueError as exc:
        raise ConfigError(f"certificate {path}: not a PEM certificate: {exc}: give it in PEM") from exc


def create_key_and_csr(key_path: Path, csr_path: Path, common_name: str, *, force: bool = False) -> None:
    """Create the gateway's private key (0600) and a CSR for ``common_name`` (its pseudonym)."""
    key = new_key()
    _write_private(key_path, _key_pem(key), overwrite=force)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    _write_public(csr_path, csr.public_bytes(serialization.Encoding.PEM))


def import_pair(cert_src: Path, key_src: Path, dest_dir: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Copy a certificate and its key into ``dest_dir`` (key 0600) after checking they belong together."""
    cert = load_cert(cert_src)
    key = load_key(key_src)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, pub) != key.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ):
        raise ConfigError(
            f"provision {cert_src}: the certificate does not belong to the key {key_src}: "
            "import the key the certificate was issued for"
        )
    cert_dst, key_dst = dest_dir / "gateway.crt", dest_dir / "gateway.key"
    _write_private(key_dst, _key_pem(key), overwrite=force)
    shutil.copyfile(cert_src, cert_dst)
    cert_dst.chmod(0o644)
    return cert_dst, key_dst


def cert_info(path: Path) -> CertInfo:
    """Subject and validity of a PEM certificate."""
    cert = load_cert(path)
    return CertInfo(path, cert.subject.rfc4514_string(), cert.not_valid_before_utc, cert.not_valid_after_utc)


# --- a throwaway CA for the demo and the tests -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and key written to disk."""

    cert: Path
    key: Path


class DemoCA:
    """A self-signed CA that issues server and client certificates; for demos and tests only."""

    def __init__(self, directory: Path, name: str = "edgetwin demo CA") -> None:
        self.dir = directory
        self.key = new_key()
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=DEMO_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / f"{_slug(name)}.crt"
        _write_public(self.ca_file, self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        stem: str,
        common_name: str,
        *,
        server: bool = False,
        hosts: tuple[str, ...] = (),
        valid_from: dt.datetime | None = None,
        valid_until: dt.datetime | None = None,
    ) -> Issued:
        """Issue a certificate (``server``: for TLS servers with ``hosts`` as names) into ``stem``.crt/.key."""
        now = dt.datetime.now(dt.UTC)
        key = new_key()
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from or now - dt.timedelta(minutes=5))
            .not_valid_after(valid_until or now + dt.timedelta(days=DEMO_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.dir / f"{stem}.crt", self.dir / f"{stem}.key")
        _write_public(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
        _write_private(issued.key, _key_pem(key), overwrite=True)
        return issued

    def sign_csr(self, csr_path: Path, cert_path: Path, *, days: int = 30) -> Path:
        """Sign a CSR as a client certificate (what a fleet CA does with ``provision key``'s CSR)."""
        cert = client_certificate(x509.load_pem_x509_csr(csr_path.read_bytes()), self.cert, self.key, days)
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert_path


def client_certificate(
    csr: x509.CertificateSigningRequest,
    issuer: x509.Certificate,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    days: float,
) -> x509.Certificate:
    """A client certificate for ``csr``'s name and key, signed by ``issuer`` for ``days``."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(issuer.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


@dataclass(frozen=True, slots=True)
class DemoPKI:
    """The files of a demo setup: CA, broker certificate, gateway and twin client certificates."""

    ca_file: Path
    server: Issued
    gateway: Issued
    twin: Issued


def demo_pki(
    directory: Path, gateway_cn: str = "gateway", hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> DemoPKI:
    """A fresh demo CA with a broker certificate for ``hosts`` and client certificates."""
    ca = DemoCA(directory)
    return DemoPKI(
        ca.ca_file,
        ca.issue("broker", "edgetwin demo broker", server=True, hosts=hosts),
        ca.issue("gateway", gateway_cn),
        ca.issue("twin", "edgetwin-twin"),
    )
