"""The steps of one connection to the broker, each with its own timeout, and the probe between them.

A connection is built in stages - our certificate files, the host name, TCP, TLS, MQTT - and an
attempt that fails says at which stage (:class:`AttemptError`).  That lets the reconnect loop wait
out its capped backoff while a cheap *probe* checks, every second or two, whether the stage that
failed would now pass: a broker listening again, a certificate replaced, a port that speaks TLS
again.  When it would, the next attempt starts at once, so a broker that comes back is used within
seconds, not after the backoff's cap.  Failures past TLS (a CONNACK refusal) are not probed: they
are retried only under the backoff, so a broker refusing our identity is not hammered.

Every step is bounded: the name lookup, the TCP connect and the TLS handshake by the configured
connect timeout each, so an attempt against a broker that accepts TCP and never answers ends by
itself, and the uplink can honestly report itself alive while inside one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import ssl
from pathlib import Path

from gateway.errors import ClockBehindError, EdgetwinError, TransientError
from gateway.uplink import expiry, tls
from gateway.uplink.config import MqttSection


class Stage(enum.IntEnum):
    """How far a connection attempt got; a probe checks whether the failed stage now passes."""

    FILES = 0  # loading the CA bundle and our certificate and key
    RESOLVE = 1  # the broker's host name
    TCP = 2
    TLS = 3
    MQTT = 4  # CONNECT and CONNACK, or the connection itself once up


class AttemptError(TransientError):
    """A connection attempt failed at ``stage``; ``cause`` is the error as classified."""

    def __init__(self, cause: EdgetwinError, stage: Stage) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.stage = stage


def where(cfg: MqttSection) -> str:
    """``uplink mqtt host:port``, the start of every message about this broker."""
    return f"uplink mqtt {cfg.host}:{cfg.port}"


class TlsMaterial:
    """The TLS context, rebuilt when the CA bundle, certificate or key file changes on disk.

    A certificate renewed in place (or missing at start and provisioned later) is picked up by
    the next attempt without a restart.
    """

    def __init__(self, cfg: MqttSection) -> None:
        self._cfg = cfg
        self._files = [p for p in (cfg.ca_file, cfg.cert_file, cfg.key_file) if p is not None]
        self._signature: tuple[tuple[int, int, int], ...] | None = None
        self._context: tls.NamedContext | None = None

    def signature(self) -> tuple[tuple[int, int, int], ...]:
        """(inode, size, mtime) of each file; (0, 0, 0) for one that is missing."""
        return tuple(_stat(p) for p in self._files)

    def changed(self) -> bool:
        """True when the files differ from those the current context was built from."""
        return self.signature() != self._signature

    def context(self) -> tls.NamedContext:
        """The current context; AttemptError at stage FILES when the files cannot be used."""
        signature = self.signature()
        if self._context is None or signature != self._signature:
            self._signature = signature
            self._context = None
            try:
                self._context = tls.client_context(self._cfg)
            except EdgetwinError as exc:
                raise AttemptError(exc, Stage.FILES) from exc
        return self._context


def _stat(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


async def open_tcp(cfg: MqttSection, timeout_s: float) -> socket.socket:
    """Resolve the broker's name and connect over TCP, each step within ``timeout_s``."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
    except TimeoutError as exc:
        raise AttemptError(
            TransientError(
                f"{where(cfg)}: the host name did not resolve within {timeout_s:g} s: retrying; check DNS"
            ),
            Stage.RESOLVE,
        ) from exc
    except OSError as exc:
        raise AttemptError(tls.classify(exc, cfg), Stage.RESOLVE) from exc
    last: BaseException | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout_s):
                await loop.sock_connect(sock, address)
        except TimeoutError as exc:
            sock.close()
            last = exc
            continue
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    if isinstance(last, TimeoutError):
        error: EdgetwinError = TransientError(
            f"{where(cfg)}: no TCP answer within {timeout_s:g} s: retrying; check the network"
        )
    else:
        error = tls.classify(last or OSError("no address"), cfg)
    raise AttemptError(error, Stage.TCP)


async def presented(cfg: MqttSection, timeout_s: float) -> expiry.CertInfo | None:
    """The certificate the broker presents, read without verifying it (to say why it failed); None when it cannot be had."""
    try:
        sock = await open_tcp(cfg, timeout_s)
    except AttemptError:
        return None
    # Not verified, and used for nothing but its dates: the connection is closed at once.
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    writer = await _handshake(cfg, sock, unverified, timeout_s)
    if writer is None:
        return None
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
    await _close(writer)
    if der is None:
        return None
    try:
        return await asyncio.to_thread(expiry.presented_info, der, f"{cfg.host}:{cfg.port}")
    except (EdgetwinError, OSError):
        return None


async def clock_behind(cfg: MqttSection, timeout_s: float) -> ClockBehindError:
    """The error for a broker certificate not valid yet by our clock, with its start date when the broker presents it."""
    info = await presented(cfg, timeout_s)
    return tls.clock_behind(cfg, None if info is None else info.not_before)


def reported_as(cause: EdgetwinError) -> str:
    """What a failure is logged once as: its message; a clock behind by its certificate's date (the clock's reading changes)."""
    if isinstance(cause, ClockBehindError):
        return f"clock behind: valid from {cause.valid_from}"
    return str(cause)


async def probe(cfg: MqttSection, material: TlsMaterial | None, failed: Stage, timeout_s: float) -> bool:
    """True when the stage a connection attempt failed at would pass now (a cheap check).

    FILES: the files changed.  RESOLVE and TCP: a TCP connection opens.  TLS: a TLS handshake
    completes.  MQTT: not probed (always False), so refusals are retried only under the backoff.
    """
    if failed is Stage.FILES:
        return material is not None and material.changed()
    if failed >= Stage.MQTT:
        return False
    try:
        sock = await open_tcp(cfg, timeout_s)
    except AttemptError:
        return False
    if failed < Stage.TLS or material is None:
        sock.close()
        return True
    try:
        context = await asyncio.to_thread(material.context)  # a trust store loads in ~0.1 s
    except AttemptError:
        sock.close()
        return False
    writer = await _handshake(cfg, sock, context, timeout_s)
    if writer is None:
        return False
    await _close(writer)
    return True


async def _handshake(
    cfg: MqttSection, sock: socket.socket, context: ssl.SSLContext, timeout_s: float
) -> asyncio.StreamWriter | None:
    """A TLS handshake with the broker over ``sock``: its writer, or None (``sock`` closed) when it fails."""
    try:
        _reader, writer = await asyncio.open_connection(
            sock=sock, ssl=context, server_hostname=cfg.verify_name, ssl_handshake_timeout=timeout_s
        )
    except (OSError, ssl.SSLError, TimeoutError, EOFError):
        sock.close()
        return None
    return writer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
