"""A userspace TCP proxy on loopback that plays network faults between the gateway and the broker.

For kernels without ``sch_netem`` (and without iptables/nft) the campaign's network rows need
another way to delay, black-hole, cut and reset a link.  This proxy relays bytes (TLS passes
through untouched) and, switched at run time:

* ``latency(s)``: holds every chunk ``s`` seconds in each direction, order kept;
* ``stall()``: forwards nothing any more and answers nothing, on existing and new connections
  (a broker that accepts TCP and never answers, a link that black-holes packets);
* ``cut()``: resets every connection and every new one at once (a link or broker gone);
* ``resets(p)``: resets a connection in place of forwarding a chunk, with probability ``p``;
* ``clear()``: back to plain relaying.

It runs its own event loop in a thread, so the code under test keeps its loop to itself.
Connections go only to the given loopback upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from types import TracebackType
from typing import Self

_CHUNK = 65536


class TcpProxy:
    """Listen on 127.0.0.1:<free port>, relay to ``upstream``, with faults switched at run time."""

    def __init__(self, upstream_host: str, upstream_port: int, *, seed: int = 1) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.delay_s = 0.0
        self.stalled = False
        self.cutting = False
        self.reset_p = 0.0
        self.connections = 0  # accepted so far
        self.resets_made = 0
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- faults, callable from any thread --------------------------------------------------------------

    def latency(self, seconds: float) -> None:
        """Hold every chunk this long in each direction (0: none)."""
        self.delay_s = seconds

    def stall(self) -> None:
        """Forward nothing, answer nothing, on every connection, old and new."""
        self.stalled = True

    def cut(self) -> None:
        """Reset every connection now, and each new one as it comes."""
        self.cutting = True
        self._call(self._reset_all)

    def resets(self, p: float) -> None:
        """Reset a connection in place of forwarding a chunk, with probability ``p``."""
        self.reset_p = p

    def clear(self) -> None:
        """Relay plainly again; stalled connections are reset, as a black hole ends in a timeout."""
        was_stalled = self.stalled
        self.delay_s, self.stalled, self.cutting, self.reset_p = 0.0, False, False, 0.0
        if was_stalled:
            self._call(self._reset_all)

    # --- life cycle -------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._thread.start()
        ready = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = ready.result(10)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, fn: object) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(fn)  # type: ignore[arg-type]

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- relaying ---------------------------------------------------------------------------------------

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            self._reset(writer)

    def _reset(self, writer: asyncio.StreamWriter) -> None:
        """Close with an RST (linger 0), as a middlebox or a crashed peer does."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        self._writers.discard(writer)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(client_w)
        if self.cutting:
            self._reset(client_w)
            return
        while self.stalled:  # accepted, never answered
            await asyncio.sleep(0.05)
            if client_w.is_closing():
                return
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._reset(client_w)
            return
        self._writers.add(up_w)
        pair = (client_w, up_w)
        for task in (
            asyncio.create_task(self._pipe(client_r, up_w, pair), name="tcp-proxy:up"),
            asyncio.create_task(self._pipe(up_r, client_w, pair), name="tcp-proxy:down"),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        # Chunks wait in a queue with their due time, so latency delays without reordering.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, dst, pair), name="tcp-proxy:send")
        try:
            while data := await src.read(_CHUNK):
                if self.reset_p and self._rng.random() < self.reset_p:
                    self.resets_made += 1
                    for w in pair:
                        self._reset(w)
                    return
                await queue.put((time.monotonic() + self.delay_s, data))
            await queue.put((time.monotonic() + self.delay_s, b""))  # EOF, after what came before
            await sender
        except (OSError, asyncio.IncompleteReadError):
            for w in pair:
                self._reset(w)
        finally:
            sender.cancel()

    async def _send(
        self,
        queue: asyncio.Queue[tuple[float, bytes]],
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while True:
                due, data = await queue.get()
                while self.stalled or (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(0.05 if self.stalled else wait)
                if not data:
                    dst.close()
                    return
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError):
            for w in pair:
                self._reset(w)
