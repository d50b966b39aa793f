"""Microcontroller sensor nodes over a framed serial link (the firmware bridge protocol)."""
