"""The downlink: signed desired state from the twin, applied so it cannot brick the gateway (docs/downlink.md)."""
