"""The ``[status]`` section: where the control socket lives and who may read it."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from gateway.config_base import ConfigModel, PathField, SecretFile

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
    # The status page and /metrics: off unless set. "127.0.0.1:9180" serves this machine only;
    # any other address needs TLS (tls_cert_file, tls_key_file) and a token or client certificates.
    http: str | None = Field(None, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
    tls_cert_file: PathField | None = None
    tls_key_file: SecretFile | None = None
    token_file: SecretFile | None = None  # a bearer token viewers must give (mode 0600)
    client_ca_file: PathField | None = None  # viewers must present a certificate issued by this CA

    @model_validator(mode="after")
    def _lan_needs_tls_and_auth(self) -> Self:
        if self.http is None:
            return self
        host, _, port = self.http.rpartition(":")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"http port {port} is not in 1..65535")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if not is_loopback(host):
            if self.tls_cert_file is None:
                raise ValueError(
                    f"http on {host} reaches beyond this machine: set tls_cert_file and tls_key_file"
                )
            if self.token_file is None and self.client_ca_file is None:
                raise ValueError(
                    f"http on {host} reaches beyond this machine: set token_file or client_ca_file"
                )
        return self

    @property
    def http_host(self) -> str:
        """The address to listen on."""
        return (self.http or "").rpartition(":")[0].strip("[]")

    @property
    def http_port(self) -> int:
        """The port to listen on."""
        return int((self.http or ":0").rpartition(":")[2])


def is_loopback(host: str) -> bool:
    """True when ``host`` is this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def socket_path(
    section: StatusSection, state_dir: Path, environ: dict[str, str] | None = None, *, client: bool = False
) -> Path:
    """Where the control socket of a gateway with this config is (server and client agree)."""
    if section.socket is not None:
        return section.socket
    env = os.environ if environ is None else environ
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / SOCKET_NAME
    if DEFAULT_RUNTIME_DIR.is_dir() and os.access(DEFAULT_RUNTIME_DIR, os.W_OK | os.X_OK):
        return DEFAULT_RUNTIME_DIR / SOCKET_NAME
    # A member of the edgetwin group may enter /run/edgetwin but not write it: as a client it
    # still finds the gateway's socket there.
    if client and (DEFAULT_RUNTIME_DIR / SOCKET_NAME).exists():
        return DEFAULT_RUNTIME_DIR / SOCKET_NAME
    return state_dir / SOCKET_NAME
