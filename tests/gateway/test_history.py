"""What clients read of the past, without sockets: ``History`` over a real ``SqlRecords``
(SQLite in ``tmp_path``) and an ``InMemoryStore``, the records written from the events of
the real conversation rules. The same rules through a gateway, on both databases, are in
``test_records.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import pytest

from gateway.conversation import Conversations
from gateway.errors import Forbidden, NotFound, Unavailable
from gateway.history import History
from gateway.messages import History as HistoryRequest
from gateway.messages import Participant, QueueEntry
from gateway.records import SqlRecords
from gateway.store import InMemoryStore, Limits

ANN = Participant("u1", "customer", "Ann")
DAN = Participant("u2", "customer", "Dan")
BOB = Participant("a1", "agent", "Bob")
CID = Participant("a2", "agent", "Cid")


class Gateway:
    """The rules on a store, every event committed to the records before the next step."""

    def __init__(self, records: SqlRecords | None) -> None:
        self.store = InMemoryStore()
        self.rules = Conversations(self.store, Limits(max_conversations=10, max_participants=4))
        self.records = records
        self.history = History(records, self.store, history_limit=50)

    async def join(self, room: str, who: Participant, **kw: Any) -> None:
        await self.commit((await self.rules.join(room, who, **kw))[1])

    async def post(self, room: str, who: Participant, text: str) -> None:
        await self.commit(await self.rules.post(room, who, text))

    async def escalate(self, room: str, who: Participant) -> None:
        await self.commit(await self.rules.escalate(room, who, None))

    async def accept(self, room: str, agent: Participant) -> None:
        await self.commit(await self.rules.accept(room, agent))

    async def leave(self, room: str, who: Participant) -> None:
        await self.commit((await self.rules.leave(room, who.identity, "left"))[1])

    async def commit(self, events: list[Any]) -> None:
        if self.records is not None:
            await self.records.write(events)

    async def read(self, me: Participant, memberships: Collection[str], conversation: str, **kw: Any) -> dict[str, Any]:
        return await self.history.page(me, memberships, HistoryRequest(conversation=conversation, **kw))

    async def refused(self, me: Participant, memberships: Collection[str], conversation: str) -> str:
        with pytest.raises(Forbidden) as refusal:
            await self.read(me, memberships, conversation)
        return refusal.value.message


@pytest.fixture
async def records(tmp_path: Path) -> AsyncIterator[SqlRecords]:
    rec = SqlRecords(f"sqlite:///{tmp_path / 'records.db'}")
    await rec.start()
    yield rec
    await rec.close()


@pytest.fixture
async def gateway(records: SqlRecords) -> Gateway:
    """Ann's earlier conversation in room ``first`` is recorded and closed."""
    gw = Gateway(records)
    await gw.join("first", ANN, profile={"plan": "pro"})
    await gw.post("first", ANN, "first words")
    await gw.leave("first", ANN)
    return gw


async def earlier(gw: Gateway) -> str:
    assert gw.records is not None
    record = await gw.records.record("first")
    assert record is not None and record.closed is not None and record.customer == ANN.identity
    return record.id


async def test_a_customer_reads_her_own_conversations_only(gateway: Gateway) -> None:
    first = await earlier(gateway)
    await gateway.join("second", ANN)
    await gateway.join("elsewhere", DAN)
    page = await gateway.read(ANN, {"second"}, first)
    assert page["type"] == "history" and page["record"] == first and page["room"] == "first"
    assert [e["type"] for e in page["events"]] == ["participant.joined", "chat", "participant.left"]
    assert not page["more"]
    assert await gateway.refused(DAN, {"elsewhere"}, first) == "you may read only your own conversations"
    await gateway.refused(DAN, {"elsewhere"}, "first")  # a room id names its latest record: the same
    own = await gateway.read(DAN, {"elsewhere"}, "elsewhere")
    assert own["conversation"] == "elsewhere" and own["record"].startswith("elsewhere~")


async def test_an_agent_reads_the_conversations_of_the_customers_it_serves(gateway: Gateway) -> None:
    """Serving: a customer in the queue (all agents), then in the agent's conversation, and
    still once she left it (the record knows whose it was)."""
    first = await earlier(gateway)
    await gateway.join("second", ANN)
    serving = "you may read only the conversations of customers you are serving or who are waiting"
    assert await gateway.refused(BOB, set(), first) == serving  # in the lobby: nobody yet
    await gateway.escalate("second", ANN)
    assert len((await gateway.read(CID, set(), first))["events"]) == 3
    await gateway.accept("second", BOB)
    await gateway.refused(CID, set(), first)  # Bob serves Ann now, not Cid
    await gateway.refused(CID, set(), "second")
    page = await gateway.read(BOB, {"second"}, first, limit=1)
    assert page["more"] and [e["type"] for e in page["events"]] == ["participant.left"]
    await gateway.leave("second", ANN)
    assert (await gateway.read(BOB, {"second"}, first))["events"]  # wrapping up after she left


async def test_whoever_is_in_a_conversation_reads_it(gateway: Gateway) -> None:
    """Present: the open record of a room one is in, even with no customer in it."""
    await gateway.join("huddle", BOB)
    await gateway.join("huddle", CID)
    assert (await gateway.read(CID, {"huddle"}, "huddle"))["events"]
    await gateway.refused(CID, set(), "huddle")  # not in it: nobody's, so nobody else's
    await gateway.refused(DAN, {"elsewhere"}, "huddle")


async def test_unknown_conversations_are_not_found(gateway: Gateway) -> None:
    for conversation in ("no-such-conversation", "first" + "x" * 300):
        with pytest.raises(NotFound):
            await gateway.read(ANN, set(), conversation)


async def test_without_records_there_are_no_pages_and_the_store_has_the_chat() -> None:
    gw = Gateway(None)
    await gw.join("r1", ANN)
    await gw.post("r1", ANN, "hello")
    with pytest.raises(Unavailable, match="--database none"):
        await gw.read(ANN, {"r1"}, "r1")
    assert [m.text for m in await gw.history.chat("r1")] == ["hello"]
    assert await gw.history.card("r1", ANN) == {"identity": "u1", "name": "Ann", "profile": None, "previous": []}


async def test_the_joined_chat_and_the_card_come_from_the_records(gateway: Gateway) -> None:
    first = await earlier(gateway)
    await gateway.join("first", ANN)  # resumed within the retention time: the same record
    assert [m.text for m in await gateway.history.chat("first")] == ["first words"]
    await gateway.join("second", ANN)
    card = await gateway.history.card("second", ANN)
    assert card["profile"] == {"plan": "pro"}
    assert [(p["conversation"], p["last_message"]) for p in card["previous"]] == [(first, "first words")]


async def test_queue_cards_are_looked_up_once_per_entry(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[str] = []
    card = gateway.history.card

    async def counted(conversation: str, customer: Participant) -> dict[str, Any]:
        looked_up.append(conversation)
        return await card(conversation, customer)

    monkeypatch.setattr(gateway.history, "card", counted)
    await gateway.join("second", ANN)
    await gateway.escalate("second", ANN)
    entries: list[QueueEntry] = await gateway.store.waiting()
    cards = await gateway.history.queue_cards(entries)
    assert list(cards) == ["second"] and cards["second"]["profile"] == {"plan": "pro"}
    await gateway.history.queue_cards(entries)
    assert looked_up == ["second"]
    assert await gateway.history.queue_cards([]) == {}  # no longer waiting: dropped
    await gateway.history.queue_cards(entries)
    assert looked_up == ["second", "second"]
