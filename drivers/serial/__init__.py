"""Pulse oximeters on RS-232/USB serial: Nonin, Masimo and Contec protocols, a pty simulator."""
