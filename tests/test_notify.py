"""sd_notify over real AF_UNIX datagram sockets owned by the test."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.notify import (
    MAX_VALUE_BYTES,
    Notifier,
    NotifyFieldError,
    format_notification,
    parse_notify_address,
)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


def _no_more(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_unset_notify_socket_is_a_noop() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "30000000"})
    assert n.enabled is False
    assert n.watchdog_interval_s is None
    assert n.ready("up") is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.stopping() is False
    assert n.sent == 0
    assert n.dropped == 0


def test_ready_status_watchdog_stopping_exact_datagrams(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    n = Notifier.from_env(env)
    assert n.enabled is True
    assert n.watchdog_interval_s == 30.0
    assert n.watchdog_ping_interval_s == 15.0

    assert n.ready() is True
    assert sock.recv(4096) == b"READY=1"
    assert n.ready("running: 3 drivers") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=running: 3 drivers"
    assert n.status("draining outbox") is True
    assert sock.recv(4096) == b"STATUS=draining outbox"
    assert n.watchdog() is True
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.stopping() is True
    assert sock.recv(4096) == b"STOPPING=1"
    assert n.stopping("stopping: drain 15 s") is True
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping: drain 15 s"
    assert n.sent == 6
    _no_more(sock)
    n.close()


def test_status_skips_repeats(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.ready("a") is True
    assert n.status("a") is False  # same text as READY carried
    assert n.status("b") is True
    assert n.status("b") is False
    assert n.status("a") is True
    assert [sock.recv(4096) for _ in range(3)] == [b"READY=1\nSTATUS=a", b"STATUS=b", b"STATUS=a"]
    _no_more(sock)
    n.close()


def test_send_and_send_raw(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.send(EXTEND_TIMEOUT_USEC=20_000_000, STATUS="loading model") is True
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=20000000\nSTATUS=loading model"
    assert n.send_raw("RELOADING=1\nMONOTONIC_USEC=42") is True
    assert sock.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=42"
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"edgetwin-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.enabled is True
        assert n.ready("up") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        n.close()
    finally:
        sock.close()


def test_watchdog_pid_mismatch_disables_watchdog(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    n = Notifier.from_env(env)
    assert n.enabled is True
    assert n.watchdog_interval_s is None
    assert n.watchdog() is False
    _no_more(sock)
    # readiness still goes out: only the watchdog belongs to another process
    assert n.ready() is True
    sock.setblocking(True)
    assert sock.recv(4096) == b"READY=1"
    n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "2500000"}, 2.5),  # no WATCHDOG_PID: meant for us
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "me"}, None),
        ({}, None),
    ],
)
def test_watchdog_usec_parsing(env: dict[str, str], expected: float | None) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert n.watchdog_interval_s == expected


def test_unsupported_address_disables(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.notify")
    n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000000"})
    assert n.enabled is False
    assert n.watchdog_interval_s is None
    assert n.ready() is False
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert parse_notify_address("relative/sock") is None
    assert parse_notify_address("@") is None
    assert parse_notify_address("@x") == "\0x"


def test_vanished_socket_never_raises_and_logs_state_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.notify")
    path = tmp_path / "n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
    assert n.ready() is True
    sock.close()
    path.unlink()

    assert n.watchdog() is False
    assert n.status("still here") is False
    assert n.watchdog() is False
    assert n.dropped == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the change to failing, not every attempt

    # The manager comes back on the same path: the next send goes through and is logged once.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        assert n.status("still here") is True  # not skipped: the earlier one was never delivered
        assert sock.recv(4096) == b"STATUS=still here"
    finally:
        sock.close()
    assert [r.levelno for r in caplog.records if r.levelno >= logging.INFO] == [
        logging.WARNING,
        logging.INFO,
    ]
    n.close()


def test_full_queue_drops_instead_of_blocking(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    results: list[bool] = []

    def flood() -> None:
        # Linux queues only net.unix.max_dgram_qlen (default 10) unread datagrams per socket.
        results.extend(n.watchdog() for _ in range(500))

    worker = threading.Thread(target=flood, name="notify-flood", daemon=True)
    worker.start()
    worker.join(timeout=5.0)
    assert not worker.is_alive(), "a notification blocked on a full socket queue"
    assert results.count(False) == n.dropped > 0
    assert results.count(True) == n.sent > 0
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.close()


def test_format_notification_is_safe() -> None:
    assert format_notification({"STATUS": "a\nREADY=1", "ERRNO": 5}) == b"STATUS=a READY=1\nERRNO=5"
    assert format_notification({"READY": True}) == b"READY=1"
    long = format_notification({"STATUS": "é" * MAX_VALUE_BYTES})
    assert len(long) <= len(b"STATUS=") + MAX_VALUE_BYTES
    long.decode("utf-8")  # truncation never splits a character
    with pytest.raises(NotifyFieldError):
        format_notification({"ready": 1})
    with pytest.raises(NotifyFieldError):
        format_notification({"STATUS\nREADY": 1})
