"""TLS for the uplink: a client context that always verifies, and errors a technician can act on.

The context verifies the server's certificate chain and host name, offers TLS 1.2 at the least,
presents the gateway's certificate (mTLS) and, for AWS IoT on port 443, ALPN.  Failures are turned
into :mod:`gateway.errors` types by *what* failed - the chain, the host name, the validity dates,
our own certificate - because each has a different fix.  OpenSSL's reason codes are the only way
to tell some of them apart; they are matched in one table, :data:`_REASONS`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
from collections.abc import Callable
from typing import Any

from gateway.errors import AuthError, ClockBehindError, ConfigError, EdgetwinError, TransientError
from gateway.uplink.config import MqttSection

# X509_V_ERR_* codes of OpenSSL (x509_vfy.h) that SSLCertVerificationError.verify_code carries.
_X509_NOT_YET_VALID = 9
_X509_EXPIRED = 10
_X509_HOSTNAME_MISMATCH = 62
_X509_UNTRUSTED = frozenset({2, 18, 19, 20, 21})


class NamedContext(ssl.SSLContext):
    """A client context that sends and verifies a configured name, whatever address is dialled.

    paho-mqtt passes the host it connects to as ``server_hostname``; a broker reached by address
    but certified by name needs the name instead.
    """

    server_name: str | None = None

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        fd = sock.fileno()
        try:
            wrapped = super().wrap_socket(
                sock,
                server_side=server_side,
                do_handshake_on_connect=do_handshake_on_connect,
                suppress_ragged_eofs=suppress_ragged_eofs,
                server_hostname=self.server_name or server_hostname,
                session=session,
            )
        except OSError as exc:
            _close_half_made(exc)
            raise
        # Kept by file descriptor (the wrapped socket takes over the plain one's): paho does not
        # close the socket of a handshake that fails, and one given up on may still be running.
        self._wrapped()[fd] = wrapped
        return wrapped

    def _wrapped(self) -> dict[int, ssl.SSLSocket]:
        found: dict[int, ssl.SSLSocket] | None = getattr(self, "_by_fd", None)
        if found is None:
            found = {}
            self._by_fd = found
        return found

    def forget(self, fd: int) -> None:
        """The handshake on ``fd`` succeeded: its socket belongs to the connection now."""
        self._wrapped().pop(fd, None)

    def close_failed(self, fd: int) -> None:
        """Close the TLS socket wrapped around descriptor ``fd`` by a handshake that failed or was given up."""
        sock = self._wrapped().pop(fd, None)
        if sock is not None:
            sock.close()


def _close_half_made(exc: OSError) -> None:
    """Close the TLS socket a failed ``wrap_socket`` made and dropped.

    CPython's ``SSLSocket._create`` takes over the descriptor, then reads a byte when the socket
    does not look connected; a connection reset just then (a middlebox, a broker going away)
    raises out of it without closing the socket it made.  It is reachable only from the frames of
    the traceback.
    """
    tb = exc.__traceback__
    while tb is not None:
        made = tb.tb_frame.f_locals.get("self")
        if isinstance(made, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                made.close()
        tb = tb.tb_next


def client_context(cfg: MqttSection) -> NamedContext:
    """The TLS context for ``cfg``; ConfigError when its files cannot be used."""
    where = f"uplink mqtt {cfg.host}:{cfg.port}"
    ctx = NamedContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and host name by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.server_name = cfg.server_name
    try:
        if cfg.ca_file is not None:
            ctx.load_verify_locations(cafile=str(cfg.ca_file))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{where}: cannot load the CA bundle {cfg.ca_file}: {exc}: "
            "set uplink.mqtt.ca_file to a PEM file with the CA that issued the broker's certificate"
        ) from exc
    if cfg.cert_file is not None and cfg.key_file is not None:
        try:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{where}: cannot load the client certificate {cfg.cert_file} with key {cfg.key_file}: "
                f"{exc}: check both are PEM and belong together (edgetwin provision import checks that)"
            ) from exc
    if cfg.alpn:
        ctx.set_alpn_protocols(list(cfg.alpn))
    return ctx


def _untrusted(cfg: MqttSection) -> str:
    bundle = str(cfg.ca_file) if cfg.ca_file else "the system trust store"
    return (
        f"the server certificate is not signed by a CA in {bundle}: "
        "set uplink.mqtt.ca_file to the CA that issued the broker's certificate"
    )


def clock_behind(
    cfg: MqttSection, valid_from: dt.datetime | None, now: dt.datetime | None = None
) -> ClockBehindError:
    """The broker's certificate (or its CA) is not valid yet by our clock: say what the clock reads and from when it is valid."""
    now = now or dt.datetime.now(dt.UTC)
    if valid_from is None or valid_from <= now:  # unknown, or its CA is the one not valid yet
        since = "or its CA is not valid yet"
    else:
        since = f"is valid from {valid_from:%Y-%m-%d %H:%M:%S} UTC"
    return ClockBehindError(
        f"uplink mqtt {cfg.host}:{cfg.port}: TLS handshake refused: the gateway's clock reads "
        f"{now:%Y-%m-%d %H:%M:%S} UTC, the broker certificate {since}: the clock is behind; "
        "check NTP/time sync (timedatectl status shows whether the clock is synchronized); "
        "it connects by itself once the clock is right",
        valid_from,
    )


def verification_error(exc: ssl.SSLCertVerificationError, cfg: MqttSection) -> EdgetwinError:
    """The broker's certificate failed verification: say which check failed and what to do."""
    where = f"uplink mqtt {cfg.host}:{cfg.port}"
    code = getattr(exc, "verify_code", None)
    now = dt.datetime.now(dt.UTC)
    if code == _X509_HOSTNAME_MISMATCH:
        why = (
            f"the server certificate for {cfg.host} does not match host name {cfg.verify_name!r}: "
            "set uplink.mqtt.host (or server_name) to the name in the certificate, or fix the certificate"
        )
    elif code == _X509_EXPIRED:
        why = (
            "the server certificate has expired: renew the broker's certificate "
            f"(or set this gateway's clock if it is wrong: it reads {now:%Y-%m-%d %H:%M} UTC)"
        )
    elif code == _X509_NOT_YET_VALID:
        return clock_behind(cfg, None, now)
    elif code in _X509_UNTRUSTED:
        why = _untrusted(cfg)
    else:
        why = f"the server certificate was refused: {getattr(exc, 'verify_message', exc)}: check the broker's certificate"
    return AuthError(f"{where}: TLS handshake refused: {why}")


# OpenSSL reason codes (as they appear in SSLError texts and paho's log lines) -> what they mean.
# The alerts are the broker's verdict on *our* certificate, seen only as an alert on the wire.
_REASONS: tuple[tuple[str, Callable[[MqttSection], EdgetwinError]], ...] = (
    (
        "CERTIFICATE_REQUIRED",
        lambda c: AuthError(
            f"uplink mqtt {c.host}:{c.port}: the broker requires a client certificate"
            + (
                " and none is configured: set uplink.mqtt.cert_file and key_file (edgetwin provision key)"
                if c.cert_file is None
                else f" and refused {c.cert_file}: have it issued by a CA the broker trusts"
            )
        ),
    ),
    (
        "ALERT_CERTIFICATE_EXPIRED",
        lambda c: AuthError(
            f"uplink mqtt {c.host}:{c.port}: the broker refused our client certificate {c.cert_file} "
            "as expired: renew it (edgetwin provision key, then have the CSR signed)"
        ),
    ),
    (
        "ALERT_UNKNOWN_CA",
        lambda c: AuthError(
            f"uplink mqtt {c.host}:{c.port}: the broker does not trust the CA of our client certificate "
            f"{c.cert_file}: have it issued by a CA the broker trusts"
        ),
    ),
    ("ALERT_BAD_CERTIFICATE", lambda c: _refused_ours(c, "bad certificate")),
    ("ALERT_CERTIFICATE_UNKNOWN", lambda c: _refused_ours(c, "certificate unknown")),
    ("ALERT_ACCESS_DENIED", lambda c: _refused_ours(c, "access denied")),
    (
        "ALERT_HANDSHAKE_FAILURE",
        lambda c: AuthError(
            f"uplink mqtt {c.host}:{c.port}: the broker ended the TLS handshake"
            + (
                ": it may require a client certificate and none is configured: set uplink.mqtt.cert_file "
                "and key_file"
                if c.cert_file is None
                else ": check the client certificate and the TLS versions and ciphers the broker accepts"
            )
        ),
    ),
    (
        "WRONG_VERSION_NUMBER",
        lambda c: ConfigError(
            f"uplink mqtt {c.host}:{c.port}: the broker does not speak TLS on this port: "
            "use its TLS port (usually 8883)"
        ),
    ),
    (
        "NO_APPLICATION_PROTOCOL",
        lambda c: ConfigError(
            f"uplink mqtt {c.host}:{c.port}: the broker accepts none of the ALPN protocols {list(c.alpn)}: "
            "fix uplink.mqtt.alpn (AWS IoT on port 443: x-amzn-mqtt-ca)"
        ),
    ),
    (
        "UNSUPPORTED_PROTOCOL",
        lambda c: AuthError(
            f"uplink mqtt {c.host}:{c.port}: the broker offers no TLS version of 1.2 or newer: "
            "upgrade the broker's TLS settings"
        ),
    ),
)


def _refused_ours(c: MqttSection, what: str) -> AuthError:
    return AuthError(
        f"uplink mqtt {c.host}:{c.port}: the broker refused our client certificate ({what}): "
        + (
            "none is configured: set uplink.mqtt.cert_file and key_file"
            if c.cert_file is None
            else f"check that {c.cert_file} is issued by a CA the broker trusts and allowed to connect"
        )
    )


def from_text(text: str, cfg: MqttSection) -> EdgetwinError | None:
    """The error an OpenSSL message means (SSLError text or a paho log line), or None if unknown."""
    upper = text.upper()
    for reason, build in _REASONS:
        if reason in upper:
            return build(cfg)
    return None


def classify(exc: BaseException, cfg: MqttSection) -> EdgetwinError:
    """Turn a connection failure into the error class the supervisor's retry policy reads."""
    where = f"uplink mqtt {cfg.host}:{cfg.port}"
    if isinstance(exc, EdgetwinError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return verification_error(exc, cfg)
    if isinstance(exc, ssl.SSLError):
        known = from_text(str(exc), cfg)
        if known is not None:
            return known
        return TransientError(
            f"{where}: TLS failed: {exc}: retrying; check the broker's TLS settings if it persists"
        )
    if isinstance(exc, socket.gaierror):
        return TransientError(f"{where}: cannot resolve the host name: {exc}: check DNS and uplink.mqtt.host")
    if isinstance(exc, ConnectionRefusedError):
        return TransientError(f"{where}: connection refused: the broker is not listening: retrying")
    if isinstance(exc, TimeoutError | socket.timeout):
        return TransientError(f"{where}: no answer within the connect timeout: retrying; check the network")
    if isinstance(exc, OSError):
        return TransientError(f"{where}: connection failed: {exc.strerror or exc}: retrying")
    return TransientError(f"{where}: connection failed: {type(exc).__name__}: {exc}: retrying")


def describe_peer(sock: Any) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384`` for a TLS socket, "" otherwise (for the connect log line)."""
    if isinstance(sock, ssl.SSLSocket):
        cipher = sock.cipher()
        return f"{sock.version()} {cipher[0] if cipher else ''}".strip()
    return ""
