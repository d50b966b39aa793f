"""The twin's side: decode what gateways publish, check their sequences, keep the latest state.

It depends on ``gateway.records`` alone (and paho-mqtt for ``listen``), never on the gateway's
configuration, pipeline or uplink, so a gateway change cannot break it unnoticed.
"""
