"""Errors of the downlink: one hierarchy, rooted in the gateway's."""

from __future__ import annotations

from gateway.errors import ConfigError, CorruptDataError


class RefusedError(CorruptDataError):
    """A desired state that is not accepted (signature, expiry, version, hash, target); ``reason`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # short machine-readable word: unsigned, bad-signature, expired, ...


class TrustError(ConfigError):
    """The trust file (the keys the gateway accepts) cannot be used."""


class AuditTamperedError(CorruptDataError):
    """The audit log's hash chain does not verify."""
