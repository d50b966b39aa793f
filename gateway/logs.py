"""Logging to stderr with journald level prefixes (``<3>`` error ... ``<7>`` debug), or JSON lines.

journald reads the ``<N>`` prefix of each line as its priority, so ``journalctl -p warning`` works
without libsystemd.  Outside journald a timestamp is added for people reading a terminal.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``; with a timestamp when stderr is not the journal."""

    def __init__(self, *, timestamps: bool) -> None:
        super().__init__()
        self._timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        """Format one record, one line per line of the message, each with the prefix."""
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
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
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send all logging to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter() if fmt == "json" else JournalFormatter(timestamps=not under_journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
