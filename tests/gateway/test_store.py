"""The store's atomic steps: one suite, run against every ``Store`` implementation.

Each implementation is a fixture parameter; a Redis store joins ``STORES`` and must
pass every test here unchanged (the rules rely on exactly these outcomes).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.bus import Bus, Envelope
from gateway.errors import Unavailable
from gateway.messages import ChatMessage, Participant
from gateway.redis_store import RedisStore
from gateway.store import Admission, Enqueued, InMemoryStore, Limits, Store
from tests.conftest import until
from tests.databases import free_port
from tests.redis_server import RedisServer

ANN = Participant("u1", "customer", "Ann")
CID = Participant("u2", "customer", "Cid")
BOB = Participant("a1", "agent", "Bob")
EVE = Participant("a2", "agent", "Eve")
BOT = Participant("bot", "bot", "Assistant")
ROOMY = Limits(max_conversations=100, max_participants=8)

#: The store implementations every test here runs against.
STORES = ["memory", "redis"]


@pytest.fixture(params=STORES)
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Store]]:
    """factory(history_limit, retention_seconds, retained_limit, clock) of one kind of
    store; two made in one test share their state (one Redis, one key prefix), as the
    stores of several gateway processes do."""
    if request.param == "memory":
        yield lambda **kw: InMemoryStore(**kw)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    made: list[RedisStore] = []

    def factory(**kw: Any) -> Store:
        store = RedisStore(server.url(), prefix=prefix, **kw)
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.close()


async def test_join_reports_what_it_changed(make: Callable[..., Store]) -> None:
    store = make()
    first = await store.join("r1", ANN, ROOMY)
    assert first.admission is Admission.ADMITTED and first.added and first.opened
    again = await store.join("r1", ANN, ROOMY)
    assert again.admission is Admission.ADMITTED and not again.added and not again.opened
    assert await store.participants("r1") == [ANN]
    assert await store.conversation_count() == 1


async def test_join_within_limits_and_rejoining_is_always_let_in(make: Callable[..., Store]) -> None:
    store = make()
    tight = Limits(max_conversations=1, max_participants=2)
    assert (await store.join("r1", ANN, tight)).admission is Admission.ADMITTED
    assert (await store.join("r2", CID, tight)).admission is Admission.GATEWAY_FULL
    assert (await store.join("r1", BOB, tight)).admission is Admission.ADMITTED
    assert (await store.join("r1", EVE, tight)).admission is Admission.CONVERSATION_FULL
    assert (await store.join("r1", ANN, tight)).admission is Admission.ADMITTED  # a rejoin
    assert await store.participants("r2") is None
    assert [p.identity for p in await store.participants("r1") or []] == ["u1", "a1"]


async def test_concurrent_joins_never_pass_the_limits(make: Callable[..., Store]) -> None:
    """Check-then-act as one step: 20 joins at once into a conversation of 3 admit 3."""
    store = make()
    limits = Limits(max_conversations=1, max_participants=3)
    people = [Participant(f"u{i}", "customer", f"U{i}") for i in range(20)]
    results = await asyncio.gather(*(store.join("r1", p, limits) for p in people))
    assert sum(r.admission is Admission.ADMITTED for r in results) == 3
    assert len(await store.participants("r1") or []) == 3


async def test_last_leave_removes_conversation_history_and_queue_entry(make: Callable[..., Store]) -> None:
    store = make(history_limit=2)
    await store.join("r1", ANN, ROOMY)
    for i in range(3):
        assert await store.append_chat("r1", ChatMessage(str(i), ANN, f"m{i}", i))
    assert [m.text for m in await store.history("r1")] == ["m1", "m2"]
    assert (await store.escalate("r1", "why", 1)).outcome is Enqueued.QUEUED
    again = await store.escalate("r1", "again", 2)
    assert again.outcome is Enqueued.ALREADY_WAITING and again.entry is not None and again.entry.reason == "why"
    result = await store.leave("r1", "u1")
    assert result.participant == ANN and result.conversation_removed and result.queue_changed
    assert await store.participants("r1") is None
    assert await store.history("r1") == []
    assert await store.waiting() == []
    assert await store.conversation_count() == 0
    assert not await store.append_chat("r1", ChatMessage("x", ANN, "late", 9))


async def test_accept_is_won_once_and_queue_is_fifo(make: Callable[..., Store]) -> None:
    store = make()
    for room in ("r1", "r2"):
        await store.join(room, ANN, ROOMY)
        await store.escalate(room, "x", 0)
    assert [e.conversation for e in await store.waiting()] == ["r1", "r2"]
    results = await asyncio.gather(store.accept("r1", BOB, ROOMY), store.accept("r1", EVE, ROOMY))
    assert sorted(r.admission.value for r in results) == ["admitted", "taken"]
    winner = next(r for r in results if r.admission is Admission.ADMITTED)
    assert winner.taken is not None and winner.taken.customer == ANN
    assert (await store.accept("nope", BOB, ROOMY)).admission is Admission.NOT_WAITING
    assert [e.conversation for e in await store.waiting()] == ["r2"]
    assert (await store.escalate("r1", "again", 5)).outcome is Enqueued.AGENT_PRESENT
    assert (await store.escalate("nope", "x", 0)).outcome is Enqueued.NO_CUSTOMER


async def test_accept_respects_the_participant_limit(make: Callable[..., Store]) -> None:
    store = make()
    tight = Limits(max_conversations=10, max_participants=2)
    await store.join("r1", ANN, tight)
    await store.join("r1", CID, tight)
    await store.escalate("r1", "x", 0)
    assert (await store.accept("r1", BOB, tight)).admission is Admission.CONVERSATION_FULL
    assert len(await store.waiting()) == 1  # still waiting for an agent who fits


async def test_join_can_take_the_queue_entry(make: Callable[..., Store]) -> None:
    """An agent entering by a room token takes the conversation off the queue in the same step."""
    store = make()
    await store.join("r1", ANN, ROOMY)
    await store.escalate("r1", "x", 0)
    result = await store.join("r1", BOB, ROOMY, take_queue=True)
    assert result.taken is not None and await store.waiting() == []


async def test_bot_claims_only_a_customer_conversation_without_agent(make: Callable[..., Store]) -> None:
    store = make()
    assert not await store.claim_bot("r1", BOT)  # no conversation
    await store.join("r1", ANN, ROOMY)
    claims = await asyncio.gather(store.claim_bot("r1", BOT), store.claim_bot("r1", BOT))
    assert sorted(claims) == [False, True]
    await store.join("r2", ANN, ROOMY)
    await store.join("r2", BOB, ROOMY)
    assert not await store.claim_bot("r2", BOT)  # an agent is there


async def test_escalate_names_the_customer(make: Callable[..., Store]) -> None:
    store = make()
    await store.join("r1", BOT, ROOMY)
    await store.join("r1", ANN, ROOMY)
    result = await store.escalate("r1", "bot_transfer", 7)
    assert result.entry is not None and result.entry.customer == ANN and result.entry.since == 7


async def test_queue_entry_goes_when_no_customer_remains(make: Callable[..., Store]) -> None:
    store = make()
    await store.join("r1", ANN, ROOMY)
    await store.join("r1", BOT, ROOMY)
    await store.escalate("r1", "x", 0)
    result = await store.leave("r1", "u1")
    assert result.left and result.queue_changed and not result.conversation_removed
    assert result.customers_left == 0
    assert await store.participants("r1") == [BOT]
    assert not (await store.leave("r1", "u1")).left


async def test_history_outlives_the_last_participant_for_the_retention_time(make: Callable[..., Store]) -> None:
    now = [0.0]
    store = make(retention_seconds=60, retained_limit=2, clock=lambda: now[0])
    await store.join("r1", ANN, ROOMY)
    await store.append_chat("r1", ChatMessage("1", ANN, "my router blinks", 1))
    assert (await store.leave("r1", "u1")).conversation_removed
    assert await store.conversation_count() == 0  # not a live conversation any more
    now[0] = 59.0
    assert [m.text for m in await store.history("r1")] == ["my router blinks"]  # a browser restart finds it
    await store.join("r1", ANN, ROOMY)  # back: the history is the conversation's again
    now[0] = 1000.0
    assert [m.text for m in await store.history("r1")] == ["my router blinks"]
    await store.leave("r1", "u1")
    now[0] = 1060.0
    assert await store.history("r1") == []  # forgotten after the retention time


async def test_only_the_newest_emptied_conversations_are_remembered(make: Callable[..., Store]) -> None:
    store = make(retention_seconds=60, retained_limit=2)
    for room in ("r1", "r2", "r3"):
        await store.join(room, ANN, ROOMY)
        await store.append_chat(room, ChatMessage(room, ANN, room, 1))
        await store.leave(room, "u1")
    assert await store.history("r1") == []
    assert [m.text for m in await store.history("r2")] == ["r2"]
    assert [m.text for m in await store.history("r3")] == ["r3"]


# -- Redis only: several processes' stores are one store ------------------------------------


async def test_stores_of_several_processes_share_one_state(redis_server: RedisServer) -> None:
    """Three gateway processes, three ``RedisStore`` clients on one Redis: the limits are
    cluster-wide and one of many agents on different processes wins an accept."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    stores = [RedisStore(redis_server.url(), prefix=prefix) for _ in range(3)]
    try:
        one, two, three = stores
        tight = Limits(max_conversations=2, max_participants=8)
        assert (await one.join("r1", ANN, tight)).opened
        assert (await two.join("r2", CID, tight)).opened
        assert (await three.join("r3", ANN, tight)).admission is Admission.GATEWAY_FULL
        assert (await three.join("r1", CID, tight)).admission is Admission.ADMITTED
        await one.escalate("r1", "x", 1)
        agents = [Participant(f"a{n}", "agent", f"Agent {n}") for n in range(9)]
        results = await asyncio.gather(*(stores[n % 3].accept("r1", a, ROOMY) for n, a in enumerate(agents)))
        assert sorted(r.admission.value for r in results) == ["admitted"] + ["taken"] * 8
        assert await two.waiting() == []
        assert [p.identity for p in await three.participants("r1") or []][:2] == ["u1", "u2"]
    finally:
        for store in stores:
            await store.close()


async def test_an_unreachable_redis_is_unavailable_not_a_crash() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(Unavailable):
            await store.join("r1", ANN, ROOMY)
        with pytest.raises(Unavailable):
            await store.conversation_count()
        assert not await store.ping()
    finally:
        await store.close()


async def test_a_dead_nodes_participants_are_adopted(redis_server: RedisServer) -> None:
    """Each participant is held by the node that added it; when a node dies another adopts
    what it held (once; nobody leaves, the queue stays), not whoever rejoined through
    another node since."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    dead = RedisStore(redis_server.url(), prefix=prefix, node="dead")
    alive = RedisStore(redis_server.url(), prefix=prefix, node="alive")
    try:
        await dead.join("r1", ANN, ROOMY)
        await alive.join("r1", BOB, ROOMY)
        await dead.join("r2", CID, ROOMY)
        await dead.escalate("r2", "x", 1)
        await dead.join("r3", ANN, ROOMY)
        await alive.join("r3", ANN, ROOMY)  # reconnected through the other node
        assert sorted((c, p.identity) for c, p in await alive.adopt("dead")) == [("r1", "u1"), ("r2", CID.identity)]
        assert await alive.participants("r1") == [ANN, BOB]
        assert [e.conversation for e in await alive.waiting()] == ["r2"]  # CID waits on
        assert await alive.adopt("dead") == []  # once
        assert await alive.memberships(ANN.identity) == ["r1", "r3"]
        # The adopter holds them now: its grace time ending removes them, the dead node's cannot.
        assert not (await dead.leave("r2", CID.identity, held_here=True)).left
        left = await alive.leave("r2", CID.identity, held_here=True)
        assert left.conversation_removed and left.queue_changed
        assert await alive.waiting() == []
        assert (await alive.leave("r3", "u1")).conversation_removed
        assert await alive.memberships(ANN.identity) == ["r1"]
        # A node restarted with its id takes over what its killed run held: it keeps them.
        held = {(c, p.identity) for c, p in await alive.adopt("alive")}
        assert held == {("r1", ANN.identity), ("r1", BOB.identity)}
        assert {(c, p.identity) for c, p in await alive.adopt("alive")} == held  # still held here
    finally:
        await dead.close()
        await alive.close()


async def test_a_burst_of_steps_waits_for_connections_instead_of_failing(redis_server: RedisServer) -> None:
    """More steps at once than the pool has connections: they wait their turn (redis-py's
    default pool refused the excess: a burst of chats came back ``unavailable``)."""
    store = RedisStore(redis_server.url(), prefix=f"test-{uuid.uuid4().hex[:8]}:")
    try:
        await store.join("r1", ANN, ROOMY)
        messages = [ChatMessage(id=str(i), sender=ANN, text=str(i), ts=i) for i in range(1000)]
        assert all(await asyncio.gather(*(store.append_chat("r1", m) for m in messages)))
    finally:
        await store.close()


async def test_what_the_home_nodes_calls_send_is_recorded_while_it_is_true(redis_server: RedisServer) -> None:
    """A ``media`` change is recorded by the step that publishes it (``Bus.room``), for
    ``joined`` on the other nodes: only the conversation's home's word counts, and only
    about its participants. The record goes when the call ends, the participant leaves,
    the conversation ends, the home moves (its calls are not the new home's) or the home
    node is reaped (its calls died with it)."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    home = RedisStore(redis_server.url(), prefix=prefix, node="home")
    other = RedisStore(redis_server.url(), prefix=prefix, node="other")
    heard: list[Envelope] = []  # by "home"
    told: list[Envelope] = []  # by "other"
    buses = [Bus(home.redis, prefix, "home", heard.append), Bus(other.redis, prefix, "other", told.append)]
    try:
        for bus in buses:
            await bus.start()
        at_home, elsewhere = buses
        await home.redis.hset(f"{prefix}node:home", "id", "home")  # alive: it stays the home
        await home.join("r1", ANN, ROOMY)  # r1's home: "home"
        await other.join("r1", BOB, ROOMY)

        def said(bus: Bus, identity: str, audio: bool, video: bool = False) -> None:
            bus.room("r1", b"{}", "media", fresh=True, media=(identity, audio, video))

        async def recorded(*expected: tuple[str, bool, bool]) -> bool:
            entries = [{"identity": i, "audio": a, "video": v} for i, a, v in expected]
            return sorted(await other.media("r1"), key=str) == sorted(entries, key=str)

        said(elsewhere, "a1", True)  # not r1's home: not recorded
        await until(lambda: heard)  # published (to "home", where u1 is) in the same step
        assert await other.media("r1") == []
        said(at_home, "u1", True)
        said(at_home, "nobody", True)  # not in r1
        said(at_home, "a1", True, True)
        await until(lambda: recorded(("u1", True, False), ("a1", True, True)))
        said(at_home, "a1", False)  # a1's call ended
        await until(lambda: recorded(("u1", True, False)))
        await home.leave("r1", "u1")
        assert await other.media("r1") == []
        said(at_home, "a1", True)
        await until(lambda: recorded(("a1", True, False)))
        await other.adopt("home")  # the home node is dead
        assert await other.media("r1") == []

        await home.join("r2", ANN, ROOMY)
        await other.join("r2", CID, ROOMY)
        at_home.room("r2", b"{}", "media", fresh=True, media=("u1", True, False))
        await until(lambda: other.media("r2"))
        await home.redis.delete(f"{prefix}node:home")  # gone: the next to ask is the home
        assert await other.home("r2") == "other"
        assert await other.media("r2") == []

        told.clear()
        at_home.room("r2", b"{}", "media", fresh=True, media=("u1", True, False))  # not the home any more
        await until(lambda: told)
        assert await other.media("r2") == []
        elsewhere.room("r2", b"{}", "media", fresh=True, media=("u1", True, False))
        await until(lambda: other.media("r2"))
        await other.leave("r2", "u1")
        assert (await other.leave("r2", CID.identity)).conversation_removed
        await other.leave("r1", "a1")
        assert await home.redis.keys(f"{prefix}md:*") == [] and await home.redis.keys(f"{prefix}hm:*") == []
    finally:
        for bus in buses:
            await bus.close()
        await home.close()
        await other.close()
