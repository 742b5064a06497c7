"""HTTP routes on the gateway's port: pages, static files, health, metrics, 404."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from gateway.server import GatewayServer
from tests.conftest import Join


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    def fetch() -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    return await asyncio.to_thread(fetch)


async def test_healthz_counts_conversations_and_sessions(server: GatewayServer, join: Join) -> None:
    status, headers, body = await get(server.url + "/healthz")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) | {"version": None} == {
        "status": "ok",
        "conversations": 0,
        "sessions": 0,
        "peer_connections": 0,
        "version": None,
        "dev": False,
    }
    await join("u1", room="r1")
    await join("u2", room="r2")
    await join("a1", role="agent")
    health = json.loads((await get(server.url + "/healthz"))[2])
    assert (health["conversations"], health["sessions"]) == (2, 3)


async def test_metrics_count_messages_and_errors(server: GatewayServer, join: Join) -> None:
    ann, _ = await join("u1", room="r1")
    await ann.send({"type": "chat", "text": "hi"})
    await ann.expect("chat")
    await ann.send_raw("garbage")
    await ann.error("bad_request")
    status, headers, body = await get(server.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    for line in (
        'talkgate_messages_received_total{type="chat"} 1.0',
        'talkgate_messages_received_total{type="join"} 1.0',
        'talkgate_messages_sent_total{type="chat"} 1.0',
        'talkgate_errors_total{code="bad_request"} 1.0',
        'talkgate_errors_total{code="rate_limited"} 0.0',
        "talkgate_connections 1.0",
        "talkgate_sessions 1.0",
        "talkgate_conversations 1.0",
    ):
        assert line in text, line
    assert 'talkgate_handle_seconds_count{type="chat"} 1.0' in text


@pytest.mark.parametrize(
    ("path", "ctype", "contains"),
    [
        ("/", "text/html", b"talkgate"),
        ("/agent", "text/html", b"agent"),
        ("/static/talkgate.js", "text/javascript", b"export"),
        ("/static/style.css", "text/css", b"{"),
    ],
)
async def test_pages_and_static_files(server: GatewayServer, path: str, ctype: str, contains: bytes) -> None:
    status, headers, body = await get(server.url + path + "?token=abc")
    assert status == 200, path
    assert headers["Content-Type"].startswith(ctype)
    assert contains in body
    status, _, body = await get(server.url + path, {"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b""


@pytest.mark.parametrize(
    "path",
    ["/nope", "/static/", "/static/../pyproject.toml", "/static/%2e%2e/server.py", "/static/missing.js", "/ws/x"],
)
async def test_unknown_paths_are_404(server: GatewayServer, path: str) -> None:
    status, _, body = await get(server.url + path)
    assert status == 404 and body == b"not found\n"


async def test_plain_get_on_the_websocket_path_asks_for_an_upgrade(server: GatewayServer) -> None:
    status, _, _ = await get(server.url + "/ws")
    assert status == 426
