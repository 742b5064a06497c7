"""The broker without sockets: real Broker, store and metrics; connections that record.

A ``Recorder`` implements the ``Connection`` interface the way a session does (a
protocol object, memberships, deliver, close) and keeps what it was sent, so the
dispatch, the events and the wire messages they become are checked in-process.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway import events as ev
from gateway import messages
from gateway.broker import Broker
from gateway.config import Config
from gateway.delivery import Membership
from gateway.errors import BadRequest, Conflict, Forbidden, NotFound, ProtocolError
from gateway.messages import Participant
from gateway.metrics import Metrics
from gateway.protocol import SignalingProtocol
from gateway.routing import RouteState, wants
from gateway.store import InMemoryStore

ANN = Participant("u1", "customer", "Ann")
BOB = Participant("a1", "agent", "Bob")
BOT = Participant("bot", "bot", "Assistant")


class Recorder:
    """A connection that keeps what it is sent (the ``Connection`` interface)."""

    def __init__(self) -> None:
        self.protocol = SignalingProtocol(max_message_bytes=65536, rate=100, burst=100, now=0.0)
        self.participant: Participant | None = None
        self.memberships: dict[str, Membership] = {}
        self.version = 0
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def deliver(self, data: bytes, mtype: str) -> None:
        message = json.loads(data)
        assert message["type"] == mtype
        self.sent.append(message)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def send_error(self, exc: ProtocolError, request: str | None = None) -> None:
        self.sent.append(messages.error(exc.code.value, exc.message, request))

    def types(self) -> list[str]:
        return [m["type"] for m in self.sent]

    def take(self) -> list[dict[str, Any]]:
        sent, self.sent = self.sent, []
        return sent


@pytest.fixture
def broker() -> Broker:
    config = Config(dev=True, agent_capacity=2, reconnect_grace_seconds=0)
    return Broker(config, InMemoryStore(), Metrics())


@pytest.fixture
def seen(broker: Broker) -> list[ev.Event]:
    events: list[ev.Event] = []
    broker.consumers.append(events.append)
    return events


async def join(broker: Broker, who: Participant, room: str | None = None) -> Recorder:
    conn = Recorder()
    await broker.handle(conn, messages.Join(identity=who.identity, role=who.role, name=who.name, room=room))
    return conn


async def test_a_customer_joins_chats_and_asks_for_a_person(broker: Broker, seen: list[ev.Event]) -> None:
    ann = await join(broker, ANN, "r1")
    bob = await join(broker, BOB)
    assert ann.types() == ["joined"] and bob.types() == ["joined", "queue"]
    assert [type(e) for e in seen] == [ev.ConversationOpened, ev.ParticipantJoined]

    await broker.handle(ann, messages.Chat(text="hello"))
    [echo] = ann.sent[1:]
    assert echo["type"] == "chat" and echo["conversation"] == "r1" and echo["text"] == "hello"

    await broker.handle(ann, messages.Escalate(reason="billing"))
    assert [type(e) for e in seen[-2:]] == [ev.ChatPosted, ev.QueueEntered]
    assert bob.sent[-1]["type"] == "queue" and bob.sent[-1]["waiting"][0]["reason"] == "billing"
    assert ann.sent[-1] == {"type": "queued", "conversation": "r1", "reason": "billing"}


async def test_accept_enters_and_every_message_names_the_conversation(broker: Broker, seen: list[ev.Event]) -> None:
    ann = await join(broker, ANN, "r1")
    cid = await join(broker, Participant("u2", "customer", "Cid"), "r2")
    bob = await join(broker, BOB)
    for conn in (ann, cid):
        await broker.handle(conn, messages.Escalate())
    for room in ("r1", "r2"):
        await broker.handle(bob, messages.Accept(conversation=room))
    assert list(bob.memberships) == ["r1", "r2"]
    assert any(isinstance(e, ev.AgentAccepted) and e.conversation == "r2" for e in seen)
    with pytest.raises(BadRequest, match="name one"):
        await broker.handle(bob, messages.Chat(text="which?"))
    with pytest.raises(NotFound):
        await broker.handle(bob, messages.Chat(text="x", conversation="r9"))
    ann.take()
    cid.take()
    await broker.handle(bob, messages.Chat(text="for Cid", conversation="r2"))
    assert [m["conversation"] for m in cid.take()] == ["r2"]
    assert ann.take() == []
    with pytest.raises(Conflict, match="agent-capacity"):
        await broker.handle(bob, messages.Accept(conversation="r3"))
    with pytest.raises(Forbidden):
        await broker.handle(ann, messages.Accept(conversation="r2"))


async def test_a_replaced_connection_leaves_nothing_behind(broker: Broker, seen: list[ev.Event]) -> None:
    old = await join(broker, ANN, "r1")
    new = await join(broker, ANN, "r1")
    assert old.closed == (4409, "replaced") and old.memberships == {}
    assert list(new.memberships) == ["r1"]
    assert not any(isinstance(e, ev.ParticipantLeft) for e in seen)  # nobody saw a leave
    await broker.disconnect(old)  # the old socket finally closes
    assert await broker.store.participants("r1") == [ANN]
    await broker.disconnect(new)
    assert [type(e) for e in seen[-2:]] == [ev.ParticipantLeft, ev.ConversationClosed]


async def test_a_failing_consumer_does_not_stop_the_others(broker: Broker, seen: list[ev.Event]) -> None:
    def broken(event: ev.Event) -> None:
        raise RuntimeError("a records writer that fails")

    broker.consumers.insert(0, broken)
    ann = await join(broker, ANN, "r1")
    await broker.handle(ann, messages.Chat(text="still delivered"))
    assert ann.sent[-1]["text"] == "still delivered"
    assert any(isinstance(e, ev.ChatPosted) for e in seen)


async def test_upgrade_replies_go_to_everyone_but_the_replier(broker: Broker) -> None:
    ann = await join(broker, ANN, "r1")
    await broker.handle(ann, messages.Escalate())
    bob = await join(broker, BOB, "r1")
    await broker.handle(bob, messages.Upgrade(media="video"))
    request = next(m for m in ann.sent if m["type"] == "upgrade.request")
    await broker.handle(ann, messages.UpgradeReply(id=request["id"], accept=True))
    assert bob.sent[-1]["type"] == "upgrade.reply" and bob.sent[-1]["conversation"] == "r1"
    assert ann.sent[-1]["type"] == "upgrade.request"


def test_routing_policy_follows_the_conversation_state() -> None:
    default = RouteState()
    assert wants(default, ANN, BOB) and wants(default, BOB, ANN) and wants(default, ANN, BOT)
    assert not wants(default, BOB, BOT)  # agents do not hear the bot
    assert not wants(default, ANN, ANN)
    held = RouteState(held=frozenset({"u1"}))
    assert not wants(held, ANN, BOB) and not wants(held, BOB, ANN)


async def test_a_lost_connection_is_away_for_the_grace_time_and_returns_unseen() -> None:
    broker = Broker(Config(dev=True, reconnect_grace_seconds=30), InMemoryStore(), Metrics())
    seen: list[ev.Event] = []
    broker.consumers.append(seen.append)
    ann = await join(broker, ANN, "r1")
    bob = await join(broker, BOB, "r1")
    ann.take()
    await broker.disconnect(bob)
    assert [type(e) for e in seen[-1:]] == [ev.ParticipantAway]
    assert await broker.store.participants("r1") == [ANN, BOB]  # still there
    assert not any(m["type"] == "participant.left" for m in ann.sent)
    again = await join(broker, BOB)  # the reloaded console, no room in its token
    assert list(again.memberships) == ["r1"]
    assert isinstance(seen[-1], ev.ParticipantReturned)
    assert [m["type"] for m in again.sent] == ["joined", "queue"]
    assert not any(m["type"] in ("participant.left", "participant.joined") for m in ann.sent)
    await broker.disconnect(again)
    await broker.close()  # shutdown: the away agent leaves now
    assert await broker.store.participants("r1") == [ANN]
