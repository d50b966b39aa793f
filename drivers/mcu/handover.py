"""Handing a node's port from a running gateway to a firmware push, and back.

The driver holds its port exclusively (``drivers.portlock``).  So that ``edgetwin firmware push``
to a node the gateway serves does not mean stopping the gateway, the driver listens on an
abstract Unix socket named after the port (its device and inode numbers, so every name of the
port meets at one socket).  A push that finds the port taken connects there and sends
``release``; the driver checks the peer's credentials (root or the gateway's own user only),
stops streaming, closes the port and answers ``released``.  The port is the pusher's until it
hangs up (or ``MAX_HOLD_S`` passes); then the driver opens the port again, connects to the
node (a new handshake: the node may run a new image) and reports the gap.  A pusher that dies
hangs up by dying, so the gap is bounded either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from gateway.errors import TransientError

_LOGGER = logging.getLogger(__name__)

MAX_HOLD_S = 900.0  # a push of a full 256 KiB slot at 115200 baud takes about 30 s
_REQUEST_TIMEOUT_S = 5.0
_RELEASE = b"release\n"
_RELEASED = b"released\n"


def socket_name(port: str | os.PathLike[str]) -> str:
    """The abstract socket name of a port: the same for every path that names the device."""
    st = Path(port).stat()
    return f"\0edgetwin-mcu-port:{st.st_dev}:{st.st_ino}"


@dataclass(slots=True)
class _Request:
    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    done: asyncio.Future[None]


class HandoverServer:
    """The driver's side: ``requested`` is set when an authorised pusher wants the port."""

    def __init__(self, port: str | os.PathLike[str], who: str) -> None:
        self.port = port
        self.who = who
        self.requested = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._request: _Request | None = None

    async def __aenter__(self) -> Self:
        """Listen (best effort: without the socket a push is simply refused with the holder's PID)."""
        try:
            self._server = await asyncio.start_unix_server(self._on_client, path=socket_name(self.port))
        except OSError as exc:
            _LOGGER.warning(
                "%s port %s: no firmware push hand-over: %s: a push must wait for this source to stop",
                self.who,
                self.port,
                exc.strerror or exc,
            )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop listening; a waiting pusher is hung up on."""
        req, self._request = self._request, None
        if req is not None and not req.done.done():
            req.done.set_result(None)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        try:
            if uid not in (0, os.getuid()):
                writer.write(b"refused: run the push as root or as the gateway's user\n")
                _LOGGER.warning(
                    "%s port %s: hand-over refused to PID %d (uid %d)", self.who, self.port, pid, uid
                )
                return
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                line = await reader.readline()
            if line != _RELEASE or self._request is not None:
                writer.write(b"refused: one hand-over at a time\n")
                return
            done = asyncio.get_running_loop().create_future()
            self._request = _Request(pid, reader, writer, done)
            self.requested.set()
            await done
        except (TimeoutError, OSError):
            return
        finally:
            writer.close()

    async def hand_over(self) -> tuple[int, float]:
        """With the port closed: tell the pusher, wait until it hangs up; (its PID, seconds held)."""
        req = self._request
        assert req is not None
        t0 = time.monotonic()
        try:
            req.writer.write(_RELEASED)
            async with asyncio.timeout(MAX_HOLD_S):  # the drain too: a pusher that stops reading
                await req.writer.drain()
                while await req.reader.read(256):
                    pass
        except TimeoutError:
            _LOGGER.warning(
                "%s port %s: PID %d held the port %g s: taking it back",
                self.who,
                self.port,
                req.pid,
                MAX_HOLD_S,
            )
        except OSError:
            pass
        finally:
            self._request = None
            self.requested.clear()
            if not req.done.done():
                req.done.set_result(None)
        return req.pid, time.monotonic() - t0


@contextlib.asynccontextmanager
async def port_from_gateway(port: str | os.PathLike[str], who: str) -> AsyncIterator[bool]:
    """The pusher's side: ask a running driver for ``port``; yields False when none serves it.

    While the block runs the port is ours; leaving it hands the port back.
    """
    try:
        reader, writer = await asyncio.open_unix_connection(socket_name(port))
    except OSError:
        yield False
        return
    try:
        writer.write(_RELEASE)
        await writer.drain()
        async with asyncio.timeout(10.0):
            answer = await reader.readline()
        if answer != _RELEASED:
            text = answer.decode(errors="replace").strip() or "no answer"
            raise TransientError(f"{who} port {port}: the gateway's source did not release it: {text}")
        yield True
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(2.0):
                await writer.wait_closed()
