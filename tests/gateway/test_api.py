"""The server API (gateway/api.py) over real HTTP: an aiohttp client against a real gateway,
in-process (SQLite and PostgreSQL records) and as a subprocess."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import tokens
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.server import GatewayServer
from tests.client import Client
from tests.conftest import SECRET, make_token, until
from tests.gateway_process import GatewayProcess

KEY = "api-key-0123456789abcdef-0123"
OTHER_KEY = "api-key-second-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Api:
    """An aiohttp session against one gateway's API that returns (status, JSON body)."""

    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.session = session

    async def call(
        self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None, **kw: Any
    ) -> tuple[int, Any]:
        async with self.session.request(
            method, self.base + path, json=body, headers=AUTH if headers is None else headers, **kw
        ) as response:
            data = await response.json(content_type=None)
            if response.status >= 400:
                assert response.content_type == "application/problem+json", data
                assert set(data) == {"type", "title", "status", "detail", "code"}, data
                assert data["status"] == response.status
            return response.status, data

    async def ok(self, path: str, check: Callable[[Any], Any]) -> bool:
        """Whether ``GET path`` answers 200 with a body that passes ``check``."""
        status, data = await self.call("GET", path)
        return status == 200 and bool(check(data))


@pytest.fixture
async def gateway(config: Config, database_url: str) -> AsyncIterator[GatewayServer]:
    settings = dataclasses.replace(config, database=database_url, api_keys=(KEY, OTHER_KEY), api_port=0)
    async with GatewayServer(settings) as server:
        yield server


@pytest.fixture
async def api(gateway: GatewayServer) -> AsyncIterator[Api]:
    assert gateway.api_url is not None
    async with aiohttp.ClientSession() as session:
        yield Api(gateway.api_url, session)


async def joined(server: GatewayServer, identity: str, role: str = "customer", room: str | None = "r1") -> Client:
    client, _ = await joining(server, identity, role, room)
    return client


async def joining(
    server: GatewayServer, identity: str, role: str = "customer", room: str | None = "r1"
) -> tuple[Client, dict[str, Any]]:
    """A client that has joined, and its ``joined`` message."""
    client = await Client.open(server.ws_url)
    await client.send({"type": "join", "token": make_token(identity, role, room)})
    message = await client.expect("joined")
    if role == "agent":
        await client.expect("queue")
    return client, message


# -- auth, configuration -------------------------------------------------------------------


async def test_every_route_refuses_a_request_without_a_valid_key(api: Api) -> None:
    jwt = make_token("u1", "agent")
    refusals = [{}, {"Authorization": "Bearer wrong-key-0123456789abcdef"}, {"Authorization": f"Bearer {jwt}"}]
    refusals += [{"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}]
    for headers in refusals:
        for path in ("/queue", "/conversations", "/customers/u1", "/conversations/r1/events"):
            status, problem = await api.call("GET", path, headers=headers)
            assert (status, problem["code"]) == (401, "unauthorized"), headers
        status, problem = await api.call("POST", "/tokens", {"role": "agent", "identity": "a"}, headers=headers)
        assert status == 401
    # Every configured key works.
    for key in (KEY, OTHER_KEY):
        status, _ = await api.call("GET", "/queue", headers={"Authorization": f"Bearer {key}"})
        assert status == 200


async def test_the_openapi_document_lists_every_route_and_needs_no_key(api: Api) -> None:
    status, doc = await api.call("GET", "/openapi.json", headers={})
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    assert {"/api/v1/tokens", "/api/v1/conversations/{id}/events", "/api/v1/customers/{identity}"} <= set(doc["paths"])
    assert doc["paths"]["/api/v1/customers/{identity}"].keys() == {"get", "put", "delete"}
    assert {"TokenRequest", "Problem", "ConversationBody"} <= set(doc["components"]["schemas"])
    assert doc["components"]["schemas"]["TokenRequest"]["additionalProperties"] is False
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc))
    assert refs and set(refs) <= set(doc["components"]["schemas"])  # every reference resolves
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            assert ("security" in operation) == (path != "/api/v1/openapi.json"), path


async def test_the_api_is_off_without_a_key_and_keys_must_be_long(config: Config) -> None:
    async with GatewayServer(config) as server:
        assert server.api is None and server.api_url is None
    with pytest.raises(ConfigError, match="24"):
        dataclasses.replace(config, api_keys=("short",))


# -- tokens --------------------------------------------------------------------------------


async def test_a_minted_customer_token_joins_its_room(api: Api, gateway: GatewayServer) -> None:
    body = {"role": "customer", "identity": "u7", "name": "Ann", "room": "r7", "profile": {"plan": "pro"}}
    status, minted = await api.call("POST", "/tokens", body)
    assert status == 201
    grant = tokens.verify(SECRET, minted["token"])
    assert (grant.identity, grant.room, grant.name, grant.profile) == ("u7", "r7", "Ann", {"plan": "pro"})
    assert minted["url"] == f"{gateway.url}/?token={minted['token']}"
    client = await Client.open(gateway.ws_url)
    await client.send({"type": "join", "token": minted["token"]})
    await client.expect("joined", conversation="r7")
    await client.close()
    status, agent = await api.call("POST", "/tokens", {"role": "agent", "identity": "a1", "ttl_seconds": 60})
    assert agent["url"].startswith(f"{gateway.url}/agent?token=")
    assert agent["expires"] - minted["expires"] in range(-3600, -3400)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"role": "customer", "identity": "u1"}, 400),  # a customer needs a room
        ({"role": "admin", "identity": "u1"}, 400),
        ({"role": "agent", "identity": ""}, 400),
        ({"role": "agent", "identity": "x" * 129}, 400),
        ({"role": "agent", "identity": "system"}, 400),
        ({"role": "agent", "identity": 7}, 400),
        ({"role": "agent", "identity": "a", "admin": True}, 400),  # unknown field
        ({"role": "agent", "identity": "a", "ttl_seconds": 0}, 400),
        ({"role": "agent", "identity": "a", "ttl_seconds": 10**9}, 400),
        ({"role": "agent", "identity": "a", "profile": {"p": 1}}, 400),
        ({"role": "customer", "identity": "u", "room": "r", "profile": {"p": "x" * 5000}}, 413),
        ([], 400),
        ("role", 400),
    ],
)
async def test_token_requests_are_validated(api: Api, body: Any, status: int) -> None:
    got, problem = await api.call("POST", "/tokens", body)
    assert got == status, problem
    assert problem["code"] == {400: "bad_request", 413: "too_large"}[status]


async def test_hostile_requests_get_problems_never_500(api: Api) -> None:
    huge = b'{"role": "agent", "identity": "' + b"x" * 100_000 + b'"}'
    status, problem = await api.call("POST", "/tokens", data=huge, headers={**AUTH, "Content-Type": "application/json"})
    assert (status, problem["code"]) == (413, "too_large")
    for raw in (b"", b"{", b"\xff\xfe", b"null", b"[1,2]", b'{"role": "agent", "identity": "a"}{}'):
        status, problem = await api.call("POST", "/tokens", data=raw, headers=AUTH)
        assert status == 400, raw
    for path in (
        "/conversations/..%2F..%2Fetc%2Fpasswd",
        "/conversations/%2e%2e/events",
        "/conversations/" + "x" * 500,
        "/conversations/a%00b",
        "/conversations/a%0Ab/events",
        "/customers/" + "y" * 200,
        "/customers/%7F",
        "/nowhere",
    ):
        status, problem = await api.call("GET", path)
        assert (status, problem["code"]) == (404, "not_found"), path
    for query in ("cursor=%%%", "cursor=bm90IGpzb24", "cursor=WyJhIiwxXQ", "limit=0", "limit=x", "limit=100000"):
        status, problem = await api.call("GET", "/conversations?" + query)
        assert (status, problem["code"]) == (400, "bad_request"), query
    for query in ("state=maybe", "since=-1", "since=99999999999999999999", "customer=", "customer=" + "c" * 129):
        status, _ = await api.call("GET", "/conversations?" + query)
        assert status == 400, query
    status, problem = await api.call("DELETE", "/queue")
    assert status == 405
    status, problem = await api.call("POST", "/conversations/r1/messages", {"text": "hi", "html": "<b>"})
    assert status == 400


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
        max_leaves=12,
    ),
    path=st.sampled_from(
        ["/tokens", "/conversations/r1/messages", "/conversations/r1/escalate", "/conversations/r1/close"]
    ),
)
async def test_fuzzed_bodies_never_get_a_500(api: Api, body: Any, path: str) -> None:
    status, _ = await api.call("POST", path, data=json.dumps(body), headers=AUTH)
    assert 200 <= status < 500


# -- conversations, events, messages -------------------------------------------------------


async def test_conversations_and_events_paginate_to_the_end(api: Api, gateway: GatewayServer) -> None:
    staying: list[Client] = []
    for n in range(5):
        client = await joined(gateway, f"c{n}", room=f"room{n}")
        for i in range(3):
            await client.send({"type": "chat", "text": f"hello {i}"})
            await client.expect("chat")
        if n < 3:
            await client.send({"type": "leave"})
            await client.expect("left")
            await client.close()
        else:
            staying.append(client)
    seen: list[str] = []
    cursor = ""
    while True:
        status, page = await api.call("GET", f"/conversations?limit=2{cursor}")
        assert status == 200 and len(page["conversations"]) <= 2
        seen += [c["room"] for c in page["conversations"]]
        if page["next"] is None:
            break
        cursor = f"&cursor={page['next']}"
    assert sorted(seen) == [f"room{n}" for n in range(5)] and len(set(seen)) == 5
    status, page = await api.call("GET", "/conversations?customer=c4")
    assert [(c["room"], c["customer"]) for c in page["conversations"]] == [("room4", "c4")]
    # The writer commits the last leave after ``left``.
    await until(lambda: api.ok("/conversations?state=closed", lambda page: len(page["conversations"]) == 3))
    status, closed = await api.call("GET", "/conversations?state=closed&limit=50")
    assert sorted(c["room"] for c in closed["conversations"]) == ["room0", "room1", "room2"]
    status, live = await api.call("GET", "/conversations?state=open")
    assert sorted(c["room"] for c in live["conversations"]) == ["room3", "room4"]
    status, since = await api.call("GET", f"/conversations?since={2**62}")
    assert since == {"conversations": [], "next": None}

    status, one = await api.call("GET", "/conversations/room1")
    assert status == 200 and one["state"] == "closed" and one["customer"] == "c1" and one["participants"] == []
    texts: list[str] = []
    after = ""
    pages = 0
    while True:
        status, page = await api.call("GET", f"/conversations/{one['id']}/events?limit=2{after}")
        assert status == 200 and page["conversation"] == one["id"]
        pages += 1
        texts += [e["text"] for e in page["events"] if e["type"] == "chat"]
        if page["next"] is None:
            break
        after = f"&after={page['next']}"
    assert texts == ["hello 0", "hello 1", "hello 2"] and pages >= 3
    status, problem = await api.call("GET", "/conversations/no-such-room/events")
    assert (status, problem["code"]) == (404, "not_found")
    status, problem = await api.call("GET", f"/conversations/{one['id']}/events?after=x")
    assert (status, problem["code"]) == (400, "bad_request")
    for client in staying:
        await client.close()


async def test_the_apps_message_reaches_the_customer_and_the_timeline(api: Api, gateway: GatewayServer) -> None:
    ann = await joined(gateway, "u1")
    status, message = await api.call(
        "POST", "/conversations/r1/messages", {"text": "Your parcel left", "meta": {"o": 7}}
    )
    assert status == 201
    assert message["from"] == {"identity": "system", "role": "system", "name": "talkgate"}
    chat = await ann.wait_for("chat", text="Your parcel left")
    assert chat["id"] == message["id"] and chat["from"]["role"] == "system"
    status, record = await api.call("GET", "/conversations/r1")
    assert record["state"] == "open" and [p["identity"] for p in record["participants"]] == ["u1"]
    status, page = await api.call("GET", f"/conversations/{record['id']}/events")
    said = [e for e in page["events"] if e["type"] == "chat"]
    assert said[-1]["text"] == "Your parcel left" and said[-1]["ref"] == message["id"]
    meta = [e for e in page["events"] if e["type"] == "meta"]
    assert meta and meta[-1]["meta"] == {"o": 7} and meta[-1]["message"] == message["id"]
    # The record id names the same live conversation.
    status, _ = await api.call("POST", f"/conversations/{record['id']}/messages", {"text": "By record id"})
    assert status == 201
    await ann.wait_for("chat", text="By record id")
    for body, code in (({"text": ""}, 400), ({"text": "   "}, 400), ({"text": "x" * 5000}, 413), ({}, 400)):
        status, _ = await api.call("POST", "/conversations/r1/messages", body)
        assert status == code, body
    await ann.close()


async def test_close_makes_everyone_leave(api: Api, gateway: GatewayServer) -> None:
    ann = await joined(gateway, "u1")
    await ann.send({"type": "escalate"})
    await ann.wait_for("queued")
    bob = await joined(gateway, "a1", "agent", None)
    await bob.send({"type": "accept", "conversation": "r1"})
    await bob.wait_for("joined", conversation="r1")
    status, done = await api.call("POST", "/conversations/r1/close")
    assert (status, done) == (200, {"conversation": "r1", "status": "closed"})
    await ann.wait_for("left", conversation="r1")
    await bob.wait_for("left", conversation="r1")
    assert await gateway.store.participants("r1") is None
    await until(lambda: api.ok("/conversations/r1", lambda record: record["state"] == "closed"))
    status, record = await api.call("GET", "/conversations/r1")
    assert record["ended"] == "closed"
    status, problem = await api.call("POST", "/conversations/r1/close")
    assert (status, problem["code"]) == (404, "not_found")
    status, problem = await api.call("POST", f"/conversations/{record['id']}/messages", {"text": "late"})
    assert (status, problem["code"]) == (404, "not_found")
    # The customer may join again: a new conversation (a closed one is not resumed).
    await ann.send({"type": "join", "token": make_token("u1", "customer", "r1")})
    again = await ann.expect("joined", conversation="r1")
    assert again["history"] == []
    await until(lambda: api.ok("/conversations/r1", lambda fresh: fresh["id"] != record["id"]))
    await ann.close()
    await bob.close()


async def test_the_app_writes_to_a_customer_who_is_not_connected(api: Api, gateway: GatewayServer) -> None:
    ann = await joined(gateway, "u1", room="support")
    await ann.close()
    await until(lambda: api.ok("/customers/u1", bool))  # known once the join is committed
    status, message = await api.call(
        "POST", "/conversations/appt-5/messages", {"text": "Confirmed: Tue 10:00", "customer": "u1", "meta": {"a": 5}}
    )
    assert status == 201 and message["live"] is False and message["conversation"] == "appt-5"
    status, record = await api.call("GET", "/conversations/appt-5")
    assert (record["state"], record["customer"], record["participants"]) == ("open", "u1", [])
    # Nobody named: the room's customer. The same record goes on.
    status, reminder = await api.call("POST", "/conversations/appt-5/messages", {"text": "Reminder: tomorrow"})
    assert status == 201 and reminder["live"] is False
    status, same = await api.call("GET", "/conversations/appt-5")
    assert same["id"] == record["id"]
    status, page = await api.call("GET", f"/conversations/{record['id']}/events")
    assert [e["type"] for e in page["events"]] == ["chat", "meta", "chat"]
    # The customer finds both when they come, in the same conversation.
    ann, hello = await joining(gateway, "u1", room="appt-5")
    assert [m["text"] for m in hello["history"]] == ["Confirmed: Tue 10:00", "Reminder: tomorrow"]
    status, now = await api.call("GET", "/conversations/appt-5")
    assert now["id"] == record["id"] and [p["identity"] for p in now["participants"]] == ["u1"]
    status, live = await api.call("POST", "/conversations/appt-5/messages", {"text": "See you", "customer": "u2"})
    assert status == 201 and live["live"] is True  # someone is there: delivered, ``customer`` unused
    await ann.wait_for("chat", text="See you")
    await ann.close()
    # Refusals: nobody to write for, a stranger, another customer's open conversation.
    for path, body, code in (
        ("/conversations/nobody-here/messages", {"text": "hi"}, 404),
        ("/conversations/nobody-here/messages", {"text": "hi", "customer": "stranger"}, 404),
        ("/conversations/" + "r" * 129 + "/messages", {"text": "hi", "customer": "u1"}, 404),
    ):
        status, problem = await api.call("POST", path, body)
        assert (status, problem["code"]) == (code, "not_found"), path
    bea = await joined(gateway, "u2", room="elsewhere")
    await bea.close()
    await until(lambda: api.ok("/customers/u2", bool))
    status, _ = await api.call("POST", "/conversations/appt-6/messages", {"text": "For Ann", "customer": "u1"})
    assert status == 201
    status, problem = await api.call("POST", "/conversations/appt-6/messages", {"text": "For Bea", "customer": "u2"})
    assert (status, problem["code"]) == (409, "conflict")
    # Not into another customer's closed (resumable) conversation either: a room is one thread.
    status, problem = await api.call("POST", "/conversations/support/messages", {"text": "For Bea", "customer": "u2"})
    assert (status, problem["code"]) == (409, "conflict")
    # Closing one nobody is in closes its record; the room's next join starts afresh.
    status, done = await api.call("POST", "/conversations/appt-6/close")
    assert (status, done) == (200, {"conversation": "appt-6", "status": "closed"})
    await until(lambda: api.ok("/conversations/appt-6", lambda r: r["state"] == "closed" and r["ended"] == "closed"))
    status, problem = await api.call("POST", "/conversations/appt-6/close")
    assert (status, problem["code"]) == (404, "not_found")
    ann, hello = await joining(gateway, "u1", room="appt-6")
    assert hello["history"] == []
    await ann.close()


async def test_escalate_puts_it_in_the_queue_for_agents(api: Api, gateway: GatewayServer) -> None:
    bob = await joined(gateway, "a1", "agent", None)
    ann = await joined(gateway, "u1")
    status, done = await api.call("POST", "/conversations/r1/escalate", {"reason": "vip"})
    assert (status, done) == (200, {"conversation": "r1", "status": "queued"})
    queue = await bob.wait_for("queue")
    assert [(e["conversation"], e["reason"]) for e in queue["waiting"]] == [("r1", "vip")]
    assert queue["waiting"][0]["customer"]["identity"] == "u1"
    await ann.wait_for("chat", text="An agent will join shortly.")
    status, listed = await api.call("GET", "/queue")
    assert [e["conversation"] for e in listed["waiting"]] == ["r1"]
    assert listed["waiting"][0]["customer"]["identity"] == "u1"
    status, problem = await api.call("POST", "/conversations/r1/escalate", {})
    assert (status, problem["code"]) == (409, "conflict")  # waiting already
    status, problem = await api.call("POST", "/conversations/gone/escalate", {})
    assert (status, problem["code"]) == (404, "not_found")
    status, problem = await api.call("POST", "/conversations/r1/escalate", {"reason": "x" * 201})
    assert status == 400
    await ann.close()
    await bob.close()


# -- customers -----------------------------------------------------------------------------


async def test_customer_profiles_are_read_replaced_and_erased(api: Api, gateway: GatewayServer) -> None:
    status, problem = await api.call("GET", "/customers/u9")
    assert (status, problem["code"]) == (404, "not_found")
    status, created = await api.call("PUT", "/customers/u9", {"profile": {"plan": "free"}, "name": "Uma"})
    assert status == 200 and created["profile"] == {"plan": "free"} and created["name"] == "Uma"
    status, replaced = await api.call("PUT", "/customers/u9", {"profile": {"crm": "C-1"}})
    assert replaced["profile"] == {"crm": "C-1"} and replaced["name"] == "Uma"
    assert replaced["first_seen"] == created["first_seen"]
    status, read = await api.call("GET", "/customers/u9")
    assert read == replaced
    for body, code in (({"profile": {"x": "y" * 5000}}, 413), ({"profile": []}, 400), ({"profile": {}, "z": 1}, 400)):
        status, _ = await api.call("PUT", "/customers/u9", body)
        assert status == code
    status, _ = await api.call("PUT", "/customers/system", {"profile": {}})
    assert status == 400
    # Connected: refused unless forced.
    ann = await joined(gateway, "u9", room="r9")
    # The join's events are committed just after ``joined``.
    await until(lambda: api.ok("/conversations/r9", lambda record: record["state"] == "open"))
    status, problem = await api.call("DELETE", "/customers/u9")
    assert (status, problem["code"]) == (409, "conflict")
    status, problem = await api.call("DELETE", "/customers/u9?force=maybe")
    assert status == 400
    await ann.send({"type": "leave"})
    await ann.expect("left")
    await ann.close()
    await until(lambda: api.ok("/conversations/r9", lambda record: record["state"] == "closed"))
    status, erased = await api.call("DELETE", "/customers/u9")
    assert status == 200 and erased["customers"] == 1 and erased["conversations"] == 1
    status, _ = await api.call("GET", "/customers/u9")
    assert status == 404


async def test_record_endpoints_are_unavailable_without_a_database(config: Config) -> None:
    async with GatewayServer(dataclasses.replace(config, api_keys=(KEY,), api_port=0)) as server:
        assert server.api_url is not None
        async with aiohttp.ClientSession() as session:
            api = Api(server.api_url, session)
            for path in ("/conversations", "/conversations/r1", "/conversations/r1/events", "/customers/u1"):
                status, problem = await api.call("GET", path)
                assert (status, problem["code"]) == (503, "unavailable"), path
            ann = await joined(server, "u1")
            status, _ = await api.call("POST", "/conversations/r1/messages", {"text": "still live"})
            assert status == 201
            await ann.wait_for("chat", text="still live")
            status, _ = await api.call("GET", "/queue")
            assert status == 200
            await ann.close()


async def test_api_metrics_count_requests_by_route_and_status(api: Api, gateway: GatewayServer) -> None:
    await api.call("GET", "/queue")
    await api.call("GET", "/customers/nobody")
    await api.call("GET", "/queue", headers={})
    text = (await gateway.render_metrics()).decode()
    assert 'talkgate_api_requests_total{route="/api/v1/queue",status="200"} 1.0' in text
    assert 'talkgate_api_requests_total{route="/api/v1/queue",status="401"} 1.0' in text
    assert 'talkgate_api_requests_total{route="/api/v1/customers/{identity}",status="404"} 1.0' in text
    assert 'talkgate_api_seconds_count{route="/api/v1/queue"} 2.0' in text


# -- a real subprocess -----------------------------------------------------------------------


async def test_the_api_of_a_gateway_subprocess() -> None:
    gateway = GatewayProcess(
        "serve",
        "--port",
        "0",
        "--api-port",
        "0",
        env={"TALKGATE_SECRET": SECRET, "TALKGATE_API_KEYS": f"{KEY} {OTHER_KEY}"},
    )
    try:
        assert gateway.proc.stderr is not None
        line = await asyncio.to_thread(gateway.proc.stderr.readline)
        match = re.search(r"api listening on (http://\S+/api/v1)", line)
        assert match is not None, line
        async with aiohttp.ClientSession() as session:
            api = Api(match.group(1), session)
            status, _ = await api.call("GET", "/queue", headers={"Authorization": f"Bearer {make_token('a', 'agent')}"})
            assert status == 401
            status, minted = await api.call("POST", "/tokens", {"role": "customer", "identity": "u1", "room": "r1"})
            assert status == 201 and minted["url"].startswith(f"{gateway.url}/?token=")
            client = await Client.open(gateway.ws_url)
            await client.send({"type": "join", "token": minted["token"]})
            await client.expect("joined")
            status, _ = await api.call("POST", "/conversations/r1/messages", {"text": "from the app"})
            assert status == 201
            await client.wait_for("chat", text="from the app")
            status, page = await api.call("GET", "/conversations/r1/events")
            assert [e["text"] for e in page["events"] if e["type"] == "chat"] == ["from the app"]
            status, _ = await api.call("POST", "/conversations/r1/close")
            await client.wait_for("left")
            await client.close()
            status, problem = await api.call("POST", "/tokens", data=b"x" * 200_000, headers=AUTH)
            assert (status, problem["code"]) == (413, "too_large")
    finally:
        gateway.stop()


# -- webhook deliveries (the outbox: gateway/outbox.py, webhook_delivery.py) ----------------


async def test_failed_webhook_deliveries_are_listed_and_retried(config: Config, database_url: str) -> None:
    answers = {"status": 500}
    received: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        received.append(request.headers["webhook-id"])
        return web.Response(status=answers["status"])

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    settings = dataclasses.replace(
        config,
        database=database_url,
        api_keys=(KEY,),
        api_port=0,
        webhook_urls=(f"http://127.0.0.1:{port}/hook",),
        webhook_secret="whsec_" + base64.b64encode(b"k" * 32).decode(),
        webhook_retry_hours=0.5 / 3600,  # fails for good after half a second
        webhook_timeout=1.0,
    )
    try:
        async with GatewayServer(settings) as gateway, aiohttp.ClientSession() as session:
            assert gateway.api_url is not None
            api = Api(gateway.api_url, session)
            ann = await joined(gateway, "u1")
            await until(lambda: api.ok("/webhooks/deliveries?status=failed", lambda page: page["deliveries"]), 20)
            status, page = await api.call("GET", "/webhooks/deliveries?status=failed&limit=1")
            assert status == 200 and len(page["deliveries"]) == 1
            failed = page["deliveries"][0]
            assert failed["status"] == "failed" and failed["attempts"] >= 1 and failed["type"]
            answers["status"] = 204
            status, retried = await api.call("POST", f"/webhooks/deliveries/{failed['id']}/retry")
            assert status == 200 and retried["id"] == failed["id"] and retried["status"] == "pending"
            await until(
                lambda: api.ok(
                    "/webhooks/deliveries?status=delivered",
                    lambda page: failed["id"] in [d["id"] for d in page["deliveries"]],
                ),
                10,
            )
            assert failed["msg_id"] in received
            for path in ("/webhooks/deliveries/999999/retry", "/webhooks/deliveries/x/retry"):
                status, problem = await api.call("POST", path)
                assert (status, problem["code"]) == (404, "not_found")
            status, problem = await api.call("GET", "/webhooks/deliveries?status=lost")
            assert (status, problem["code"]) == (400, "bad_request")
            await ann.close()
    finally:
        await runner.cleanup()
