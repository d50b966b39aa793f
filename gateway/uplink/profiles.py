"""What each kind of broker allows (STANDARDS.md section 4), as data, and the checks against it.

The checks are pure so they can be run offline, against a limits table, without the cloud: a
topic too deep for AWS IoT or a payload too big for Azure IoT Hub is found in a test, not in the
field.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Profile:
    """The limits of one kind of MQTT endpoint."""

    name: str
    max_client_id_bytes: int
    max_topic_bytes: int
    max_topic_slashes: int | None
    max_payload_bytes: int
    max_qos: int
    retain: bool  # retained messages are supported
    publishes_per_s: float | None  # per connection; None: no documented limit
    bytes_per_s: float | None
    keepalive_range_s: tuple[int, int]
    protocols: tuple[str, ...]
    static_topic: bool  # one fixed telemetry topic; the relative topic travels as properties

    def problems(self, *, client_id: str, topic: str, payload_bytes: int, qos: int = 1) -> list[str]:
        """What breaks this profile's rules in one publish, as readable sentences (empty: fine)."""
        out: list[str] = []
        cid = client_id.encode()
        if len(cid) > self.max_client_id_bytes:
            out.append(f"client id of {len(cid)} bytes exceeds {self.max_client_id_bytes}")
        if client_id.startswith("$"):
            out.append("client id starts with '$'")
        tb = topic.encode()
        if len(tb) > self.max_topic_bytes:
            out.append(f"topic of {len(tb)} bytes exceeds {self.max_topic_bytes}")
        if self.max_topic_slashes is not None and topic.count("/") > self.max_topic_slashes:
            out.append(f"topic has {topic.count('/')} slashes, more than {self.max_topic_slashes}")
        if any(c in topic for c in "+#\x00"):
            out.append("topic holds a wildcard or NUL")
        if payload_bytes > self.max_payload_bytes:
            out.append(f"payload of {payload_bytes} bytes exceeds {self.max_payload_bytes}")
        if qos > self.max_qos:
            out.append(f"QoS {qos} above {self.max_qos}")
        return out

    def check_keepalive(self, keepalive_s: int) -> str | None:
        """Why a keepalive does not suit this profile, or None."""
        low, high = self.keepalive_range_s
        if not low <= keepalive_s <= high:
            return f"keepalive {keepalive_s} s outside {low}..{high} s"
        return None


GENERIC = Profile(
    "generic",
    max_client_id_bytes=65535,
    max_topic_bytes=65535,
    max_topic_slashes=None,
    max_payload_bytes=256 * 1024 * 1024 - 1,
    max_qos=1,  # the uplink publishes at QoS 1; QoS 2 buys nothing the sequence numbers do not
    retain=True,
    publishes_per_s=None,
    bytes_per_s=None,
    keepalive_range_s=(5, 65535),
    protocols=("5", "3.1.1"),
    static_topic=False,
)

AWS = Profile(
    "aws",
    max_client_id_bytes=128,
    max_topic_bytes=256,
    max_topic_slashes=7,
    max_payload_bytes=128 * 1024,
    max_qos=1,
    retain=True,
    publishes_per_s=100.0,
    bytes_per_s=512 * 1024,
    keepalive_range_s=(30, 1200),
    protocols=("5", "3.1.1"),
    static_topic=False,
)

AZURE = Profile(
    "azure",
    max_client_id_bytes=128,
    max_topic_bytes=65535,
    max_topic_slashes=None,
    max_payload_bytes=256 * 1024,
    max_qos=1,  # QoS 2 closes the connection
    retain=False,
    publishes_per_s=None,
    bytes_per_s=None,
    keepalive_range_s=(5, 1177),
    protocols=("3.1.1",),
    static_topic=True,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (GENERIC, AWS, AZURE)}

AZURE_API_VERSION = "2021-04-12"


def azure_username(hub: str, device_id: str) -> str:
    """The MQTT user name Azure IoT Hub expects for a device."""
    return f"{hub}.azure-devices.net/{device_id}/?api-version={AZURE_API_VERSION}"
