"""The MQTT uplink: durable outbox -> MQTT over TLS -> the cloud twin (``docs/records.md``)."""

# gateway.config embeds this package's MqttSection and this package builds on gateway.config:
# importing it here first makes either import order work (see uplink/config.py).
import gateway.config  # noqa: F401
