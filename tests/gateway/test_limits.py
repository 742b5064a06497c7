"""Capacity and abuse limits against a real gateway: origins, connections, conversations,
participants, peer connections, keepalive, TLS."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.exceptions import InvalidStatus

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.http import origin_allowed
from gateway.server import GatewayServer
from tests.client import Client, get_json
from tests.conftest import make_token
from tests.rtc_client import RtcClient, ToneTrack


@pytest.fixture
async def limited(config: Config, request: pytest.FixtureRequest) -> AsyncIterator[GatewayServer]:
    """A gateway with the limits the test names: ``@pytest.mark.limits(max_connections=2)``."""
    marker = request.node.get_closest_marker("limits")
    async with GatewayServer(dataclasses.replace(config, **(marker.kwargs if marker else {}))) as srv:
        yield srv


async def joined(server: GatewayServer, identity: str, room: str | None, role: str = "customer") -> Client:
    client = await Client.open(server.ws_url)
    await client.send({"type": "join", "token": make_token(identity, role, room)})
    await client.expect("joined", identity=identity)
    return client


# -- Origin -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        ("http://gw.example:8080", "gw.example:8080", (), True),  # the gateway's own pages
        ("https://gw.example", "gw.example", (), True),  # behind a TLS proxy
        ("https://GW.example/", "gw.example", (), True),
        ("https://evil.example", "gw.example", (), False),
        ("http://gw.example:8081", "gw.example:8080", (), False),  # another port is another origin
        ("null", "gw.example", (), False),  # sandboxed iframes, file:// pages
        ("https://app.example", "gw.example", ("https://app.example",), True),
        ("https://app.example", None, ("https://app.example/",), True),
        ("https://app.example.evil", "gw.example", ("https://app.example",), False),
        ("https://anything.example", "gw.example", ("*",), True),
        ("https://gw.example", None, (), False),  # no Host header: nothing to compare with
    ],
)
def test_origin_rules(origin: str, host: str | None, allowed: tuple[str, ...], ok: bool) -> None:
    assert origin_allowed(origin, host, allowed) is ok


async def test_another_sites_page_cannot_open_the_websocket(server: GatewayServer) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await Client.open(server.ws_url, origin="https://evil.example")
    assert refused.value.response.status_code == 403
    # The gateway's own pages, and clients that send no Origin (servers, bots), get in.
    own = await Client.open(server.ws_url, origin=server.url)
    await own.send({"type": "ping"})
    await own.expect("pong")
    await own.close()
    assert b'talkgate_refused_connections_total{reason="origin"} 1.0' in await server.render_metrics()


@pytest.mark.limits(allowed_origins=("https://app.example",))
async def test_allowed_origins_are_let_in(limited: GatewayServer) -> None:
    app = await Client.open(limited.ws_url, origin="https://app.example")
    await app.send({"type": "ping"})
    await app.expect("pong")
    await app.close()
    with pytest.raises(InvalidStatus):
        await Client.open(limited.ws_url, origin="https://other.example")


# -- connections, conversations, participants ---------------------------------------------


@pytest.mark.limits(max_connections=2)
async def test_connections_over_the_limit_get_503_and_health_still_answers(limited: GatewayServer) -> None:
    first = await joined(limited, "u1", "r1")
    second = await Client.open(limited.ws_url)  # not joined yet: still counts
    with pytest.raises(InvalidStatus) as refused:
        await Client.open(limited.ws_url)
    assert refused.value.response.status_code == 503
    assert refused.value.response.headers["Retry-After"] == "2"
    health = await asyncio.to_thread(get_json, limited.url + "/healthz")
    assert health["status"] == "ok"
    await first.ping()  # those inside are not disturbed
    await second.close()
    for _ in range(50):  # the slot frees when the server has seen the close
        if limited.connections < 2:
            break
        await asyncio.sleep(0.02)
    third = await joined(limited, "u2", "r2")
    await third.close()
    await first.close()


@pytest.mark.limits(max_conversations=2)
async def test_a_join_that_would_open_one_conversation_too_many_is_unavailable(limited: GatewayServer) -> None:
    a = await joined(limited, "u1", "r1")
    b = await joined(limited, "u2", "r2")
    c = await Client.open(limited.ws_url)
    await c.send({"type": "join", "token": make_token("u3", room="r3")})
    error = await c.error("unavailable")
    assert "conversations" in error["message"] and error["request"] == "join"
    assert await c.closed() == 1013  # try again later: the browser client reconnects with backoff
    # Joining an existing conversation is not opening one; rejoining is not either.
    agent = await joined(limited, "a1", "r1", "agent")
    again = await joined(limited, "u2", "r2")
    await b.closed()  # replaced
    await a.close()
    await agent.close()
    for _ in range(50):
        if await limited.store.conversation_count() < 2:
            break
        await asyncio.sleep(0.02)
    c = await joined(limited, "u3", "r3")  # a slot is free again
    await c.close()
    await again.close()


@pytest.mark.limits(max_participants=2)
async def test_a_full_conversation_refuses_a_third_participant_but_not_a_rejoin(limited: GatewayServer) -> None:
    customer = await joined(limited, "u1", "r1")
    agent = await joined(limited, "a1", "r1", "agent")
    third = await Client.open(limited.ws_url)
    await third.send({"type": "join", "token": make_token("a2", "agent", "r1")})
    assert "full" in (await third.error("unavailable"))["message"]
    assert await third.closed() == 1013
    await customer.wait_for("participant.joined", identity="a1")
    await customer.quiet()  # nobody else was announced
    replacement = await joined(limited, "u1", "r1")  # the same identity reconnecting is let in
    assert await customer.closed() == 4409
    await replacement.send({"type": "chat", "text": "still here"})
    await agent.wait_for("chat", text="still here")
    await replacement.close()
    await agent.close()


@pytest.mark.limits(max_peer_connections=1)
async def test_an_offer_over_the_peer_connection_limit_is_unavailable(limited: GatewayServer) -> None:
    first = RtcClient(await joined(limited, "u1", "r1"))
    second = RtcClient(await joined(limited, "a1", "r1", "agent"))
    try:
        first.pc.addTrack(ToneTrack(440))
        await first.negotiate()
        second.pc.addTrack(ToneTrack(880))
        await second.pc.setLocalDescription(await second.pc.createOffer())
        await second.client.send({"type": "offer", "sdp": second.pc.localDescription.sdp})
        error = await second.wait_for("error")
        assert error["code"] == "unavailable" and error["request"] == "offer", error
        await second.client.send({"type": "ping"})
        await second.wait_for("pong")  # refused a call, not disconnected
        assert len(limited.broker.router) == 1
    finally:
        await first.close()
        await second.close()


# -- keepalive ----------------------------------------------------------------------------


@pytest.mark.limits(ping_interval=0.2, ping_timeout=0.3)
async def test_a_client_that_stops_answering_pings_is_dropped_and_counts_as_leaving(limited: GatewayServer) -> None:
    watcher = await joined(limited, "u1", "r1")
    silent = await joined(limited, "a1", "r1", "agent")
    await watcher.wait_for("participant.joined", identity="a1")
    silent.ws.transport.pause_reading()  # a vanished laptop: no pongs, no close frame
    # websockets fails the connection (1011) and waits close_timeout (5 s) for the TCP close.
    left = await watcher.wait_for("participant.left", identity="a1", timeout=10)
    assert left["conversation"] == "r1"
    await watcher.ping()  # the keepalive keeps the live client: it answers pings
    await watcher.close()
    silent.ws.transport.abort()


# -- TLS and configuration ----------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_cert_and_key_serve_wss_and_https(config: Config, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    client_tls = ssl.create_default_context(cafile=str(cert))
    async with GatewayServer(dataclasses.replace(config, tls_cert=str(cert), tls_key=str(key))) as tls:
        assert tls.url.startswith("https://") and tls.ws_url.startswith("wss://")
        client = await Client.open(tls.ws_url, ssl=client_tls)
        await client.send({"type": "join", "token": make_token("u1", room="r1")})
        await client.expect("joined")
        await client.close()
        health = await asyncio.to_thread(get_json, tls.url + "/healthz", client_tls)
        assert health["status"] == "ok"


def test_bad_limit_settings_are_refused(config: Config, tmp_path: Path) -> None:
    for bad in (
        {"max_connections": 0},
        {"max_participants": 0},
        {"ping_timeout": 0},
        {"allowed_origins": ("app.example",)},
        {"tls_cert": "cert.pem"},  # without a key
        {"bot_name": "B" * 129},  # longer than any participant's name (the records keep it)
        {"bot_name": ""},
        {"bot_frame_ms": 30},  # not a multiple of the 20 ms VAD frame
        {"bot_frame_ms": 10},
        {"bot_frame_ms": 220},
    ):
        with pytest.raises(ConfigError):
            dataclasses.replace(config, **bad)
    missing = dataclasses.replace(config, tls_cert=str(tmp_path / "no.pem"), tls_key=str(tmp_path / "no.key"))
    with pytest.raises(ConfigError, match="cannot load"):
        missing.ssl_context()
