"""Logging to stderr with journald level prefixes (``<3>`` error ... ``<7>`` debug), or JSON lines.

journald reads the ``<N>`` prefix of each line as its priority, so ``journalctl -p warning`` works
without libsystemd.  Outside journald a timestamp is added for people reading a terminal.

Logs may leave the gateway (a support bundle, a central journal), so they carry no identity by
default: every identity the gateway knows (subject ids, serial numbers, MAC and BLE addresses,
ports and endpoints from the config, and any a driver learns and declares with
:func:`register_identity`) is replaced in every formatted line, traceback included, by a label
that names it by source and pseudonym (``subject~k3n...``, ``bed7-monitor.device``).  Raw
identities appear only when the config turns ``logging.identities`` on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


MIN_IDENTITY_CHARS = 4  # shorter strings would blank out ordinary words


class IdentityRedactor:
    """Replaces known identities in log text with their labels; thread-safe, case-blind."""

    def __init__(self) -> None:
        self._labels: dict[str, str] = {}  # lower-cased form -> label
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()
        self.enabled = True

    def add(self, identity: str, label: str) -> None:
        """Name ``identity`` as ``label`` in logs, in its compact (``A4C1...``) and D-Bus (``A4_C1_...``) forms too."""
        forms = {identity, re.sub(r"[:\-\s.]", "", identity), re.sub(r"[:\-]", "_", identity)}
        with self._lock:
            fresh = False
            for form in forms:
                key = form.lower()
                if len(key) >= MIN_IDENTITY_CHARS and key not in self._labels:
                    self._labels[key] = label
                    fresh = True
            if fresh:
                # Longest first: an identity that contains another is replaced whole.
                alternatives = sorted(self._labels, key=len, reverse=True)
                self._pattern = re.compile("|".join(map(re.escape, alternatives)), re.IGNORECASE)

    def clear(self) -> None:
        """Forget every identity (a new run, a test)."""
        with self._lock:
            self._labels.clear()
            self._pattern = None

    def __call__(self, text: str) -> str:
        """``text`` with every known identity replaced by its label."""
        pattern = self._pattern
        if pattern is None or not self.enabled:
            return text
        labels = self._labels
        return pattern.sub(lambda m: labels.get(m.group(0).lower(), "~"), text)


#: The process's redactor: the formatters below apply it to every line.
REDACTOR = IdentityRedactor()


def register_identity(identity: str, label: str) -> None:
    """Declare an identity learned at run time (a serial number a device reports, an address seen)."""
    REDACTOR.add(identity, label)


def _message(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
        text += "\n" + formatter.formatException(record.exc_info)
    return REDACTOR(text)


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``; with a timestamp when stderr is not the journal."""

    def __init__(self, *, timestamps: bool) -> None:
        super().__init__()
        self._timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        """Format one record, one line per line of the message, each with the prefix."""
        text = _message(self, record)
        prefix = f"<{priority(record.levelno)}>"
        if self._timestamps:
            prefix += time.strftime("%H:%M:%S", time.localtime(record.created)) + " "
        return "\n".join(f"{prefix}{record.name}: {line}" for line in text.splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, priority, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record as JSON."""
        obj = {
            "t": round(record.created, 3),
            "priority": priority(record.levelno),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": REDACTOR(record.getMessage()),
        }
        if record.exc_info:
            obj["exc"] = REDACTOR(self.formatException(record.exc_info))
        return json.dumps(obj)


def setup(level: str = "info", fmt: str = "text", *, identities: bool = False) -> None:
    """Send all logging to stderr in the chosen format; raw identities only if ``identities``."""
    REDACTOR.enabled = not identities
    handler = logging.StreamHandler(sys.stderr)
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter() if fmt == "json" else JournalFormatter(timestamps=not under_journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
