"""Plain HTTP served by the websockets server through ``process_request``.

The pages, the JS client, health and metrics are a handful of GETs; a second web
framework would add a dependency and a second server for no gain. Static files
are read once at start-up into memory (they are a few KiB), which also means
only files that exist in ``static/`` can ever be served: no path traversal.
"""

from __future__ import annotations

import email.utils
import hashlib
import http
import json
import mimetypes
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

STATIC_DIR = Path(__file__).parent / "static"
WS_PATH = "/ws"
#: The pages load nothing from elsewhere and may not be framed by other sites.
CSP = (
    "default-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'self'"
)
#: Page routes -> file in static/.
PAGES = {"/": "customer.html", "/agent": "agent.html"}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets(directory: Path = STATIC_DIR) -> dict[str, Asset]:
    assets = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        body = path.read_bytes()
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "image/svg+xml"):
            ctype += "; charset=utf-8"
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        assets[path.relative_to(directory).as_posix()] = Asset(body, ctype, etag)
    return assets


def response(
    status: http.HTTPStatus, body: bytes, content_type: str, extra: list[tuple[str, str]] | None = None
) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("X-Content-Type-Options", "nosniff"),
            *(extra or []),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def json_response(status: http.HTTPStatus, payload: object) -> Response:
    return response(status, json.dumps(payload).encode(), "application/json")


def origin_allowed(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """May a page from ``origin`` open the websocket? Always the gateway's own origin (the
    Origin's host:port is the request's Host: its own pages), then the origins listed in
    ``allowed`` (``"*"``: any). Everything else is another site's page acting with the
    visitor's browser (cross-site websocket hijacking)."""
    origin = origin.strip().lower().rstrip("/")
    parts = urlsplit(origin)
    if host is not None and parts.scheme in ("http", "https") and parts.netloc == host.strip().lower():
        return True
    return any(entry == "*" or origin == entry.lower().rstrip("/") for entry in allowed)


class Routes:
    """The ``process_request`` hook: answers every non-websocket request."""

    def __init__(
        self,
        health: Callable[[], Awaitable[dict[str, object]]],
        metrics: Callable[[], Awaitable[bytes]],
        admit: Callable[[ServerConnection, Request], Response | None] = lambda connection, request: None,
        assets: dict[str, Asset] | None = None,
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.admit = admit
        self.assets = load_assets() if assets is None else assets

    async def __call__(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == WS_PATH:
            return self.admit(connection, request)  # None: go on with the websocket handshake
        if path == "/healthz":
            return json_response(http.HTTPStatus.OK, await self.health())
        if path == "/metrics":
            return response(http.HTTPStatus.OK, await self.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        name = PAGES.get(path)
        if name is None and path.startswith("/static/"):
            name = path.removeprefix("/static/")
        asset = self.assets.get(name) if name else None
        if asset is None:
            return response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
        if request.headers.get("If-None-Match") == asset.etag:
            return response(http.HTTPStatus.NOT_MODIFIED, b"", asset.content_type, [("ETag", asset.etag)])
        extra = [("ETag", asset.etag), ("Cache-Control", "no-cache")]
        if name in PAGES.values():
            # The pages embed nothing from elsewhere; forbid framing by other sites.
            extra.append(("Content-Security-Policy", CSP))
        return response(http.HTTPStatus.OK, asset.body, asset.content_type, extra)
