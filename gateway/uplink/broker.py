"""A local MQTT broker with TLS and client-certificate authentication, for the demo and the tests.

:class:`MosquittoBroker` writes a mosquitto configuration (one TLS listener on a free loopback
port, ``require_certificate true``, the client certificate's CN as user name), starts mosquitto as
a child process and stops it by its process id.  It can be stopped and started again on the same
port, which is how the tests cut the link.  Where mosquitto is not installed,
:func:`local_broker` falls back to an embedded broker (amqtt, MQTT 3.1.1 over TLS only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from gateway.errors import ConfigError, TransientError
from gateway.uplink.certs import DemoPKI

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _accepting(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class LocalBroker(Protocol):
    """What the demo and the tests need from a local broker."""

    host: str
    port: int
    protocols: tuple[str, ...]  # MQTT versions it speaks over TLS

    def start(self) -> None:
        """Start listening (again, on the same port)."""

    def stop(self) -> None:
        """Stop; clients lose their connections."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class _PortTakenError(Exception):
    """mosquitto could not bind the port picked for it: another process took it first."""


class MosquittoBroker:
    """mosquitto on a loopback port: TLS 1.2+, client certificates required, stopped by PID."""

    protocols = ("5", "3.1.1")

    def __init__(
        self,
        workdir: Path,
        pki: DemoPKI,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        executable: str | None = None,
        persistence: bool = False,
        max_packet_size: int | None = None,
        max_inflight_messages: int | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        exe = (
            executable
            or shutil.which("mosquitto")
            or next(
                (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
            )
        )
        if exe is None:
            raise ConfigError(
                "broker: mosquitto is not installed: install it (apt-get install mosquitto) "
                "or use the embedded broker"
            )
        self.executable = exe
        self.workdir = workdir
        self.pki = pki
        self.host = host
        self.port = port or free_port(host)
        # A port we picked may be taken between the pick and mosquitto's bind: the first start then
        # picks another (a port the caller named is kept, and so is a port once listened on).
        self._may_repick = port is None
        self.log_file = workdir / "mosquitto.log"
        self.conf_file = workdir / "mosquitto.conf"
        self.persistence = persistence  # keep sessions and queued messages across a restart
        # Sent to MQTT 5 clients in CONNACK; a client sending a larger packet loses its connection.
        self.max_packet_size = max_packet_size
        # Sent to MQTT 5 clients as Receive Maximum: QoS 1 publishes in flight at once.
        self.max_inflight_messages = max_inflight_messages
        self.wrapper = wrapper  # mosquitto runs under it, e.g. ("ip", "netns", "exec", NAME)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The running broker's process id."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _config(self) -> str:
        lines = [
            "per_listener_settings false",
            "allow_anonymous false",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            # Slow subscribers (a twin under load) must not lose QoS 1 messages to a queue limit.
            "max_queued_messages 1000000",
            *([f"max_packet_size {self.max_packet_size}"] if self.max_packet_size else []),
            *([f"max_inflight_messages {self.max_inflight_messages}"] if self.max_inflight_messages else []),
            f"listener {self.port} {self.host}",
            f"cafile {self.pki.ca_file}",
            f"certfile {self.pki.server.cert}",
            f"keyfile {self.pki.server.key}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
        if os.geteuid() == 0:
            # Run as root only in a test container: mosquitto would switch to its own user, which
            # cannot read the throwaway keys written with mode 0600.
            lines.insert(0, "user root")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start mosquitto and wait until it accepts connections."""
        if self.pid is not None:
            return
        for attempt in range(3):
            # The last try raises the broker's own error (its log says the port is in use).
            self._may_repick = self._may_repick and attempt < 2
            try:
                self._start_once()
            except _PortTakenError:
                self.port = free_port(self.host)
                continue
            break
        self._may_repick = False

    def _start_once(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_file.write_text(self._config())
        logged = self.log_file.stat().st_size if self.log_file.exists() else 0
        self._proc = subprocess.Popen(  # noqa: S603
            [*self.wrapper, self.executable, "-c", str(self.conf_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            said = self._log_since(logged)
            if self._proc.poll() is not None:
                if self._may_repick and "Address already in use" in said:
                    raise _PortTakenError
                raise TransientError(
                    f"broker mosquitto {self.host}:{self.port}: exited with code {self._proc.returncode}: "
                    f"{self.log_tail()}: see {self.log_file}"
                )
            # Its own "running" line first: a connection alone may reach another listener on the port.
            if " running\n" in said and _accepting(self.host, self.port):
                log.debug("mosquitto %d listening on %s:%d", self._proc.pid, self.host, self.port)
                return
            time.sleep(0.02)
        self.stop()
        raise TransientError(
            f"broker mosquitto {self.host}:{self.port}: not listening after {_START_TIMEOUT_S:.0f} s: "
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM, then SIGKILL after a grace period) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=_STOP_TIMEOUT_S)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the broker's log, for error messages."""
        try:
            return " | ".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.shield(asyncio.to_thread(self.stop))


class EmbeddedBroker:
    """An amqtt broker in this process: MQTT 3.1.1 over TLS (amqtt does not do MQTT 5 over TLS)."""

    protocols = ("3.1.1",)

    def __init__(
        self, workdir: Path, pki: DemoPKI, *, host: str = "127.0.0.1", port: int | None = None
    ) -> None:
        try:
            from amqtt.broker import Broker  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigError(
                "broker: neither mosquitto nor amqtt is installed: install mosquitto "
                "(apt-get install mosquitto) or amqtt (pip install amqtt)"
            ) from exc
        self._broker_cls = Broker
        self.workdir = workdir
        self.pki = pki
        self.host = host
        self.port = port or free_port(host)
        self._broker: object | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _config(self) -> dict[str, object]:
        return {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{self.host}:{self.port}",
                    "ssl": True,
                    "cafile": str(self.pki.ca_file),
                    "certfile": str(self.pki.server.cert),
                    "keyfile": str(self.pki.server.key),
                }
            },
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    async def _astart(self) -> None:
        broker = self._broker_cls(self._config())
        await broker.start()
        self._broker = broker

    async def _astop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            with contextlib.suppress(Exception):
                await broker.shutdown()  # type: ignore[attr-defined]

    def start(self) -> None:
        """Not available synchronously: use ``async with``."""
        raise RuntimeError("EmbeddedBroker: use 'async with' (it runs on the event loop)")

    def stop(self) -> None:
        """Not available synchronously: use ``async with``."""
        raise RuntimeError("EmbeddedBroker: use 'async with' (it runs on the event loop)")

    async def __aenter__(self) -> Self:
        await self._astart()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.shield(self._astop())


def mosquitto_available() -> bool:
    """True when a mosquitto executable is installed."""
    return shutil.which("mosquitto") is not None or any(
        Path(p).exists() for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
    )


def local_broker(workdir: Path, pki: DemoPKI, *, port: int | None = None) -> MosquittoBroker | EmbeddedBroker:
    """Mosquitto where installed, otherwise the embedded broker."""
    if mosquitto_available():
        return MosquittoBroker(workdir, pki, port=port)
    log.info("mosquitto is not installed: using the embedded broker (MQTT 3.1.1 over TLS)")
    return EmbeddedBroker(workdir, pki, port=port)
