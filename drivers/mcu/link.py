"""The serial link to a node: a raw tty read through the event loop, requests with retransmission.

The transport holds no protocol logic beyond framing: bytes go through
:class:`~firmware_bridge.framing.FrameDecoder`; ACK and NACK frames complete the request that
carries their sequence number; every other frame goes to the ``on_frame`` callback, synchronously,
in the reader (no queue hop per frame).  A request is retransmitted with the same sequence number
when its answer does not come in time; the node answers a retransmitted request from its cache
instead of doing it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import termios
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from drivers.mcu.protocol import SeqTracker
from drivers.portlock import in_use_error, lock_exclusive
from firmware_bridge.framing import DropReason, Frame, FrameDecoder, encode_frame
from firmware_bridge.messages import Ack, MessageError, MsgType, Nack, NackCode
from gateway.errors import ConfigError, EdgetwinError, TransientError

_LOGGER = logging.getLogger(__name__)

_READ_SIZE = 4096
_SPEEDS: dict[int, int] = {
    rate: getattr(termios, f"B{rate}") for rate in (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
}
for _rate in (1000000, 2000000):
    if hasattr(termios, f"B{_rate}"):
        _SPEEDS[_rate] = getattr(termios, f"B{_rate}")


class NodeRefusedError(EdgetwinError):
    """The node answered a request with NACK."""

    def __init__(self, request: MsgType, nack: Nack) -> None:
        try:
            code = NackCode(nack.code).name
        except ValueError:
            code = f"code {nack.code}"
        super().__init__(f"node refused {request.name}: {code} (detail {nack.detail})")
        self.request = request
        self.code = nack.code
        self.detail = nack.detail


@dataclass(slots=True)
class LinkStats:
    """What the link saw, for diagnostics."""

    frames_in: int = 0
    frames_out: int = 0
    lost_frames: int = 0
    retransmits: int = 0
    timeouts: int = 0
    stray_acks: int = 0
    malformed: int = 0
    first_seq: int | None = None  # the node's sequence number of the first frame received
    last_seq: int | None = None  # and of the latest
    drops: dict[str, int] = field(default_factory=dict)


def open_serial(path: Path, baud: int, who: str = "mcu") -> int:
    """Open a tty raw, 8N1, non-blocking, no flow control, locked against other programs; its descriptor."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise TransientError(
            f"mcu port {path}: cannot open: no such device: check the cable and the port name"
        ) from exc
    except PermissionError as exc:
        raise ConfigError(
            f"mcu port {path}: cannot open: permission denied: add the gateway's user to the dialout group"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise in_use_error(who, path) from exc
        raise TransientError(f"mcu port {path}: cannot open: {exc.strerror}: check the device") from exc
    if not os.isatty(fd):
        os.close(fd)
        raise ConfigError(f"mcu port {path}: not a terminal device: set port to a serial device")
    try:
        # Before any setting: a second reader would take part of the node's frames.
        lock_exclusive(fd, who, path)
        tty.setraw(fd)
        attrs = termios.tcgetattr(fd)
        speed = _SPEEDS.get(baud, termios.B115200)
        attrs[4] = attrs[5] = speed
        attrs[2] &= ~(termios.CSTOPB | termios.PARENB | termios.CRTSCTS)
        attrs[2] |= termios.CLOCAL | termios.CREAD
        attrs[0] &= ~(termios.IXON | termios.IXOFF | termios.IXANY)
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        termios.tcflush(fd, termios.TCIOFLUSH)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Link:
    """One open serial link to a node. Use ``async with Link(...) as link``; not re-entrant."""

    def __init__(
        self,
        path: Path,
        *,
        baud: int = 115200,
        timeout_s: float = 0.5,
        retries: int = 3,
        on_frame: Callable[[Frame], None] | None = None,
        who: str = "mcu",
    ) -> None:
        self.path = path
        self.baud = baud
        self.timeout_s = timeout_s
        self.retries = retries
        self.on_frame = on_frame
        self.who = who
        self.stats = LinkStats()
        self.last_rx = time.monotonic()
        self._fd: int | None = None
        self._decoder = FrameDecoder()
        self._seq = SeqTracker()
        self._tx_seq = random.randrange(1 << 16)  # a restarted gateway must not hit the node's cache
        self._pending: dict[int, tuple[MsgType, asyncio.Future[bytes]]] = {}
        self._lost: BaseException | None = None

    async def __aenter__(self) -> Self:
        """Open the port and start reading."""
        self._fd = open_serial(self.path, self.baud, self.who)
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
        self.last_rx = time.monotonic()
        _LOGGER.debug("%s: link open on %s", self.who, self.path)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop reading, fail pending requests, close the port."""
        self.close()

    def close(self) -> None:
        """Idempotent synchronous close."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        loop.remove_writer(fd)
        os.close(fd)
        self._fail_pending(TransientError(f"{self.who} port {self.path}: link closed"))

    @property
    def drops(self) -> dict[str, int]:
        """Dropped frames by reason."""
        return {str(k): v for k, v in self._decoder.drops.items()}

    @property
    def seq_restarts(self) -> int:
        """How often the node's sequence numbers went far back outside a HELLO: reboots."""
        return self._seq.resets

    def reset_seq(self) -> None:
        """Forget the node's sequence numbers (it rebooted)."""
        self._seq.reset()

    def _fail_pending(self, exc: BaseException) -> None:
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    def _on_readable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._link_lost(exc)
            return
        if not data:
            self._link_lost(OSError(errno.EIO, "end of file"))
            return
        self.last_rx = time.monotonic()
        for frame in self._decoder.feed(data):
            self._on_frame(frame)

    def _link_lost(self, exc: OSError) -> None:
        err = TransientError(
            f"{self.who} port {self.path}: link lost: {exc.strerror or exc}: the device was unplugged or reset"
        )
        self._lost = err
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
        self._fail_pending(err)

    def _on_frame(self, frame: Frame) -> None:
        self.stats.frames_in += 1
        if frame.type == MsgType.HELLO:
            self._seq.reset()  # a boot restarts the node's counter: not a loss
        self.stats.lost_frames += self._seq.see(frame.seq)
        if self.stats.first_seq is None:
            self.stats.first_seq = frame.seq
        self.stats.last_seq = frame.seq
        if frame.type in (MsgType.ACK, MsgType.NACK):
            self._on_answer(frame)
        elif self.on_frame is not None:
            self.on_frame(frame)

    def _on_answer(self, frame: Frame) -> None:
        try:
            if frame.type == MsgType.ACK:
                ack = Ack.decode(frame.payload)
                seq, result, nack = ack.ack_seq, ack.body, None
            else:
                nack = Nack.decode(frame.payload)
                seq, result = nack.ack_seq, b""
        except MessageError:
            self.stats.malformed += 1
            return
        entry = self._pending.pop(seq, None)
        if entry is None:
            self.stats.stray_acks += 1  # the answer to a request we gave up on
            return
        request, fut = entry
        if fut.done():
            return
        if nack is not None:
            fut.set_exception(NodeRefusedError(request, nack))
        else:
            fut.set_result(result)

    def check(self) -> None:
        """Raise the link's failure, if it failed."""
        if self._lost is not None:
            raise self._lost
        if self._fd is None:
            raise TransientError(f"{self.who} port {self.path}: link not open")

    async def write(self, data: bytes) -> None:
        """Write all of ``data``, waiting while the tty's buffer is full."""
        self.check()
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        while view:
            fd = self._fd
            assert fd is not None
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()

                def writable(fut: asyncio.Future[None] = ready) -> None:
                    if not fut.done():
                        fut.set_result(None)

                loop.add_writer(fd, writable)
                try:
                    await asyncio.wait_for(ready, self.timeout_s * 4)
                except TimeoutError as exc:
                    raise TransientError(
                        f"{self.who} port {self.path}: write stalled: the node does not read: check the device"
                    ) from exc
                finally:
                    if self._fd is not None:
                        loop.remove_writer(self._fd)
                continue
            except OSError as exc:
                self._link_lost(exc)
                self.check()
            view = view[n:]

    def _next_seq(self) -> int:
        seq = self._tx_seq
        self._tx_seq = (seq + 1) & 0xFFFF
        return seq

    async def send(self, type_: MsgType, body: bytes = b"") -> int:
        """Send a frame that expects no answer; return its sequence number."""
        seq = self._next_seq()
        await self.write(encode_frame(type_, seq, body))
        self.stats.frames_out += 1
        return seq

    def request_bound_s(self, *, timeout_s: float | None = None, retries: int | None = None) -> float:
        """The longest a :meth:`request` can take: each try waits for a writable port and an answer."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        tries = 1 + (self.retries if retries is None else retries)
        return tries * timeout * 5  # write wait (4x) + answer wait (1x), per try

    async def request(
        self, type_: MsgType, body: bytes = b"", *, timeout_s: float | None = None, retries: int | None = None
    ) -> bytes:
        """Send a request and return the ACK's body; NodeRefusedError on NACK, TransientError on silence."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        tries = 1 + (self.retries if retries is None else retries)
        seq = self._next_seq()
        wire = encode_frame(type_, seq, body)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[seq] = (type_, fut)
        try:
            for attempt in range(tries):
                if attempt:
                    self.stats.retransmits += 1
                await self.write(wire)
                self.stats.frames_out += 1
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), timeout)
                except TimeoutError:
                    continue
            self.stats.timeouts += 1
            raise TransientError(
                f"{self.who} port {self.path}: no answer to {type_.name} after {tries} tries "
                f"of {timeout:g} s: check that the node is powered and runs the bridge firmware"
            )
        finally:
            self._pending.pop(seq, None)
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                with contextlib.suppress(BaseException):
                    fut.exception()  # retrieved: no "exception never retrieved" warning

    def drop_counts(self) -> dict[DropReason, int]:
        """Dropped frames by reason (typed)."""
        return dict(self._decoder.drops)
