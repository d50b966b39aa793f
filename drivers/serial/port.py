"""Opening a serial port for asyncio, with every way it can fail turned into a gateway error.

The transport is pyserial-asyncio-fast's (an ``add_reader`` on the port's file descriptor); the
bytes go straight to a callback, one call per read, so per-byte work stays in the parsers.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable

import serial
import serial_asyncio_fast

from drivers.portlock import in_use_error
from drivers.serial.protocol import LineSettings
from gateway.errors import ConfigError, TransientError

_LOGGER = logging.getLogger(__name__)

#: How long closing a port may take before we stop waiting (the close runs in a worker thread).
CLOSE_DEADLINE_S = 2.0

_PARITY = {"N": serial.PARITY_NONE, "O": serial.PARITY_ODD, "E": serial.PARITY_EVEN}


class DeviceAbsentError(TransientError):
    """The port does not exist (unplugged, or not yet enumerated)."""


class DeviceLostError(TransientError):
    """The port went away while open (unplugged, cable pulled, adapter reset)."""


def is_pty(path: str) -> bool:
    """True when ``path`` (or what it links to) is a pseudo-terminal."""
    return os.path.realpath(path).startswith("/dev/pts/")


def open_port(who: str, path: str, settings: LineSettings) -> serial.Serial:
    """Open and set up a port, non-blocking, locked against other readers, input flushed."""
    parity = settings.parity
    if parity != "N" and is_pty(path):
        # Linux ptys keep no parity setting (PARENB reads back clear and a later tcsetattr fails);
        # they carry bytes, not bits, so there is no parity to check anyway.
        parity = "N"
    try:
        port = serial.Serial(
            path,
            baudrate=settings.baudrate,
            bytesize=settings.bytesize,
            parity=_PARITY[parity],
            stopbits=settings.stopbits,
            timeout=0,
            exclusive=True,
        )
    except ValueError as exc:
        raise ConfigError(
            f"{who} {path}: cannot use line setting {settings}: {exc}: fix baudrate in the config"
        ) from exc
    except serial.SerialException as exc:
        code = exc.errno
        if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            raise DeviceAbsentError(
                f"{who} {path}: port not found: {exc.strerror or exc}: "
                "plug the device in (it is retried) or fix port in the config"
            ) from exc
        if code in (errno.EACCES, errno.EPERM):
            raise ConfigError(
                f"{who} {path}: permission denied: the gateway's user may not open it: "
                "add that user to the 'dialout' group (or fix the udev rule) and restart"
            ) from exc
        if code in (errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK):
            raise in_use_error(who, path) from exc  # names the holder; it is retried
        if code == errno.ENOTTY or "configure" in str(exc):
            raise ConfigError(
                f"{who} {path}: not a serial port: {exc}: point port at a /dev/serial/by-id/... link"
            ) from exc
        raise DeviceAbsentError(f"{who} {path}: cannot open the port: {exc}: it is retried") from exc
    try:
        # Whatever queued up before we opened is old; the stream starts now.
        port.reset_input_buffer()
    except (serial.SerialException, OSError, ValueError):
        _LOGGER.debug("%s %s: could not flush old input", who, path)
    return port


class Link(asyncio.Protocol):
    """An open port: incoming bytes go to ``on_data``; ``lost`` completes when the port goes away."""

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self._on_data = on_data
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.failure: BaseException | None = None  # an error raised by on_data (a bug, re-raised)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport for writes and closing."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Hand the bytes on; an error here must not vanish into the loop's exception handler."""
        if self.failure is not None:
            return
        try:
            self._on_data(data)
        except Exception as exc:  # noqa: BLE001 - re-raised by the owner of the link
            self.failure = exc
            if not self.lost.done():
                self.lost.set_result(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        """The port closed (our close) or failed (device gone)."""
        if not self.lost.done():
            self.lost.set_result(exc)

    def write(self, data: bytes) -> None:
        """Queue bytes for the device."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def aclose(self) -> None:
        """Close the port and wait (bounded, shielded) until it is closed."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        if not self.lost.done():
            await asyncio.shield(asyncio.wait([self.lost], timeout=CLOSE_DEADLINE_S))


async def open_link(who: str, path: str, settings: LineSettings, on_data: Callable[[bytes], None]) -> Link:
    """Open a port and start reading it into ``on_data``."""
    port = open_port(who, path, settings)
    link = Link(on_data)
    try:
        transport, _ = await serial_asyncio_fast.connection_for_serial(
            asyncio.get_running_loop(), lambda: link, port
        )
    except BaseException:
        port.close()
        raise
    # connection_made comes a loop turn later; a start command may be written before that.
    link.transport = transport
    return link
