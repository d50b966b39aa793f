"""The records package's errors: what a reader raises on bytes it cannot take as a record.

Separate from ``gateway.errors`` on purpose: the twin and other consumers import this package
alone, without the gateway.
"""

from __future__ import annotations


class RecordError(Exception):
    """Base of every error this package raises."""


class CorruptRecordError(RecordError, ValueError):
    """The bytes are not a well-formed record (bad CBOR, a missing field, an unknown must-understand field)."""


class UnsupportedVersionError(RecordError):
    """The record was written under a newer major schema version than this reader knows."""
