"""The conversation rules without sockets: operations in, domain events out.

``Conversations`` runs on a real ``InMemoryStore``; nothing here opens a socket. Each
test asserts the exact events an operation returns, since every consumer (the wire,
metrics, bots, and later records and webhooks) sees only those.
"""

from __future__ import annotations

import itertools

import pytest

from gateway import events as ev
from gateway.conversation import Conversations, Upgrades
from gateway.errors import Conflict, Forbidden, NotFound, Unavailable
from gateway.messages import SYSTEM, ChatMessage, Participant, QueueEntry
from gateway.store import InMemoryStore, Limits

ANN = Participant("u1", "customer", "Ann")
BOB = Participant("a1", "agent", "Bob")
EVE = Participant("a2", "agent", "Eve")
BOT = Participant("bot", "bot", "Assistant")
TS = 1_000


def make(max_conversations: int = 10, max_participants: int = 4) -> Conversations:
    ids = (f"id{i}" for i in itertools.count())
    return Conversations(
        InMemoryStore(), Limits(max_conversations, max_participants), clock=lambda: TS, ids=lambda: next(ids)
    )


async def test_first_join_opens_the_conversation_and_a_rejoin_is_silent() -> None:
    rules = make()
    assert (await rules.join("r1", ANN))[1] == [
        ev.ConversationOpened(conversation="r1", ts=TS),
        ev.ParticipantJoined(conversation="r1", ts=TS, participant=ANN),
    ]
    assert (await rules.join("r1", ANN))[1] == []  # a reload: nobody sees anything


async def test_joins_over_the_limits_are_refused_without_a_change() -> None:
    rules = make(max_conversations=1, max_participants=2)
    await rules.join("r1", ANN)
    with pytest.raises(Unavailable, match="limit of conversations"):
        await rules.join("r2", ANN)
    await rules.join("r1", BOB)
    with pytest.raises(Unavailable, match="full"):
        await rules.join("r1", EVE)
    assert await rules.store.participants("r1") == [ANN, BOB]


async def test_chat_is_kept_and_posted() -> None:
    rules = make()
    await rules.join("r1", ANN)
    message = ChatMessage("id0", ANN, "hello", TS)
    assert await rules.post("r1", ANN, "hello") == [ev.ChatPosted(conversation="r1", ts=TS, message=message)]
    assert await rules.store.history("r1") == [message]
    with pytest.raises(NotFound):
        await rules.post("gone", ANN, "hello")


async def test_escalate_queues_once_with_a_system_notice() -> None:
    rules = make()
    await rules.join("r1", ANN)
    entry = QueueEntry("r1", ANN, TS, "billing")
    notice = ChatMessage("id0", SYSTEM, "Ann asked to talk to a person. An agent will join shortly.", TS)
    assert await rules.escalate("r1", ANN, "billing") == [
        ev.ChatPosted(conversation="r1", ts=TS, message=notice),
        ev.QueueEntered(conversation="r1", ts=TS, entry=entry),
    ]
    assert await rules.escalate("r1", ANN, "again") == []  # already waiting
    with pytest.raises(Forbidden):
        await rules.escalate("r1", BOB, None)


async def test_accept_takes_the_queue_entry_and_one_agent_wins() -> None:
    rules = make()
    await rules.join("r1", ANN)
    await rules.escalate("r1", ANN, None)
    assert await rules.accept("r1", BOB) == [
        ev.QueueLeft(conversation="r1", ts=TS, reason="accepted"),
        ev.ParticipantJoined(conversation="r1", ts=TS, participant=BOB),
        ev.AgentAccepted(conversation="r1", ts=TS, agent=BOB),
    ]
    with pytest.raises(Conflict, match="already accepted"):
        await rules.accept("r1", EVE)
    with pytest.raises(NotFound):
        await rules.accept("r2", EVE)
    with pytest.raises(Forbidden):
        await rules.accept("r1", ANN)
    with pytest.raises(Conflict, match="already in this conversation"):
        await rules.escalate("r1", ANN, None)
    with pytest.raises(Conflict, match="already in this conversation"):
        await rules.accept("r1", BOB, holding=["r1"])
    with pytest.raises(Conflict, match="leave conversation 'r1'"):
        await rules.accept("r2", BOB, holding=["r1"])
    with pytest.raises(Conflict, match="--agent-capacity"):
        await rules.accept("r3", BOB, holding=["r1", "r2"], capacity=2)


async def test_an_agent_entering_by_room_takes_the_queue_entry() -> None:
    rules = make()
    await rules.join("r1", ANN)
    await rules.escalate("r1", ANN, None)
    assert (await rules.join("r1", BOB, take_queue=True))[1] == [
        ev.ParticipantJoined(conversation="r1", ts=TS, participant=BOB),
        ev.QueueLeft(conversation="r1", ts=TS, reason="accepted"),
        ev.AgentAccepted(conversation="r1", ts=TS, agent=BOB),
    ]


async def test_bot_claims_and_hands_over() -> None:
    rules = make()
    await rules.join("r1", ANN)
    assert await rules.claim_bot("r1", BOT) == [ev.ParticipantJoined(conversation="r1", ts=TS, participant=BOT)]
    assert await rules.claim_bot("r1", BOT) == []
    events = await rules.hand_over("r1", "bot_transfer", "Connecting you with a person.")
    assert [type(e) for e in events] == [ev.ChatPosted, ev.QueueEntered]
    handed = ev.QueueEntered(conversation="r1", ts=TS, entry=QueueEntry("r1", ANN, TS, "bot_transfer"), by_bot=True)
    assert events[1] == handed  # by_bot: the webhooks add bot.transferred
    assert await rules.hand_over("r1", "bot_transfer", "again") == []


async def test_leaving_last_closes_and_abandons_the_queue() -> None:
    rules = make()
    await rules.join("r1", ANN)
    await rules.claim_bot("r1", BOT)
    await rules.escalate("r1", ANN, None)
    result, events = await rules.leave("r1", "u1", "left")
    assert result.customers_left == 0
    assert events == [
        ev.ParticipantLeft(conversation="r1", ts=TS, participant=ANN, reason="left"),
        ev.QueueLeft(conversation="r1", ts=TS, reason="abandoned"),
    ]
    _, events = await rules.leave("r1", "bot", "customer_left")
    assert events == [
        ev.ParticipantLeft(conversation="r1", ts=TS, participant=BOT, reason="customer_left"),
        ev.ConversationClosed(conversation="r1", ts=TS),
    ]
    assert (await rules.leave("r1", "bot", "again"))[1] == []


def test_upgrades_ask_everyone_else_and_take_one_reply_each() -> None:
    ids = (f"req{i}" for i in itertools.count())
    upgrades = Upgrades(clock=lambda: TS, ids=lambda: next(ids))
    request, events = upgrades.request("r1", ANN, "video", [ANN, BOB])
    assert events == [ev.UpgradeRequested(conversation="r1", ts=TS, id="req0", media="video", sender=ANN)]
    with pytest.raises(Forbidden):
        upgrades.reply("r1", request.id, ANN, True)
    with pytest.raises(NotFound):
        upgrades.reply("r2", request.id, BOB, True)
    assert upgrades.reply("r1", request.id, BOB, True) == [
        ev.UpgradeAnswered(conversation="r1", ts=TS, id="req0", media="video", replier=BOB, accept=True)
    ]
    with pytest.raises(NotFound):  # answered by everyone: gone
        upgrades.reply("r1", request.id, BOB, True)
    with pytest.raises(NotFound, match="nobody else"):
        upgrades.request("r1", ANN, "audio", [ANN])


def test_pending_upgrades_are_bounded_per_conversation() -> None:
    upgrades = Upgrades()
    for _ in range(100):
        upgrades.request("r1", ANN, "video", [ANN, BOB])
    assert len(upgrades) == 16
    upgrades.forget("r1")
    assert len(upgrades) == 0
