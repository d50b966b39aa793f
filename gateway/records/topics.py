"""Topics a gateway publishes on (``docs/records.md``), built and parsed without the gateway.

``<prefix>/<gateway>/<relative>``, where the relative topic is ``features/<subject>``, ``estimates/<subject>``,
``alarms/<subject>``, ``diag/<subject>``, ``diag/gateway`` or ``status``; Azure IoT Hub has one
static telemetry topic per device and carries the relative topic in its property bag.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

DEFAULT_PREFIX = "edgetwin/v1"


def azure_topic(device_id: str, properties: dict[str, str]) -> str:
    """The device-to-cloud telemetry topic with the record's properties as a property bag."""
    bag = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in properties.items())
    return f"devices/{device_id}/messages/events/{bag}"


def parse_azure_topic(topic: str) -> tuple[str, dict[str, str]] | None:
    """(device id, properties) of an Azure telemetry topic, or None if it is not one."""
    parts = topic.split("/", 4)
    if len(parts) < 4 or parts[0] != "devices" or parts[2:4] != ["messages", "events"]:
        return None
    props: dict[str, str] = {}
    bag = parts[4] if len(parts) == 5 else ""
    for pair in filter(None, bag.split("&")):
        key, _, value = pair.partition("=")
        props[unquote(key)] = unquote(value)
    return parts[1], props


def split_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str, dict[str, str]] | None:
    """(gateway, relative topic, properties from the topic) or None if it is not a gateway topic."""
    azure = parse_azure_topic(topic)
    if azure is not None:
        device, props = azure
        relative = props.pop("topic", "")
        return (device, relative, props) if relative else None
    head = prefix.rstrip("/") + "/"
    if not topic.startswith(head):
        return None
    gateway, _, relative = topic[len(head) :].partition("/")
    if not gateway or not relative:
        return None
    return gateway, relative, {}
