"""Readiness, status and watchdog notifications to systemd, without libsystemd.

The protocol of sd_notify(3) is one datagram of ``KEY=value`` lines sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET``: a filesystem path, or ``@name`` for a socket in the abstract
namespace.  Nothing here may take the daemon down or stall its event loop: the socket is
non-blocking, a full receive queue (EAGAIN) drops the notification, and a send that fails is
logged once at WARNING when it starts failing and once at INFO when it works again.

A :class:`Notifier` is meant for the event loop's thread only; it keeps no lock.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Mapping

from gateway.errors import EdgetwinError

_log = logging.getLogger(__name__)

_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*\Z")

# systemd reads a notification into a buffer of PIPE_BUF (4096) bytes and ignores a datagram that
# does not fit; capping each value keeps a long error text in STATUS from losing READY=1 with it.
MAX_VALUE_BYTES = 1024


class NotifyFieldError(EdgetwinError, ValueError):
    """A notification field name cannot be sent (not an upper-case sd_notify key)."""


def parse_notify_address(value: str) -> str | None:
    """Return the sendto() address for a ``$NOTIFY_SOCKET`` value, or None if it is unusable."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Linux spells an abstract-namespace address with a leading NUL where systemd writes '@'.
        return "\0" + value[1:]
    return None


def parse_watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """Return the watchdog timeout in microseconds meant for process ``pid``, or None.

    Mirrors sd_watchdog_enabled(3): the timeout counts only when ``WATCHDOG_USEC`` is a positive
    integer and ``WATCHDOG_PID`` is either absent or names ``pid`` (the variables leak into child
    processes, which must not ping on the main process's behalf).
    """
    raw_usec = environ.get("WATCHDOG_USEC")
    if raw_usec is None:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid is None:
        return usec
    try:
        target = int(raw_pid)
    except ValueError:
        return None
    return usec if target == pid else None


def _clean_value(value: str | int) -> str:
    text = str(int(value)) if isinstance(value, int) else value
    # A newline would start a new field, so a status text could forge READY=1 or MAINPID=.
    text = text.replace("\r", " ").replace("\n", " ")
    encoded = text.encode("utf-8", errors="replace")
    if len(encoded) > MAX_VALUE_BYTES:
        text = encoded[:MAX_VALUE_BYTES].decode("utf-8", errors="ignore")
    return text


def format_notification(fields: Mapping[str, str | int]) -> bytes:
    """Encode notification fields as one sd_notify datagram (``KEY=value`` lines, in order)."""
    lines: list[str] = []
    for name, value in fields.items():
        if not _FIELD_NAME.match(name):
            raise NotifyFieldError(
                f"notify field {name!r}: invalid name: sd_notify keys are upper-case letters, digits "
                "and '_': use a key from sd_notify(3) such as READY, STATUS or WATCHDOG"
            )
        lines.append(f"{name}={_clean_value(value)}")
    return "\n".join(lines).encode("utf-8")


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op when not run by systemd."""

    def __init__(self, notify_socket: str | None, *, watchdog_usec: int | None = None) -> None:
        self._raw_address = notify_socket
        self._address = parse_notify_address(notify_socket) if notify_socket else None
        self.enabled: bool = self._address is not None
        self.watchdog_interval_s: float | None = (
            watchdog_usec / 1e6 if self.enabled and watchdog_usec and watchdog_usec > 0 else None
        )
        self.sent = 0
        self.dropped = 0
        self._sock: socket.socket | None = None
        self._failing = False
        self._last_status: str | None = None
        if notify_socket and not self.enabled:
            _log.warning(
                "systemd notify %s: unsupported NOTIFY_SOCKET address: only absolute paths and "
                "'@' abstract names are understood: readiness and watchdog pings are disabled",
                notify_socket,
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Build a notifier from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID in ``environ``."""
        address = environ.get("NOTIFY_SOCKET") or None
        usec = parse_watchdog_usec(environ, os.getpid())
        if usec is None and "WATCHDOG_USEC" in environ:
            _log.debug(
                "systemd notify: watchdog off: WATCHDOG_USEC=%r WATCHDOG_PID=%r, this pid is %d",
                environ.get("WATCHDOG_USEC"),
                environ.get("WATCHDOG_PID"),
                os.getpid(),
            )
        return cls(address, watchdog_usec=usec)

    @property
    def watchdog_ping_interval_s(self) -> float | None:
        """How often to ping: half the timeout, as sd_watchdog_enabled(3) recommends."""
        return None if self.watchdog_interval_s is None else self.watchdog_interval_s / 2

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (READY=1), optionally with a status line."""
        return self._send_with_status({"READY": 1}, status)

    def status(self, text: str) -> bool:
        """Set the status line shown by ``systemctl status``; skipped if it did not change."""
        if text == self._last_status:
            return False
        return self._send_with_status({}, text)

    def watchdog(self) -> bool:
        """Ping the service watchdog (WATCHDOG=1); a no-op unless the watchdog is meant for us."""
        if self.watchdog_interval_s is None:
            return False
        return self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd shutdown has begun (STOPPING=1), optionally with a status line."""
        return self._send_with_status({"STOPPING": 1}, status)

    def send(self, **fields: str | int) -> bool:
        """Send arbitrary sd_notify fields in one datagram; True if the datagram was delivered."""
        return self._deliver(format_notification(fields), ",".join(fields))

    def send_raw(self, text: str) -> bool:
        """Send a preformatted sd_notify message as is; True if the datagram was delivered."""
        first = text.split("=", 1)[0]
        return self._deliver(text.encode("utf-8"), first)

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send_with_status(self, fields: dict[str, str | int], status: str | None) -> bool:
        if status is not None:
            fields["STATUS"] = status
        delivered = self.send(**fields)
        if delivered and status is not None:
            self._last_status = status
        return delivered

    def _deliver(self, datagram: bytes, what: str) -> bool:
        if self._address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(datagram, self._address)
        except OSError as exc:
            # BlockingIOError (EAGAIN: the manager is not reading) lands here too: the message is
            # dropped rather than waited for, since a stalled loop would starve the watchdog anyway.
            self.dropped += 1
            if not self._failing:
                self._failing = True
                _log.warning(
                    "systemd notify %s: cannot send %s: %s: notifications are dropped until the "
                    "socket accepts them again: check that the service manager is running and "
                    "NotifyAccess= allows this process",
                    self._raw_address,
                    what,
                    exc,
                )
            else:
                _log.debug("systemd notify %s: dropped %s: %s", self._raw_address, what, exc)
            return False
        self.sent += 1
        if self._failing:
            self._failing = False
            _log.info(
                "systemd notify %s: sending works again (%d notifications dropped so far)",
                self._raw_address,
                self.dropped,
            )
        return True
