"""``edgetwin rotate-key``: a new gateway identity in everything that leaves the gateway.

A new site key changes every pseudonym (the gateway's, and so its MQTT client id and topics; its
subjects'; its devices'), but a broker-side observer could still join the old and the new
identity through anything that carries on: the sequence epoch and numbers, the record time, the
run counter, or records queued under the old pseudonyms and sent after the rotation.  So a
rotation also sets the outbox aside (a new one starts with a new random epoch and ``seq`` from 1;
what was queued keeps the old pseudonyms and is never sent) and starts a new time origin and run
counter.  The client certificate names the old pseudonym: a new key and a CSR named by the new
one are written beside the configured key (``gateway-next.key``, ``gateway-next.csr``) for the
operator to have signed.

A rotation holds the state directory's lock (``gateway.observe.lock``): while a gateway runs on
the same state directory it is refused (:class:`GatewayRunningError`), since that gateway would go
on publishing under the old identity and writing the outbox the rotation sets aside.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.anonymize import Pseudonymizer, load_or_create_key, rotate_key
from gateway.config import CoreConfig
from gateway.errors import EdgetwinError
from gateway.observe.lock import StateDirBusyError, state_dir_lock
from gateway.timebase import TimeBase

#: The outbox's companions, moved with it: SQLite's files and the outbox's state file (its id floor:
#: left behind, the new identity's ids would go on from the old one's).
_SIDECARS = ("", "-wal", "-shm", "-journal", ".state")


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a rotation did, for the operator."""

    retired_key: Path
    gateway_pseudonym: str  # the new one: the MQTT client id and the name the certificate must carry
    outbox_retired: Path | None  # where the old outbox went (None: there was none)
    undelivered: int | None  # records it still held (None: could not be counted)
    csr: Path | None = None  # the new certificate request (None: no MQTT uplink configured)


def _count(db: Path) -> int | None:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        return int(conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def _set_aside(db: Path, stamp: str) -> Path | None:
    if not db.exists():
        return None
    target = db.with_name(f"{db.name}.retired-{stamp}")
    for suffix in _SIDECARS:
        part = Path(f"{db}{suffix}")
        if part.exists():
            part.replace(Path(f"{target}{suffix}"))
    return target


class GatewayRunningError(EdgetwinError):
    """A gateway holds the state directory: nothing was rotated."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        self.state_dir, self.pid = state_dir, pid
        who = f"a gateway (PID {pid})" if pid else "a gateway"
        super().__init__(
            f"edgetwin rotate-key {state_dir}: refused, {who} is running on this state directory: "
            "it would go on publishing under the old identity and writing the outbox a rotation "
            "sets aside: stop it first (systemctl stop edgetwin), then run rotate-key again; "
            "nothing was changed"
        )


def rotate_identity(core: CoreConfig) -> Rotation:
    """Rotate the site key, set the outbox aside and restart the time base; see the module doc.

    Raises GatewayRunningError, changing nothing, while a gateway runs on the same state directory.
    """
    try:
        with state_dir_lock(core.gateway.state_dir):
            return _rotate(core)
    except StateDirBusyError as exc:
        raise GatewayRunningError(exc.state_dir, exc.pid) from None


def _rotate(core: CoreConfig) -> Rotation:
    retired = rotate_key(core.site_key_path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    db = core.outbox_path
    undelivered = _count(db) if db.exists() else 0
    outbox_retired = _set_aside(db, stamp)
    TimeBase.open(core.gateway.state_dir).reset()
    pseudonym = Pseudonymizer(load_or_create_key(core.site_key_path))("gateway", core.gateway.name)
    return Rotation(retired, pseudonym, outbox_retired, undelivered, _renew_request(core, pseudonym))


def _renew_request(core: CoreConfig, pseudonym: str) -> Path | None:
    """A new key and a CSR for the new client id, beside the configured key; None without one."""
    mqtt = core.uplink.mqtt
    if mqtt is None or mqtt.key_file is None:
        return None
    from gateway.uplink.certs import create_key_and_csr  # noqa: PLC0415 - the mqtt extra

    folder = mqtt.key_file.parent
    csr = folder / "gateway-next.csr"
    create_key_and_csr(folder / "gateway-next.key", csr, pseudonym, force=True)
    return csr
