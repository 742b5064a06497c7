"""Webhooks end to end, against real receivers over real HTTP and real databases (each
test that records runs on SQLite and PostgreSQL): a small aiohttp app on a free loopback
port verifies every signature with the ``standardwebhooks`` library and keeps what it got."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
import standardwebhooks
from aiohttp import web
from click.testing import CliRunner

from gateway import cli, webhook_delivery
from gateway.cli import main
from gateway.config import Config
from gateway.records import SqlRecords
from gateway.server import GatewayServer
from tests.client import Client
from tests.conftest import SECRET, listen_only, make_token, until
from tests.gateway_process import GatewayProcess
from tests.rtc_client import RtcClient

HOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Receiver:
    """A webhook endpoint: verifies, records, and answers as told (``fail_first`` tries of
    each event with 500, or ``hang`` for ever)."""

    def __init__(self, *, fail_first: int = 0, hang: bool = False, port: int = 0) -> None:
        self.fail_first = fail_first
        self.hang = hang
        self.port = port
        #: Every verified delivery, in arrival order (duplicates included).
        self.got: list[dict[str, Any]] = []
        self.tries: dict[str, int] = {}
        self.bad_signatures = 0
        self.arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            server = site._server
            assert isinstance(server, asyncio.Server)
            self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        try:
            payload = standardwebhooks.Webhook(HOOK_SECRET).verify(body, dict(request.headers))
        except standardwebhooks.WebhookVerificationError:
            self.bad_signatures += 1
            return web.Response(status=400)
        assert payload["id"] == request.headers["webhook-id"]
        if self.hang:
            await asyncio.Event().wait()
        tries = self.tries[payload["id"]] = self.tries.get(payload["id"], 0) + 1
        if tries <= self.fail_first:
            return web.Response(status=500)
        self.got.append(payload)
        self.arrived.set()
        return web.Response(status=204)

    def unique(self, room: str | None = None) -> list[dict[str, Any]]:
        """What arrived, each event once (by ``webhook-id``), in first-arrival order."""
        seen: set[str] = set()
        out = []
        for payload in self.got:
            if payload["id"] not in seen and (room is None or payload["data"]["room"] == room):
                seen.add(payload["id"])
                out.append(payload)
        return out

    async def until(self, count: int, room: str | None = None, timeout: float = 20) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.unique(room)) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.unique(room)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    await rec.start()
    yield rec
    await rec.stop()


async def settled(server: GatewayServer, status: str, count: int) -> list[Any]:
    """The outbox rows of ``status`` once there are ``count`` (the receiver may get the last
    one before the worker marks it)."""
    assert isinstance(server.records, SqlRecords)
    async with asyncio.timeout(10):
        while True:
            rows = (await server.records.deliveries(status, None, 1000))[0]
            if len(rows) >= count:
                return rows
            await asyncio.sleep(0.02)


def hooked(config: Config, database_url: str, *urls: str) -> Config:
    return dataclasses.replace(config, database=database_url, webhook_urls=urls, webhook_secret=HOOK_SECRET)


async def joined(server_url: str, identity: str, role: str = "customer", room: str | None = "r1") -> Client:
    client = await Client.open(server_url)
    await client.send({"type": "join", "token": make_token(identity, role, room, name=identity.upper())})
    await client.expect("joined")
    if role == "agent":
        await client.expect("queue")
    return client


async def a_conversation(ws_url: str, room: str = "r1") -> None:
    """Open, chats, escalate, an agent accepts, everyone leaves."""
    ann = await joined(ws_url, "u1", room=room)
    await ann.send({"type": "chat", "text": "my router blinks red"})
    await ann.wait_for("chat", text="my router blinks red")
    await ann.send({"type": "escalate", "reason": "billing"})
    await ann.wait_for("queued")
    bob = await joined(ws_url, "a1", "agent", None)
    await bob.send({"type": "accept", "conversation": room})
    await bob.wait_for("joined", conversation=room)
    await bob.send({"type": "chat", "text": "let me look"})
    await bob.wait_for("chat", text="let me look")
    await bob.close()
    await ann.wait_for("participant.left", identity="a1")
    await ann.send({"type": "leave"})
    await ann.wait_for("left")
    await ann.close()


#: What ``a_conversation`` makes, in order.
CONVERSATION = [
    "conversation.opened",
    "message.created",
    "message.created",  # the queue notice
    "queue.entered",
    "queue.accepted",
    "message.created",
    "conversation.closed",
]


async def test_a_conversation_arrives_signed_and_in_order(
    config: Config, database_url: str, receiver: Receiver
) -> None:
    second = Receiver()
    await second.start()
    try:
        async with GatewayServer(hooked(config, database_url, receiver.url, second.url)) as server:
            await a_conversation(server.ws_url)
            got = await receiver.until(len(CONVERSATION))
            also = await second.until(len(CONVERSATION))
            delivered = await settled(server, "delivered", 2 * len(CONVERSATION))
            assert len(delivered) == 2 * len(CONVERSATION)
    finally:
        await second.stop()
    assert [p["type"] for p in got] == CONVERSATION
    assert [p["id"] for p in also] == [p["id"] for p in got]  # one webhook-id per event, every endpoint
    assert receiver.bad_signatures == 0
    record = got[0]["data"]["conversation"]
    assert all(p["data"]["conversation"] == record and p["data"]["room"] == "r1" for p in got)
    assert got[1]["data"]["text"] == "my router blinks red"
    assert got[1]["data"]["from"] == {"identity": "u1", "role": "customer", "name": "U1"}
    assert got[3]["data"]["reason"] == "billing"
    assert got[4]["data"]["agent"]["identity"] == "a1"
    assert got[0]["timestamp"].endswith("Z")


async def test_a_receiver_that_fails_three_times_gets_every_event(
    config: Config, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_delivery, "FIRST_RETRY_SECONDS", 0.02)
    receiver = Receiver(fail_first=3)
    await receiver.start()
    try:
        async with GatewayServer(hooked(config, database_url, receiver.url)) as server:
            await a_conversation(server.ws_url)
            got = await receiver.until(len(CONVERSATION))
            delivered = await settled(server, "delivered", len(CONVERSATION))
            metrics = (await server.render_metrics()).decode()
    finally:
        await receiver.stop()
    assert [p["type"] for p in got] == CONVERSATION
    assert all(tries == 4 for tries in receiver.tries.values())
    assert [d.attempts for d in delivered] == [4] * len(CONVERSATION)
    assert f'talkgate_webhook_deliveries_total{{result="retry"}} {3.0 * len(CONVERSATION)}' in metrics
    assert f'talkgate_webhook_deliveries_total{{result="delivered"}} {float(len(CONVERSATION))}' in metrics


async def test_a_delivery_past_its_retry_window_fails_and_can_be_retried(
    config: Config, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_delivery, "FIRST_RETRY_SECONDS", 0.02)
    receiver = Receiver(fail_first=1_000_000)
    await receiver.start()
    settings = dataclasses.replace(hooked(config, database_url, receiver.url), webhook_retry_hours=0.5 / 3600)
    try:
        async with GatewayServer(settings) as server:
            ann = await joined(server.ws_url, "u1")  # conversation.opened
            assert isinstance(server.records, SqlRecords) and server.webhooks is not None
            [row] = await settled(server, "failed", 1)
            assert row.type == "conversation.opened" and row.attempts >= 2 and row.last_error == "HTTP 500"
            receiver.fail_first = 0
            again = await server.webhooks.retry(row.id)
            assert again is not None and again.status == "pending" and again.attempts == row.attempts
            [payload] = await receiver.until(1)
            assert payload["id"] == row.msg_id
            await settled(server, "delivered", 1)
            assert await server.webhooks.retry(10**9) is None
            page, more = await server.records.deliveries(None, None, 1)
            assert [d.status for d in page] == ["delivered"] and not more
            await ann.close()
    finally:
        await receiver.stop()


async def test_a_killed_gateway_loses_no_webhook(database_url: str) -> None:
    """SIGKILL while deliveries wait for a receiver that is down; restarted with the
    receiver up, every event arrives (duplicates allowed, dedupe by webhook-id)."""
    url = database_url.replace("+aiosqlite", "").replace("+asyncpg", "")
    receiver = Receiver()
    await receiver.start()  # for a free port: then down
    await receiver.stop()
    args = ["serve", "--port", "0", "--database", url, "--webhook-url", receiver.url, "--reconnect-grace-seconds", "0"]
    env = {"TALKGATE_SECRET": SECRET, "TALKGATE_WEBHOOK_SECRET": HOOK_SECRET}
    gateway = GatewayProcess(*args, env=env, drain=True)
    try:
        for room in ("k1", "k2"):
            await a_conversation(gateway.ws_url, room)
        await asyncio.sleep(0.3)  # the last commit and a failed try or two
    finally:
        gateway.proc.send_signal(signal.SIGKILL)
        gateway.proc.wait(10)
    await receiver.start()
    again = GatewayProcess(*args, env=env, drain=True)
    try:
        for room in ("k1", "k2"):
            got = await receiver.until(len(CONVERSATION), room, timeout=30)
            assert [p["type"] for p in got] == CONVERSATION
    finally:
        again.stop()
        await receiver.stop()
    assert receiver.bad_signatures == 0


async def test_a_hanging_receiver_does_not_delay_chat(config: Config, database_url: str) -> None:
    receiver = Receiver(hang=True)
    await receiver.start()
    try:
        settings = dataclasses.replace(hooked(config, database_url, receiver.url), webhook_timeout=30)
        async with GatewayServer(settings) as server:
            ann = await joined(server.ws_url, "u1")
            slowest = 0.0
            for i in range(50):
                started = time.perf_counter()
                await ann.send({"type": "chat", "text": f"m{i}"})
                await ann.wait_for("chat", text=f"m{i}")
                slowest = max(slowest, time.perf_counter() - started)
            assert slowest < 0.5
            assert isinstance(server.records, SqlRecords)
            pending, _ = await server.records.deliveries("pending", None, 1000)
            assert len(pending) == 51  # opened + 50 chats, none delivered, none lost
            await ann.close()
    finally:
        await receiver.stop()


async def test_no_webhook_configured_writes_no_outbox_row(config: Config, database_url: str) -> None:
    async with GatewayServer(dataclasses.replace(config, database=database_url)) as server:
        await a_conversation(server.ws_url)
        assert isinstance(server.records, SqlRecords) and server.records.engine is not None
        async with server.records.engine.connect() as conn:
            count = (await conn.execute(sa.text("SELECT count(*) FROM webhook_outbox"))).scalar_one()
    assert count == 0


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--database", "none", "--webhook-url", "http://127.0.0.1:9/h", "--webhook-secret", HOOK_SECRET], "database"),
        (["--webhook-url", "http://127.0.0.1:9/h"], "--webhook-secret"),
        (["--webhook-url", "http://127.0.0.1:9/h", "--webhook-secret", "hunter2"], "whsec_"),
    ],
)
def test_the_cli_refuses_webhooks_it_cannot_send(args: list[str], problem: str) -> None:
    result = CliRunner().invoke(main, ["serve", "--secret", SECRET, *args])
    assert result.exit_code == 2 and problem in result.output


def test_webhook_urls_come_from_the_environment_space_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Config] = []
    monkeypatch.setattr(cli, "run", lambda config, demo_bot=None: seen.append(config))
    env = {"TALKGATE_WEBHOOK_URLS": "http://a.example/h https://b.example/h", "TALKGATE_WEBHOOK_SECRET": HOOK_SECRET}
    result = CliRunner().invoke(main, ["serve", "--secret", SECRET, "--database", "sqlite:///x.db"], env=env)
    assert result.exit_code == 0, result.output
    assert seen[0].webhook_urls == ("http://a.example/h", "https://b.example/h")
    assert (seen[0].webhook_retry_hours, seen[0].webhook_timeout) == (24.0, 10.0)


async def test_delivered_rows_are_pruned_and_the_gauges_follow_the_outbox(
    config: Config, database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivered rows go once older than the retry window (they copy what was said);
    the depth and oldest-age gauges show what is pending."""
    monkeypatch.setattr(webhook_delivery, "GAUGE_SECONDS", 0.05)
    monkeypatch.setattr(webhook_delivery, "PRUNE_SECONDS", 0.1)
    settings = dataclasses.replace(hooked(config, database_url, receiver.url), webhook_retry_hours=0.3 / 3600)
    async with GatewayServer(settings) as server:
        await a_conversation(server.ws_url)
        await receiver.until(len(CONVERSATION))
        assert isinstance(server.records, SqlRecords)
        async with asyncio.timeout(10):
            while True:
                if not (await server.records.deliveries(None, None, 100))[0]:
                    break
                await asyncio.sleep(0.05)
        metrics = (await server.render_metrics()).decode()
    assert "talkgate_webhook_outbox_depth 0.0" in metrics
    assert "talkgate_webhook_oldest_pending_seconds 0.0" in metrics


async def test_erasing_a_customer_deletes_the_webhooks_about_them(config: Config, database_url: str) -> None:
    down = Receiver()
    await down.start()
    await down.stop()  # nobody listens: every row stays pending
    async with GatewayServer(hooked(config, database_url, down.url)) as server:
        await a_conversation(server.ws_url, "e1")
        other = await joined(server.ws_url, "u2", room="e2")
        assert isinstance(server.records, SqlRecords)
        rows = await settled(server, "pending", len(CONVERSATION) + 1)
        assert {r.conversation.split("~")[0] for r in rows} == {"e1", "e2"}
        await server.records.erase_customer("u1")
        left = (await server.records.deliveries(None, None, 100))[0]
        assert [r.type for r in left] == ["conversation.opened"] and str(left[0].conversation).startswith("e2~")
        await other.close()


async def test_a_call_is_call_started_and_call_ended(config: Config, database_url: str, receiver: Receiver) -> None:
    async with GatewayServer(hooked(config, database_url, receiver.url)) as server:
        client = await Client.open(server.ws_url)
        await client.send({"type": "join", "token": make_token("u1", "customer", "c1", name="Ann")})
        await client.expect("joined")
        customer = RtcClient(client)
        try:
            await listen_only(customer)
            await customer.client.send({"type": "hangup"})
            got = await receiver.until(3)
        finally:
            await customer.close()
    assert [p["type"] for p in got] == ["conversation.opened", "call.started", "call.ended"]
    assert got[1]["data"]["participant"] == {"identity": "u1", "role": "customer", "name": "Ann"}
    assert got[2]["data"]["reason"] == "hangup"


async def test_a_conversation_the_app_starts_opens_once(config: Config, database_url: str, receiver: Receiver) -> None:
    """The app writes to a customer nobody is with: ``conversation.opened`` names them, and
    their join later continues that conversation (not a second ``opened``)."""
    key = "api-key-0123456789abcdef-0123"
    settings = dataclasses.replace(hooked(config, database_url, receiver.url), api_keys=(key,), api_port=0)
    async with GatewayServer(settings) as server, aiohttp.ClientSession() as http:
        ann = await joined(server.ws_url, "u1", room="support")
        await ann.close()
        records = server.records
        assert records is not None
        await until(lambda: records.customer("u1"))  # known once the join is committed
        url = f"{server.api_url}/conversations/appt-1/messages"
        body = {"text": "Booked: Tue 10:00", "customer": "u1"}
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 201
        ann = await joined(server.ws_url, "u1", room="appt-1")
        await ann.send({"type": "chat", "text": "thanks"})
        await ann.wait_for("chat", text="thanks")
        await ann.send({"type": "leave"})
        await ann.wait_for("left")
        await ann.close()
        got = await receiver.until(4, room="appt-1")
    assert [p["type"] for p in got] == [
        "conversation.opened",
        "message.created",
        "message.created",
        "conversation.closed",
    ]
    assert got[0]["data"]["customer"] == "u1"
    assert {p["data"]["conversation"] for p in got} == {got[0]["data"]["conversation"]}
    assert [p["data"].get("text") for p in got[1:3]] == ["Booked: Tue 10:00", "thanks"]


async def test_gateways_sharing_a_database_send_each_webhook_once(
    config: Config, database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two gateways on one PostgreSQL database: one of them owns the endpoint (an advisory
    lock) and sends every event once, in order, whichever wrote it; when it stops, the
    other takes over."""
    if not database_url.startswith("postgresql"):
        pytest.skip("one process writes a SQLite file")
    monkeypatch.setattr(webhook_delivery, "POLL_SECONDS", 0.1)
    settings = hooked(config, database_url, receiver.url)
    async with GatewayServer(settings) as two:
        async with GatewayServer(settings) as one:
            await a_conversation(one.ws_url, room="ra")
            await a_conversation(two.ws_url, room="rb")
            for room in ("ra", "rb"):
                assert [p["type"] for p in await receiver.until(len(CONVERSATION), room)] == CONVERSATION
        await a_conversation(two.ws_url, room="rc")
        assert [p["type"] for p in await receiver.until(len(CONVERSATION), "rc")] == CONVERSATION
    await asyncio.sleep(0.3)  # anything sent twice would have arrived by now
    assert len(receiver.got) == len(receiver.unique()) == 3 * len(CONVERSATION)
