"""A mosquitto configuration for the demo CA's broker certificate (``provision demo-ca``).

mosquitto started as root reads its configuration, then drops to its own user (``mosquitto`` on
Debian) before it opens the certificate files; a key written 0600 for root is then unreadable and
the listener never starts.  The broker's key is therefore given to that user (still 0600).
"""

from __future__ import annotations

import contextlib
import os
import pwd
from pathlib import Path

from gateway.uplink.certs import DemoPKI

BROKER_USER = "mosquitto"


def mosquitto_conf(pki: DemoPKI, *, port: int = 8883, listen: str = "") -> str:
    """The text of a mosquitto.conf: TLS 1.2+, client certificates required, identity as user name."""
    return "\n".join(
        [
            "# Written by 'edgetwin provision demo-ca': for demos and tests only.",
            "# Run with: mosquitto -c <this file>   (or copy into /etc/mosquitto/conf.d/)",
            "per_listener_settings false",
            "allow_anonymous false",
            f"listener {port}{' ' + listen if listen else ''}",
            f"cafile {pki.ca_file}",
            f"certfile {pki.server.cert}",
            f"keyfile {pki.server.key}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "use_identity_as_username true",
            "",
        ]
    )


def write_mosquitto_conf(
    pki: DemoPKI, directory: Path, *, port: int = 8883, listen: str = ""
) -> tuple[Path, str]:
    """Write ``directory/mosquitto.conf``; give the broker key to the broker's user. Return (path, note)."""
    path = directory / "mosquitto.conf"
    path.write_text(mosquitto_conf(pki, port=port, listen=listen), encoding="utf-8")
    path.chmod(0o644)
    try:
        user = pwd.getpwnam(BROKER_USER)
    except KeyError:
        return (
            path,
            f"no user {BROKER_USER!r} here: the broker key stays with {os.geteuid()} (run mosquitto as this user)",
        )
    note = f"the broker key {pki.server.key} is owned by {BROKER_USER} (mode 0600), who runs the broker"
    try:
        os.chown(pki.server.key, user.pw_uid, user.pw_gid)
        # mosquitto must also reach the files: the directory must let its user through.
        with contextlib.suppress(PermissionError):
            directory.chmod(directory.stat().st_mode | 0o011)
    except PermissionError:
        note = (
            f"run as root to hand the broker key to {BROKER_USER}: sudo chown {BROKER_USER} {pki.server.key}"
        )
    return path, note
