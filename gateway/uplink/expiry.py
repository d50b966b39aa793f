"""When a certificate expires, read with the standard library: the running service's own check.

The service checks its client certificate at every connection.  ``cryptography`` (which
:mod:`gateway.uplink.certs` needs to make keys, CSRs and the demo CA) costs ~8 MB of resident
memory once imported, an eighth of a one-source gateway; the ``ssl`` module already loaded for
the connection decodes the certificate as well.  Where that decoder is missing (it is
CPython's, used by its own tests), ``cryptography`` reads the file instead.
"""

from __future__ import annotations

import datetime as dt
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError

EXPIRY_WARN_DAYS = 30

# RFC 4514 short names of the attributes a certificate subject usually has.
_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
    "userId": "UID",
    "streetAddress": "STREET",
}
_DECODE: Callable[[str], dict[str, Any]] | None = getattr(
    getattr(ssl, "_ssl", None), "_test_decode_cert", None
)


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What an operator needs to know about a certificate."""

    path: Path
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime

    def days_left(self, now: dt.datetime | None = None) -> float:
        """Days until it expires (negative once expired)."""
        now = now or dt.datetime.now(dt.UTC)
        return (self.not_after - now).total_seconds() / 86400.0


def expiry_message(
    info: CertInfo, now: dt.datetime | None = None, warn_days: float = EXPIRY_WARN_DAYS
) -> tuple[bool, str] | None:
    """(expired, message) when the certificate expired or expires within ``warn_days``, else None."""
    days = info.days_left(now)
    if days < 0:
        return True, (
            f"certificate {info.path} ({info.subject}) expired on {info.not_after:%Y-%m-%d}: "
            "the broker will refuse it: renew it (edgetwin provision key, then have the CSR signed)"
        )
    if days < warn_days:
        return False, (
            f"certificate {info.path} ({info.subject}) expires on {info.not_after:%Y-%m-%d}, "
            f"in {days:.0f} day(s): renew it before then"
        )
    return None


def read_cert_info(path: Path) -> CertInfo:
    """Subject and validity of the first PEM certificate of a file; ConfigError naming the file otherwise."""
    if _DECODE is None:
        from gateway.uplink.certs import cert_info  # noqa: PLC0415 - only where ssl cannot decode

        return cert_info(path)
    if not path.is_file():
        raise ConfigError(f"certificate {path}: no such file: check the path in the config")
    try:
        decoded = _DECODE(str(path))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"certificate {path}: not a PEM certificate: {exc}: give it in PEM") from exc
    return CertInfo(
        path, rfc4514(decoded.get("subject", ())), _when(decoded["notBefore"]), _when(decoded["notAfter"])
    )


def presented_info(der: bytes, name: str) -> CertInfo:
    """Subject and validity of a certificate a peer presented (DER); ``name`` says whose it is."""
    with tempfile.TemporaryDirectory(prefix="edgetwin-peer-") as folder:
        path = Path(folder) / "peer.pem"
        path.write_text(ssl.DER_cert_to_PEM_cert(der), encoding="ascii")
        return replace(read_cert_info(path), path=Path(name))


def rfc4514(subject: Any) -> str:
    """The subject as ``ssl`` decodes it (RDNs of (name, value) pairs), written as RFC 4514 does."""
    rdns = ["+".join(f"{_SHORT.get(name, name)}={_escape(value)}" for name, value in rdn) for rdn in subject]
    return ",".join(reversed(rdns))


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def _when(text: str) -> dt.datetime:
    return dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(text), dt.UTC)
