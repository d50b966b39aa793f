"""Microcontroller sensor nodes over a framed serial link: the gateway's side and the node's reference.

* :mod:`firmware_bridge.framing` - COBS frames with a CRC-16, the resynchronising stream decoder.
* :mod:`firmware_bridge.messages` - message bodies (hello, channels, sample batches, ack/nack,
  errors, time sync, firmware update, reboot).
* :mod:`firmware_bridge.timesync` - node ticks to gateway time (offset and drift).
* :mod:`firmware_bridge.manifest` - Ed25519-signed firmware manifests and the checks before sending.
* :mod:`firmware_bridge.build` - builds the host simulated node from ``firmware/``.
* ``firmware/`` - the node side in portable C (no dynamic allocation) with its unit tests, a
  decoder fuzzer and the simulated node; ``PROTOCOL.md`` - the protocol and its test vectors.

The gateway-side driver (``drivers.mcu``) plugs into the driver registry like any other source.
"""
