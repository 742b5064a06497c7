"""Fuzzing the live server: thousands of random and mutated messages from several clients,
then a normal conversation must still work, /healthz must be fine, and the gateway must
never have answered ``internal`` (a bug) or lost its loop."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import random
from typing import Any

from aiortc import RTCPeerConnection
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.config import Config
from gateway.server import GatewayServer
from tests.client import Client, get_json
from tests.conftest import make_token

#: Messages per run; TALKGATE_FUZZ_MESSAGES makes a longer run.
MESSAGES = int(os.environ.get("TALKGATE_FUZZ_MESSAGES", "3000"))
#: How a fuzzed connection may end: normal, going away, too big, try later, refused joins, replaced.
DOCUMENTED_CLOSES = {1000, 1001, 1009, 1013, 4401, 4403, 4408, 4409}
JUNK_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**63,
    1.5e308,
    "",
    "x" * 5000,
    "\u0000\u202e\ud7ff",
    [],
    {},
    [[[[[]]]]],
    {"a": {"b": {"c": None}}},
]


def valid_messages(sdp: str) -> list[dict[str, Any]]:
    """One well-formed example of every client message (a real aiortc offer included)."""
    return [
        {"type": "join", "token": make_token("fz-c", room="fuzz-room")},
        {"type": "join", "token": make_token("fz-a", "agent")},
        {"type": "chat", "text": "hello"},
        {"type": "escalate", "reason": "wants_human"},
        {"type": "accept", "conversation": "fuzz-room"},
        {"type": "leave"},
        {"type": "ping"},
        {"type": "offer", "sdp": sdp},
        {"type": "answer", "sdp": sdp.replace("a=setup:actpass", "a=setup:active")},
        {"type": "candidate", "candidate": "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host", "sdpMid": "0"},
        {"type": "upgrade", "media": "video"},
        {"type": "upgrade.reply", "id": "nope", "accept": True},
        {"type": "hangup"},
        {"type": "history", "conversation": "fuzz-room", "before": None, "limit": 10},
    ]


def mutate(rng: random.Random, message: dict[str, Any]) -> str | bytes:
    """A valid message, broken one of many ways (or, sometimes, left valid)."""
    choice = rng.randrange(12)
    m = dict(message)
    if choice == 0:
        return json.dumps(m)
    if choice == 1 and len(m) > 1:  # drop a field
        del m[rng.choice([k for k in m if k != "type"])]
    elif choice == 2:  # a field of the wrong type
        m[rng.choice(list(m))] = rng.choice(JUNK_VALUES)
    elif choice == 3:  # an unknown or mangled type
        m["type"] = rng.choice(["", "JOIN", "chat ", "teleport", "upgrade.", "x" * 300])
    elif choice == 4:  # truncated or bit-flipped bytes
        data = bytearray(json.dumps(m).encode())
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data[: rng.randrange(1, len(data) + 1)])
    elif choice == 5:  # not UTF-8
        return b'{"type":"chat","text":"\xff\xfe\xc3\x28"}'
    elif choice == 6:  # deeply nested
        depth = rng.choice([100, 1000, 10_000])
        return '{"type":"chat","text":' + "[" * depth + "]" * depth + "}"
    elif choice == 7:  # huge: over --max-message-bytes
        return json.dumps({"type": "chat", "text": "y" * rng.choice([70_000, 200_000])})
    elif choice == 8 and "sdp" in m:  # SDP with lines shuffled, dropped or duplicated
        lines = m["sdp"].split("\r\n")
        if rng.random() < 0.3:
            rng.shuffle(lines)
        m["sdp"] = "\r\n".join(line for line in lines if rng.random() > 0.2) * rng.choice([1, 2])
    elif choice == 9:  # extra unknown fields
        m.update({"extra": rng.choice(JUNK_VALUES), "__proto__": {}, "constructor": 1})
    elif choice == 10:  # not an object
        return json.dumps(rng.choice([[m], "chat", 42, None, True]))
    else:  # binary frame of the same bytes
        return json.dumps(m).encode()
    return json.dumps(m)


async def _drain(ws: ClientConnection, replies: list[dict[str, Any]]) -> int | None:
    """Read everything the gateway says; return the close code."""
    try:
        async for data in ws:
            replies.append(json.loads(data))
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None
    return ws.close_code


async def test_fuzzing_the_live_server_leaves_it_working(config: Config) -> None:
    rng = random.Random(20261124)
    pc = RTCPeerConnection()
    pc.addTransceiver("audio")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    templates = valid_messages(sdp)
    # A high rate limit so the fuzz reaches the handlers (a default-rate client is in the mix).
    loose = dataclasses.replace(config, rate_per_second=5000.0, rate_burst=5000, join_timeout=60.0)
    async with GatewayServer(loose) as server:
        sent = 0
        closes: list[int | None] = []
        replies: list[dict[str, Any]] = []
        while sent < MESSAGES:
            # A wave of clients: some join first (customer, agent), some never do.
            clients: list[tuple[ClientConnection, asyncio.Task[int | None]]] = []
            for role in ("customer", "agent", None, "customer"):
                try:
                    ws = await connect(server.ws_url, max_size=None)
                except InvalidStatus as exc:  # pragma: no cover - would be a limit bug
                    raise AssertionError(f"connection refused: {exc}") from None
                if role is not None:
                    identity = f"fz-{role}-{rng.randrange(3)}"
                    room = "fuzz-room" if role == "customer" or rng.random() < 0.5 else None
                    await ws.send(json.dumps({"type": "join", "token": make_token(identity, role, room)}))
                clients.append((ws, asyncio.create_task(_drain(ws, replies))))
            for _ in range(250):
                ws, reader = rng.choice(clients)
                if reader.done():
                    continue
                try:
                    await ws.send(mutate(rng, rng.choice(templates)))
                except ConnectionClosed:
                    continue
                sent += 1
            for ws, reader in clients:
                await ws.close()
                closes.append(await reader)

        tally = collections.Counter(r.get("code", r.get("type")) for r in replies)
        print(f"fuzz: {sent} messages sent; replies {dict(tally)}; closes {dict(collections.Counter(closes))}")
        # Every close was one the protocol documents; errors were the client's, never a bug.
        assert set(closes) <= DOCUMENTED_CLOSES, closes
        codes = {r["code"] for r in replies if r.get("type") == "error"}
        assert "internal" not in codes, [r for r in replies if r.get("code") == "internal"][:3]
        assert {"bad_request", "too_large"} <= codes
        metrics = (await server.render_metrics()).decode()
        assert 'talkgate_errors_total{code="internal"} 0.0' in metrics

        # A normal conversation still works, and health says so.
        customer = await Client.open(server.ws_url)
        agent = await Client.open(server.ws_url)
        await customer.send({"type": "join", "token": make_token("after-c", room="after")})
        await customer.expect("joined", conversation="after")
        await agent.send({"type": "join", "token": make_token("after-a", "agent", "after")})
        await agent.wait_for("joined", conversation="after")
        await customer.send({"type": "chat", "text": "still works"})
        await agent.wait_for("chat", text="still works")
        await customer.close()
        await agent.close()
        for _ in range(100):  # the fuzzers' sessions and calls wind down
            health = await asyncio.to_thread(get_json, server.url + "/healthz")
            if health["sessions"] == 0 and health["peer_connections"] == 0:
                break
            await asyncio.sleep(0.05)
        assert health == health | {"status": "ok", "sessions": 0, "peer_connections": 0, "conversations": 0}
