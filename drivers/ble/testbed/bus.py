"""A private D-Bus daemon on a unix socket in a temporary directory: the air of the emulated radio.

Everything runs as child processes started and stopped by PID from ordinary (non-async) code, so
the event loop that runs bleak never owns them. Every wait is bounded.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from gateway.errors import ConfigError, TransientError

_LOGGER = logging.getLogger(__name__)

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>edgetwin_testbed</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow send_destination="*"/>
  </policy>
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="max_message_size">33554432</limit>
  <limit name="max_replies_per_connection">100000</limit>
</busconfig>
"""


def read_line(proc: subprocess.Popen[bytes], timeout_s: float, what: str) -> str:
    """One line from a child's stdout within ``timeout_s``; TransientError if none came."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransientError(f"testbed {what}: no answer within {timeout_s:g} s: see its log")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1)
        if not chunk:
            raise TransientError(f"testbed {what}: exited (code {proc.poll()}) before answering: see its log")
        buf += chunk
    return buf.decode("utf-8", "replace").strip()


def stop_process(proc: subprocess.Popen[bytes], what: str, timeout_s: float = 3.0) -> None:
    """Terminate a child we started, by its PID; kill it if it does not exit in time."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _LOGGER.warning(
            "testbed %s (pid %d): did not stop on SIGTERM within %g s, killing", what, proc.pid, timeout_s
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass


class PrivateBus:
    """A ``dbus-daemon`` of our own; ``address`` goes into ``DBUS_SYSTEM_BUS_ADDRESS``."""

    def __init__(self, start_timeout_s: float = 5.0) -> None:
        self._start_timeout_s = start_timeout_s
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self) -> str:
        """Start the daemon and return its address."""
        exe = shutil.which("dbus-daemon")
        if exe is None:
            raise ConfigError(
                "testbed bus: dbus-daemon not found: it is needed for the emulated radio: "
                "install the Debian package dbus-daemon"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="edgetwin-ble-"))
        sock = self._dir / "bus"
        conf = self._dir / "bus.conf"
        conf.write_text(_CONFIG.format(socket=sock), encoding="utf-8")
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [exe, "--nofork", "--nopidfile", "--print-address=1", f"--config-file={conf}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            self.address = read_line(self._proc, self._start_timeout_s, "dbus-daemon")
        except BaseException:
            self.stop()
            raise
        _LOGGER.debug("testbed bus: dbus-daemon pid %d at %s", self._proc.pid, self.address)
        return self.address

    def stop(self) -> None:
        """Stop the daemon (by PID) and remove its directory."""
        if self._proc is not None:
            stop_process(self._proc, "dbus-daemon")
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PrivateBus:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
