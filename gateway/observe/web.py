"""The local status page and ``/metrics``, served by the gateway (aiohttp; the optional "web" extra).

Off unless ``status.http`` is set.  On a loopback address it serves this machine only; on any
other address the config demands TLS and a bearer token or client certificates (see
:class:`~gateway.observe.config.StatusSection`).  Routes:

* ``/`` the page (one static HTML file with its script inline: no front-end build),
* ``/api/status`` the snapshot as JSON, ``/api/events`` the snapshot as server-sent events,
* ``/metrics`` the Prometheus text format.

The page shows what the snapshot holds: subjects as pseudonyms, sources by their config names.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from gateway.errors import ConfigError, TransientError
from gateway.observe.config import StatusSection
from gateway.observe.metrics import CONTENT_TYPE, registry_for, render
from gateway.observe.status import StatusBoard

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page.html")
TOKEN_COOKIE = "edgetwin_token"  # noqa: S105 - the cookie's name, not a token

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StatusWeb:
    """The HTTP(S) server of the status page and the metrics (a supervised unit)."""

    def __init__(self, section: StatusSection, board: StatusBoard) -> None:
        self._section = section
        self._board = board
        self._registry = registry_for(board)
        self._token: str | None = None
        self.url = ""

    def _ssl(self) -> ssl.SSLContext | None:
        s = self._section
        if s.tls_cert_file is None or s.tls_key_file is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(s.tls_cert_file), str(s.tls_key_file))
            if s.client_ca_file is not None:
                ctx.load_verify_locations(cafile=str(s.client_ca_file))
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"status http {s.http}: cannot load the TLS files: {exc}: "
                "check status.tls_cert_file, tls_key_file and client_ca_file (PEM)"
            ) from exc
        return ctx

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is None:
            return await handler(request)
        given = (
            request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            or request.query.get("token", "")
            or request.cookies.get(TOKEN_COOKIE, "")
        )
        if not hmac.compare_digest(given.encode(), self._token.encode()):
            return web.Response(
                status=401,
                text="edgetwin status: a token is required (Authorization: Bearer <token>, or ?token=)\n",
                headers={"WWW-Authenticate": 'Bearer realm="edgetwin"'},
            )
        response = await handler(request)
        if request.query.get("token") and request.path == "/":
            # The page's own requests then carry it without putting it in every URL.
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, secure=True, samesite="Strict")
        return response

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/", self._page)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _page(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=PAGE.read_bytes(),
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"
            },
        )

    async def _status(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response(self._board.compose())

    async def _metrics(self, _request: web.Request) -> web.StreamResponse:
        # On the loop, not in a thread: the collector reads the pipeline's live state, which only
        # the loop may touch; a scrape is a few hundred lines.
        body = render(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        try:
            while True:
                data = json.dumps(self._board.compose(), separators=(",", ":"))
                await response.write(f"data: {data}\n\n".encode())
                await asyncio.sleep(self._section.refresh_s)
        except (ConnectionResetError, ConnectionError):
            log.debug("status page: a viewer went away")
        return response

    async def run(self, started: Callable[[], None]) -> None:
        """Serve until cancelled."""
        s = self._section
        if s.token_file is not None:
            try:
                self._token = s.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"status token {s.token_file}: cannot read: {exc.strerror}") from exc
            if len(self._token) < 16:
                raise ConfigError(
                    f"status token {s.token_file}: shorter than 16 characters: "
                    "write a long random one (openssl rand -hex 24)"
                )
        ctx = self._ssl()
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, s.http_host, s.http_port, ssl_context=ctx)
            try:
                await site.start()
            except OSError as exc:
                raise TransientError(
                    f"status http {s.http}: cannot listen: {exc.strerror}: retrying"
                ) from exc
            scheme = "https" if ctx else "http"
            host = f"[{s.http_host}]" if ":" in s.http_host else s.http_host
            self.url = f"{scheme}://{host}:{s.http_port}/"
            log.info("status page and /metrics on %s", self.url)
            started()
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(asyncio.wait_for(runner.cleanup(), 5.0))
