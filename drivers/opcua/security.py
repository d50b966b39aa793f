"""Opening an OPC UA session the safe way: policy rules, PKI check, credentials, refusal -> error class.

Shared by the driver and ``edgetwin scan opcua``.  The server's certificate is checked against
the PKI folder *before* the secure channel is opened: an unknown certificate is stored in
``rejected/`` and the error names the file and the command that trusts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import security_policies
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from drivers.opcua.config import OpcUaConfig, is_loopback
from drivers.opcua.protocol import endpoint_display, status_token
from gateway.cleanup import finish_shielded
from gateway.errors import AuthError, ConfigError

if TYPE_CHECKING:
    from drivers.opcua.pki import Pki

_T = TypeVar("_T")

POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
NONE_URI = security_policies.SecurityPolicyNone.URI
MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}

# The one table that classifies a server's refusal by status code (style rule 3): these mean
# "your identity was refused", and retrying soon will not change the answer.
USER_REFUSED = frozenset(
    {
        StatusCodes.BadUserAccessDenied,
        StatusCodes.BadIdentityTokenInvalid,
        StatusCodes.BadIdentityTokenRejected,
        StatusCodes.BadUserSignatureInvalid,
    }
)
CERT_REFUSED = frozenset(
    {
        StatusCodes.BadCertificateUntrusted,
        StatusCodes.BadCertificateInvalid,
        StatusCodes.BadCertificateRevoked,
        StatusCodes.BadCertificateTimeInvalid,
        StatusCodes.BadCertificateUriInvalid,
        StatusCodes.BadCertificateUseNotAllowed,
        StatusCodes.BadCertificateHostNameInvalid,
        StatusCodes.BadSecurityChecksFailed,
        StatusCodes.BadSecurityPolicyRejected,
    }
)


class Unreachable(Exception):  # noqa: N818 - a transient condition, mapped by each caller
    """The server could not be reached or did not answer in time; worth retrying."""


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """Everything needed to open a session, whoever opens it (driver or scan)."""

    who: str  # "opcua <source name>" or "scan": the start of every message
    endpoint: str
    security_policy: str
    security_mode: str
    allow_insecure: bool
    pki_dir: Path
    application_uri: str | None
    username: str | None
    password_file: Path | None
    request_timeout_s: float

    @classmethod
    def from_config(cls, who: str, cfg: OpcUaConfig) -> ConnectOptions:
        """The options of a configured source."""
        return cls(
            who,
            cfg.endpoint,
            cfg.security_policy,
            cfg.security_mode,
            cfg.allow_insecure,
            cfg.pki_dir,
            cfg.application_uri,
            cfg.username,
            cfg.password_file,
            cfg.request_timeout_s,
        )

    @property
    def app_uri(self) -> str:
        """The gateway's application URI (must match its certificate)."""
        return self.application_uri or f"urn:{socket.gethostname()}:edgetwin"


async def bounded(what: str, timeout_s: float, aw: Awaitable[_T]) -> _T:
    """Await an asyncua call with our own deadline; a timeout becomes Unreachable."""
    try:
        async with asyncio.timeout(timeout_s):
            return await aw
    except TimeoutError as exc:
        raise Unreachable(f"{what}: no answer within {timeout_s:g} s") from exc


def first_certificate(der: bytes | None) -> bytes:
    """The leading certificate of a DER blob that may hold a whole chain."""
    if not der:
        return b""
    if len(der) >= 4 and der[0] == 0x30 and der[1] == 0x82:
        return der[: int.from_bytes(der[2:4], "big") + 4]
    return der


def read_password(opts: ConnectOptions, path: Path) -> str:
    """The password in a secret file (first line)."""
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{opts.who} {endpoint_display(opts.endpoint)}: password_file {path}: cannot read it: {exc}: "
            "create it (one line, mode 0600) readable by the gateway's user"
        ) from exc


def open_pki(root: Path) -> Pki:
    """The gateway's OPC UA certificate store; ``cryptography`` loads here, only for a secured source."""
    from drivers.opcua.pki import Pki  # noqa: PLC0415 - ~8 MB resident that a source without security never needs

    return Pki(root)


def raise_refusal(opts: ConnectOptions, exc: UaStatusCodeError) -> None:
    """AuthError when the server refused our user or certificate; otherwise return."""
    where = f"{opts.who} {endpoint_display(opts.endpoint)}"
    code = exc.code & 0xFFFF0000
    if code in USER_REFUSED:
        who = f"user {opts.username!r}" if opts.username else "anonymous login"
        fix = (
            f"check the username and the password in {opts.password_file}"
            if opts.username
            else "set username and password_file for this server"
        )
        raise AuthError(f"{where}: login: the server refused {who} ({status_token(code)}): {fix}") from exc
    if code in CERT_REFUSED:
        own = open_pki(opts.pki_dir).own_cert
        raise AuthError(
            f"{where}: security: the server refused the gateway's certificate ({status_token(code)}): "
            f"add {own} to the server's trusted certificates (application URI {opts.app_uri})"
        ) from exc


async def _endpoints(opts: ConnectOptions, client: Client) -> list[ua.EndpointDescription]:
    """The server's endpoints (over a channel without security, as discovery allows)."""
    try:
        return await bounded(
            "get endpoints", opts.request_timeout_s, client.connect_and_get_server_endpoints()
        )
    except UaStatusCodeError as exc:
        raise Unreachable(f"get endpoints: {status_token(exc.code)}") from exc
    except OSError as exc:
        raise Unreachable(f"get endpoints: {exc.__class__.__name__}: {exc}") from exc


def _choose(opts: ConnectOptions, endpoints: list[ua.EndpointDescription]) -> ua.EndpointDescription:
    """The endpoint with the configured policy and mode; ConfigError listing the offered ones."""
    uri = POLICIES[opts.security_policy].URI if opts.security_policy != "None" else NONE_URI
    mode = MODES.get(opts.security_mode, ua.MessageSecurityMode.None_)
    chosen = [ep for ep in endpoints if ep.SecurityPolicyUri == uri and ep.SecurityMode == mode]
    if not chosen:
        offered = sorted(
            {f"{ep.SecurityPolicyUri.rpartition('#')[2]}/{ep.SecurityMode.name}" for ep in endpoints}
        )
        raise ConfigError(
            f"{opts.who} {endpoint_display(opts.endpoint)}: security: the server offers no "
            f"{opts.security_policy}/{opts.security_mode} endpoint: it offers {', '.join(offered) or 'nothing'}: "
            "set security_policy and security_mode to one of them"
        )
    return chosen[0]


async def _check_server_certificate(opts: ConnectOptions, client: Client) -> None:
    where = f"{opts.who} {endpoint_display(opts.endpoint)}"
    pki = open_pki(opts.pki_dir)
    # Key generation (RSA, ~0.1-1 s) and certificate parsing run in a thread: the event loop
    # carries every other source and the watchdog meanwhile.
    cert_path, key_path = await asyncio.to_thread(
        pki.ensure_own, application_uri=opts.app_uri, hostname=socket.gethostname()
    )
    policy = POLICIES[opts.security_policy]
    mode = MODES[opts.security_mode]
    chosen = [_choose(opts, await _endpoints(opts, client))]
    der = first_certificate(chosen[0].ServerCertificate)
    if not der:
        raise AuthError(
            f"{where}: security: the server sent no certificate with its {opts.security_policy} endpoint: "
            "it cannot be authenticated: fix the server's certificate setup"
        )
    verdict = await asyncio.to_thread(pki.verdict, der)
    if not verdict.trusted:
        saved = await asyncio.to_thread(pki.reject, der)
        raise AuthError(
            f"{where}: security: the server's certificate is {verdict.reason} (thumbprint {verdict.thumbprint}); "
            f"saved as {saved}: if this is your PLC, trust it with "
            f"'edgetwin opcua trust --pki-dir {pki.root} {verdict.thumbprint}' (or move that file into "
            f"{pki.trusted_dir}); the source connects on its next retry"
        )
    try:
        await bounded(
            "load certificates",
            opts.request_timeout_s,
            # Parsing our RSA key (~40 ms) and the certificates runs on a loop of its own in a
            # thread: set_security only stores the parsed objects on the client.
            asyncio.to_thread(
                asyncio.run,
                client.set_security(policy, str(cert_path), str(key_path), server_certificate=der, mode=mode),
            ),
        )
    except (ValueError, OSError) as exc:
        raise ConfigError(
            f"{where}: security: cannot load the gateway's certificate {cert_path}: {exc}: "
            f"move {pki.own_cert.parent} away to have a new one created"
        ) from exc


async def connect(
    opts: ConnectOptions,
    *,
    watchdog_s: float = 5.0,
    session_timeout_ms: int = 60_000,
    on_lost: Callable[[Exception], Coroutine[Any, Any, None]] | None = None,
) -> Client:
    """A connected, activated client; raises AuthError, ConfigError or Unreachable."""
    where = f"{opts.who} {endpoint_display(opts.endpoint)}"
    client = Client(opts.endpoint, timeout=opts.request_timeout_s, watchdog_intervall=watchdog_s)
    client.application_uri = opts.app_uri
    client.name = client.description = "edgetwin gateway"
    client.product_uri = "urn:edgetwin:gateway"
    client.session_timeout = session_timeout_ms
    client.connection_lost_callback = on_lost
    if opts.security_policy != "None":
        await _check_server_certificate(opts, client)
    elif not (opts.allow_insecure or is_loopback(client.server_url.hostname or "")):
        raise ConfigError(
            f"{where}: security_policy None off loopback: refused: use Basic256Sha256 or set allow_insecure = true"
        )
    else:
        _choose(opts, await _endpoints(opts, client))
    if opts.username is not None and opts.password_file is not None:
        client.set_user(opts.username)
        client.set_password(read_password(opts, opts.password_file))
    try:
        await bounded("connect", opts.request_timeout_s * 2, client.connect())
    except UaStatusCodeError as exc:
        await abandon(client)
        raise_refusal(opts, exc)
        raise Unreachable(f"connect: {status_token(exc.code)}") from exc
    except UaError as exc:
        await abandon(client)
        if "certificate" in str(exc).lower():
            raise AuthError(
                f"{where}: connect: {exc}: the server presented another certificate than its endpoint list: "
                "check the server, then trust the right one"
            ) from exc
        raise Unreachable(f"connect: {exc}") from exc
    except (OSError, Unreachable) as exc:
        await abandon(client)
        raise Unreachable(f"connect: {exc.__class__.__name__}: {exc}") from exc
    return client


CLOSE_DEADLINE_S = 2.0  # closing a session never holds a reconnect or a stop longer


async def _disconnect_quietly(client: Client) -> None:
    # The peer may be gone already; closing is best effort and its errors say nothing new.
    with contextlib.suppress(Exception):
        await client.disconnect()
    client.disconnect_socket()


async def abandon(client: Client) -> None:
    """Close a client's session and socket, shielded and bounded by CLOSE_DEADLINE_S."""
    task = asyncio.create_task(_disconnect_quietly(client), name="opcua:disconnect")
    try:
        await finish_shielded(task, CLOSE_DEADLINE_S, who="opcua: disconnect")
    finally:
        client.disconnect_socket()  # idempotent: also after a disconnect that was abandoned


class _LinkNoise(logging.Filter):
    """Drops asyncua's own reports of a lost link: the driver reports link state itself, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for records about a closed connection."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError | TimeoutError):
            return False
        return "connection is closed" not in record.getMessage()


def quiet_asyncua() -> None:
    """Keep asyncua's chatter out of the journal unless someone configured its loggers."""
    # asyncua logs every endpoint (certificates included) at INFO and every lost link at
    # WARNING/ERROR with a trace, once per attempt; the driver logs state changes instead.
    root = logging.getLogger("asyncua")
    if root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    for name in (
        "asyncua.client.ua_session.UaSession",
        "asyncua.client.ua_client.UaClient",
        "asyncua.client.client",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LinkNoise) for f in logger.filters):
            logger.addFilter(_LinkNoise())
