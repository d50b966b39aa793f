"""The ``[uplink.mqtt]`` section: broker, TLS material, profile, pacing.

Everything here is checked when the file is loaded (strict types, unknown keys refused); what can
only be checked against the files themselves (a certificate that does not parse, a key that does
not match) is checked when the uplink starts and by ``edgetwin check``.
"""

from __future__ import annotations

import ipaddress
from typing import Literal, Self

from pydantic import Field, model_validator

from gateway.config_base import ConfigModel, PathField, SecretFile

Protocol = Literal["5", "3.1.1"]
ProfileName = Literal["generic", "aws", "azure"]


def is_loopback(host: str) -> bool:
    """True when ``host`` names this machine (traffic never leaves it)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class MqttSection(ConfigModel):
    """Keys of ``[uplink.mqtt]``."""

    host: str = Field(min_length=1, max_length=253)
    port: int = Field(8883, ge=1, le=65535)
    protocol: Protocol = "5"
    profile: ProfileName = "generic"
    # TLS: the server certificate and its host name are always verified.
    tls: bool = True
    allow_insecure: bool = False  # plain TCP to a broker that is not on this machine
    ca_file: PathField | None = None  # None: the system's trust store
    cert_file: PathField | None = None  # client certificate (mTLS)
    key_file: SecretFile | None = None  # its private key, mode 0600
    server_name: str | None = Field(None, min_length=1, max_length=253)  # SNI and name to verify
    alpn: list[str] = Field(default_factory=list)  # e.g. ["x-amzn-mqtt-ca"] for AWS IoT Core on port 443
    # Password authentication, where the broker uses it (never inline: a 0600 file).
    username: str | None = Field(None, min_length=1, max_length=256)
    password_file: SecretFile | None = None
    azure_hub: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9-]+$")
    topic_prefix: str = Field(
        "edgetwin/v1", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"
    )
    keepalive_s: int = Field(60, ge=5, le=1200)
    connect_timeout_s: float = Field(10.0, gt=0, le=120)
    max_inflight: int = Field(256, ge=1, le=65535)  # leased, not yet acknowledged
    batch: int = Field(64, ge=1, le=4096)  # records leased per outbox call
    # Backlog replay after an outage, behind live data: set these to the broker's quota.
    replay_msgs_per_s: float = Field(500.0, gt=0)
    replay_bytes_per_s: float = Field(2_000_000.0, gt=0)
    # Features windows of one subject held up to batch_s and sent as one message of at most
    # batch_bytes (several windows share the topic, sequence record and header: docs/records.md);
    # 0: each window as soon as it is stored.  Alarms, diagnostics, estimates and the status are
    # never held, and a held window is already durable in the outbox.
    batch_s: float = Field(0.0, ge=0, le=600)
    batch_bytes: int = Field(4096, ge=256, le=1_000_000)
    reconnect_min_s: float = Field(0.5, gt=0, le=60)
    reconnect_max_s: float = Field(60.0, gt=0, le=3600)
    message_expiry_s: int | None = Field(None, ge=1)  # MQTT 5: the broker drops older undelivered messages
    # MQTT 3.1.1 has no packet size negotiation: a broker just ends the connection of a client that
    # sends a larger packet.  A record whose publish ended this many connections is taken as too
    # large for the broker: alarms and diagnostics are sent without their optional detail, anything
    # else (or what is still too large) goes to the dead-letter lane, so the uplink does not loop.
    oversize_disconnects: int = Field(3, ge=1, le=100)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both (mTLS) or neither")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username")
        if not self.tls and not self.allow_insecure and not is_loopback(self.host):
            raise ValueError(
                f"tls = false to {self.host}, which is not this machine: records would cross the network "
                "in clear text; use TLS, or set allow_insecure = true if you really mean it"
            )
        if not self.tls and (self.cert_file or self.ca_file or self.alpn):
            raise ValueError("ca_file, cert_file and alpn need tls = true")
        if self.profile == "azure":
            if self.protocol != "3.1.1":
                raise ValueError('profile "azure" speaks MQTT 3.1.1 only: set protocol = "3.1.1"')
            if self.azure_hub is None and self.username is None:
                raise ValueError('profile "azure" needs azure_hub (the IoT hub name) or username')
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        if self.message_expiry_s is not None and self.protocol != "5":
            raise ValueError('message_expiry_s needs protocol = "5"')
        return self

    @property
    def verify_name(self) -> str:
        """The host name the server certificate must carry (and the SNI sent)."""
        return self.server_name or self.host
