"""The ``[status]`` section: where the control socket lives and who may read it."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from gateway.config import ConfigModel, PathField

#: systemd's RuntimeDirectory=edgetwin (see the unit file): root and the edgetwin group only.
DEFAULT_RUNTIME_DIR = Path("/run/edgetwin")
SOCKET_NAME = "control.sock"


class StatusSection(ConfigModel):
    """Keys of ``[status]``."""

    # Default: $RUNTIME_DIRECTORY/control.sock under systemd, else /run/edgetwin/control.sock when
    # that directory exists, else control.sock in the state directory.
    socket: PathField | None = None
    group: str = Field("edgetwin", min_length=1, max_length=32)  # may read status (mode 0660)
    refresh_s: float = Field(1.0, ge=0.1, le=60)  # how often the snapshot is gathered


def socket_path(section: StatusSection, state_dir: Path, environ: dict[str, str] | None = None) -> Path:
    """Where the control socket of a gateway with this config is (server and client agree)."""
    if section.socket is not None:
        return section.socket
    env = os.environ if environ is None else environ
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / SOCKET_NAME
    if DEFAULT_RUNTIME_DIR.is_dir() and os.access(DEFAULT_RUNTIME_DIR, os.W_OK | os.X_OK):
        return DEFAULT_RUNTIME_DIR / SOCKET_NAME
    return state_dir / SOCKET_NAME
