"""What clients read of the past: the chat in ``joined``, customer cards, history pages.

``History`` reads the durable records (``records.py``; None: ``--database none``) and,
for what they do not hold, the live ``Store``. It never writes and never sees a
connection or the broker: the broker hands it who asks (the participant and the
conversations its connection is in) and delivers what it returns; a refusal is raised
as a ``ProtocolError``. Who may read which recorded conversation is decided by
``access.may_read_record``; what an agent is serving, here.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from . import access, messages
from .errors import Forbidden, NotFound, Unavailable
from .messages import ChatMessage, Participant, QueueEntry, Role
from .records import Records
from .store import Store

#: Longer ``history`` conversation ids are not looked up (no record has one).
MAX_CONVERSATION_CHARS = 256


class History:
    def __init__(self, records: Records | None, store: Store, *, history_limit: int) -> None:
        #: The durable records (None: nothing outlives the store, and there are no pages).
        self.records = records
        #: The live state: who is in a conversation, who waits, the chat of one not recorded.
        self.store = store
        #: How many chat messages a joiner gets from the records (``--history-limit``).
        self.history_limit = history_limit
        #: waiting conversation -> its customer card (for the queue; dropped when it stops waiting)
        self._queue_cards: dict[str, dict[str, Any]] = {}

    async def chat(self, conversation: str) -> list[ChatMessage]:
        """The chat a joiner gets: from the records when there are any (they outlive a
        restart), else the store's."""
        if self.records is not None:
            recorded = await self.records.history(conversation, self.history_limit)
            if recorded is not None:
                return recorded
        return await self.store.history(conversation)

    async def card(self, conversation: str, customer: Participant) -> dict[str, Any]:
        """Who the customer is, as far as the records know: ``{"identity", "name", "profile",
        "previous": [earlier conversations…]}`` (agents' ``joined`` and queue, the bot's ``start``)."""
        card: dict[str, Any] = {"identity": customer.identity, "name": customer.name, "profile": None, "previous": []}
        if self.records is not None:
            known = await self.records.customer(customer.identity)
            if known is not None:
                card["profile"] = known.profile
            card["previous"] = await self.records.previous(customer.identity, conversation)
        return card

    async def queue_cards(self, entries: list[QueueEntry]) -> dict[str, dict[str, Any]]:
        """Customer cards for the waiting conversations, looked up once per queue entry."""
        waiting = {e.conversation for e in entries}
        for gone in self._queue_cards.keys() - waiting:
            del self._queue_cards[gone]
        for entry in entries:
            if entry.conversation not in self._queue_cards:
                self._queue_cards[entry.conversation] = await self.card(entry.conversation, entry.customer)
        return self._queue_cards

    async def page(self, me: Participant, memberships: Collection[str], msg: messages.History) -> dict[str, Any]:
        """The ``history`` message: a page of a recorded conversation's timeline, for ``me``
        (in ``memberships`` now) if it may read it (``access.may_read_record``)."""
        if self.records is None:
            raise Unavailable("this gateway keeps no records (--database none): there is no history to read")
        long = len(msg.conversation) > MAX_CONVERSATION_CHARS
        record = None if long else await self.records.record(msg.conversation)
        if record is None:
            raise NotFound(f"no recorded conversation {msg.conversation[:128]!r}")
        # The one it is in now: the room's open record (an older record of the room is closed).
        present = record.room in memberships and record.closed is None
        serving = await self._serving(memberships) if me.role == Role.AGENT and not present else set()
        if not access.may_read_record(me, record.customer, present=present, serving=serving):
            if me.role == Role.CUSTOMER:
                raise Forbidden("you may read only your own conversations")
            raise Forbidden("you may read only the conversations of customers you are serving or who are waiting")
        events, more = await self.records.page(record.id, msg.before, msg.limit)
        items = [messages.timeline_event(e.id, e.ts, e.type, e.actor, e.body) for e in events]
        return messages.history(msg.conversation, msg.before, record.id, record.room, items, more)

    async def _serving(self, memberships: Collection[str]) -> set[str]:
        """The customers an agent in ``memberships`` is serving: those of its conversations
        (even once gone) and of the queue, whose cards it sees."""
        assert self.records is not None
        serving: set[str] = set()
        for conversation in memberships:
            people = await self.store.participants(conversation) or []
            serving |= {p.identity for p in people if p.role == Role.CUSTOMER}
            current = await self.records.record(conversation)  # its customer, even once gone
            if current is not None and current.customer is not None:
                serving.add(current.customer)
        serving |= {entry.customer.identity for entry in await self.store.waiting()}
        return serving
