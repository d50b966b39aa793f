"""The ``[uplink.sparkplug]`` section: group, edge node id and primary host of a Sparkplug B edge node."""

from __future__ import annotations

from pydantic import Field

from gateway.config_base import ConfigModel

# Sparkplug ids are UTF-8 without the MQTT wildcards and the topic separator.
_ID = r"^[^+/#\s]+$"


class SparkplugSection(ConfigModel):
    """Keys of ``[uplink.sparkplug]`` (used with ``[uplink] encoding = "sparkplug"``)."""

    group_id: str = Field("edgetwin", min_length=1, max_length=64, pattern=_ID)
    # None: the gateway's pseudonym, never a host name or serial number.
    edge_node_id: str | None = Field(None, min_length=1, max_length=64, pattern=_ID)
    # The Sparkplug host id of the primary host application: with it, nothing is published until
    # its STATE says online, and the session ends when it goes offline (records stay queued).
    primary_host: str | None = Field(None, min_length=1, max_length=64, pattern=_ID)
