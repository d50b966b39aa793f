"""The MQTT uplink: durable outbox -> MQTT over TLS -> the cloud twin (``docs/records.md``)."""
