"""The twin's errors (its own hierarchy: the twin imports nothing of the gateway but its records)."""

from __future__ import annotations


class TwinError(Exception):
    """Base of every error the twin raises on purpose."""


class TwinConfigError(TwinError):
    """The twin's options cannot work (TLS files that do not load, a bad option)."""


class TwinAuthError(TwinError):
    """The broker refused the twin's identity or subscription."""


class TwinConnectError(TwinError):
    """The broker cannot be reached now; retrying later may work."""
