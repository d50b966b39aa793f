"""The control socket: a Unix socket that answers ``status`` with the latest snapshot as JSON.

Mode 0660, group ``edgetwin`` (when that group exists): root and the group may read the state,
nobody else may even connect.  One request per connection, one line each way, bounded in time
and size; the server never blocks the event loop on a slow client.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, TransientError
from gateway.observe.status import StatusBoard

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT_S = 2.0
_MAX_REQUEST = 256


def _in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class ControlServer:
    """Serves the board's snapshot on a Unix socket and refreshes it every ``refresh_s``."""

    def __init__(self, path: Path, board: StatusBoard, *, group: str, refresh_s: float) -> None:
        self.path = path
        self._board = board
        self._group = group
        self._refresh_s = refresh_s
        self.last_beat = 0.0

    def _prepare(self) -> None:
        where = f"status socket {self.path}"
        if not self.path.parent.is_dir():
            raise ConfigError(
                f"{where}: directory {self.path.parent} does not exist: "
                "set RuntimeDirectory=edgetwin in the unit, or status.socket to a path in an existing directory"
            )
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ConfigError(
                    f"{where}: something that is not a socket is there: remove it or pick another path"
                )
            if _in_use(self.path):
                raise ConfigError(
                    f"{where}: another gateway answers on it: give each gateway its own status.socket"
                )
            self.path.unlink()  # left by a gateway that died

    def _restrict(self) -> None:
        self.path.chmod(0o660)
        try:
            gid = grp.getgrnam(self._group).gr_gid
        except KeyError:
            return  # no such group here (a development machine): owner only, through the directory
        with contextlib.suppress(PermissionError):  # not root and not a member: keep our own group
            os.chown(self.path, -1, gid)

    async def run(self, started: Callable[[], None]) -> None:
        """Serve until cancelled (a supervised unit)."""
        self._prepare()
        await self._board.refresh()
        try:
            server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        except OSError as exc:
            raise TransientError(
                f"status socket {self.path}: cannot listen: {exc.strerror}: retrying"
            ) from exc
        try:
            self._restrict()
            log.info("status: answering on %s", self.path)
            started()
            loop = asyncio.get_running_loop()
            while True:
                self.last_beat = loop.time()
                await asyncio.sleep(self._refresh_s)
                await self._board.refresh()
        finally:
            server.close()
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT_S)
            request = line[:_MAX_REQUEST].decode(errors="replace").strip()
            if request == "status":
                # Composed now (cheap); only the outbox's figures come from the last refresh.
                body: Any = self._board.compose() if self._board.snapshot else await self._board.refresh()
            else:
                body = {"error": f"unknown request {request[:40]!r}: send 'status'"}
            writer.write(json.dumps(body, separators=(",", ":")).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), _REQUEST_TIMEOUT_S)
        except (TimeoutError, ConnectionError) as exc:
            log.debug("status: a client went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), _REQUEST_TIMEOUT_S)


class StatusUnavailableError(TransientError):
    """No gateway answers on the control socket."""


def query(path: Path, timeout_s: float = 5.0) -> dict[str, Any]:
    """Ask the gateway behind ``path`` for its snapshot."""
    where = f"edgetwin status {path}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
            sock.sendall(b"status\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except FileNotFoundError as exc:
            raise StatusUnavailableError(
                f"{where}: no socket there: is the gateway running? (systemctl status edgetwin)"
            ) from exc
        except PermissionError as exc:
            raise StatusUnavailableError(
                f"{where}: permission denied: run as root or as a member of the edgetwin group"
            ) from exc
        except ConnectionRefusedError as exc:
            raise StatusUnavailableError(f"{where}: nothing answers: the gateway is not running") from exc
        except TimeoutError as exc:
            raise StatusUnavailableError(
                f"{where}: no answer within {timeout_s:g} s: the gateway is stuck"
            ) from exc
    try:
        data: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise StatusUnavailableError(f"{where}: the answer is not JSON: {exc}") from exc
    return data
