"""The gateway's error hierarchy.

Every error raised by edgetwin code derives from :class:`EdgetwinError`.  The supervisor decides
what to do with a failing unit from the error's *class* alone (see ``gateway.supervisor``):

* :class:`TransientError` - the peer went away, a timeout, a broken link: retry with capped,
  jittered exponential backoff.
* :class:`AuthError` - the peer refused our credentials or certificate: retrying fast only
  locks accounts and fills logs, so retry with a long backoff.
* :class:`ClockBehindError` - a transient error: a certificate not valid yet by our clock, which
  is behind (a Pi without a real-time clock before NTP has set it).
* :class:`ConfigError` - the configuration cannot work: never retry; report and keep the rest of
  the gateway running.

Messages follow ``<who> <where>: <what>: <why>: <what to do>`` so a technician reading the journal
knows which unit failed, on which device, and what to try next.
"""

from __future__ import annotations

import datetime as dt


class EdgetwinError(Exception):
    """Base of every error edgetwin raises on purpose."""


class ConfigError(EdgetwinError):
    """The configuration cannot work; retrying will not help."""


class TransientError(EdgetwinError):
    """A failure that may clear by itself (link down, timeout, peer restarting)."""


class ClockBehindError(TransientError):
    """A peer's certificate is not valid yet by this machine's clock: the clock is behind (it clears once set right)."""

    def __init__(self, message: str, valid_from: dt.datetime | None = None) -> None:
        super().__init__(message)
        self.valid_from = valid_from  # the certificate's notBefore (a datetime), when it could be read


class AuthError(EdgetwinError):
    """The peer refused our identity (credentials, certificate, permissions)."""


class CorruptDataError(EdgetwinError):
    """Stored or received data failed an integrity check."""


class AnonymizationError(EdgetwinError):
    """A record could not be proven free of identifiers; it must not leave the gateway."""


class ConfigProblem:
    """One problem found in a configuration file: where, what was expected, what was found."""

    __slots__ = ("expected", "file", "found", "path")

    def __init__(self, file: str, path: str, expected: str, found: str) -> None:
        self.file = file
        self.path = path
        self.expected = expected
        self.found = found

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: expected {self.expected}, found {self.found}"

    def __repr__(self) -> str:
        return f"ConfigProblem({self!s})"


class InvalidConfigError(ConfigError):
    """A configuration file has one or more problems; all of them are listed."""

    def __init__(self, file: str, problems: list[ConfigProblem]) -> None:
        self.file = file
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(
            f"config {file}: {len(problems)} problem(s):\n{lines}\n"
            f"fix these keys and run 'edgetwin check --config {file}' again"
        )
