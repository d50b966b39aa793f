"""Microcontroller sensor nodes over a framed serial link (frames, CRC, resync).

The framing codec and its node-side reference live here; the gateway-side driver plugs into the
driver registry like any other source.
"""
