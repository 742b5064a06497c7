"""Shared conversation state behind a small async interface.

Everything several gateway processes must agree on lives here: the conversation
directory (who is in which conversation), chat history and the agent queue.
Each method is one atomic step, so a Redis-backed store can implement it with a
single script or transaction; ``InMemoryStore`` is the single-process default.
What stays per process (which websocket belongs to whom, media) is not here.
"""

from __future__ import annotations

import abc
import collections
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .messages import ChatMessage, Participant, QueueEntry, Role


class Admission(enum.Enum):
    """How a join or an accept went (the store decides atomically; the rules say why)."""

    #: The participant is in the conversation now.
    ADMITTED = "admitted"
    #: Opening it would pass ``max_conversations``.
    GATEWAY_FULL = "gateway_full"
    #: It already has ``max_participants`` (rejoining is always fine).
    CONVERSATION_FULL = "conversation_full"
    #: accept: the conversation is not waiting in the queue.
    NOT_WAITING = "not_waiting"
    #: accept: another agent is already in it.
    TAKEN = "taken"


@dataclass(frozen=True, slots=True)
class Limits:
    max_conversations: int
    max_participants: int


@dataclass(frozen=True, slots=True)
class JoinResult:
    admission: Admission
    #: The participant was not in the conversation before (False: a rejoin or a refusal).
    added: bool = False
    #: The conversation did not exist before this join.
    opened: bool = False
    #: The queue entry this join removed (``take_queue``, or an accept).
    taken: QueueEntry | None = None
    #: The node that held the participant until this step if it was another (a shared
    #: store): it reconnected through this one ("" if not).
    previous: str = ""
    #: The step's version on a shared store (0 on one process's): greater than every
    #: version given before, so of two connections of one identity the newer is the one
    #: whose join has the greater version, whichever nodes they are on.
    version: int = 0

    @property
    def elsewhere(self) -> bool:
        """The participant was in it already, held by another node."""
        return bool(self.previous)


class Enqueued(enum.Enum):
    QUEUED = "queued"
    ALREADY_WAITING = "already_waiting"
    AGENT_PRESENT = "agent_present"
    #: No such conversation, or no customer in it.
    NO_CUSTOMER = "no_customer"


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    outcome: Enqueued
    entry: QueueEntry | None = None


@dataclass(frozen=True, slots=True)
class LeaveResult:
    #: The participant who left (None: was not in the conversation).
    participant: Participant | None
    #: That was the last participant: the conversation is gone (its history is kept for
    #: the store's retention time, for someone who reconnects).
    conversation_removed: bool = False
    #: The conversation's queue entry was removed (no customer remains).
    queue_changed: bool = False
    #: Customers still in the conversation after this leave.
    customers_left: int = 0

    @property
    def left(self) -> bool:
        return self.participant is not None


class Store(abc.ABC):
    """Live conversation state. Every method is one atomic step: each rule that reads and
    then writes (join within limits, escalate, accept, bot claim) is one method, so a
    shared store (Redis) implements it with one script and no other process can interleave."""

    @abc.abstractmethod
    async def join(
        self, conversation: str, participant: Participant, limits: Limits, *, take_queue: bool = False
    ) -> JoinResult:
        """Add (or update) the participant within ``limits``, creating the conversation if
        needed; ``take_queue`` also removes its queue entry (an agent entering by room)."""

    @abc.abstractmethod
    async def accept(self, conversation: str, agent: Participant, limits: Limits) -> JoinResult:
        """An agent takes a waiting conversation: remove its queue entry and add the agent,
        or say why not (one taker wins)."""

    @abc.abstractmethod
    async def claim_bot(self, conversation: str, bot: Participant) -> bool:
        """Add the bot if the conversation exists with a customer and no agent and no bot."""

    @abc.abstractmethod
    async def escalate(self, conversation: str, reason: str, since: int, customer: str | None = None) -> EnqueueResult:
        """Queue the conversation for agents unless an agent is in it or it already waits.
        The entry names ``customer`` (an identity), or the first customer when None."""

    @abc.abstractmethod
    async def leave(self, conversation: str, identity: str, *, held_here: bool = False) -> LeaveResult:
        """Remove one participant; drop the conversation when empty (keeping its history for the
        retention time), its queue entry when customer-less. ``held_here``: only if this node
        holds the participant (a grace time ending must not remove one who came back
        through another node; one process holds everyone)."""

    @abc.abstractmethod
    async def participants(self, conversation: str) -> list[Participant] | None:
        """Everyone in the conversation, or None if it does not exist."""

    @abc.abstractmethod
    async def append_chat(self, conversation: str, message: ChatMessage) -> bool:
        """Add to a live conversation's history, keeping the most recent ``history_limit``;
        False if the conversation does not exist."""

    @abc.abstractmethod
    async def history(self, conversation: str) -> list[ChatMessage]:
        """The retained chat messages, oldest first (also of a conversation that emptied
        less than the retention time ago)."""

    @abc.abstractmethod
    async def waiting(self) -> list[QueueEntry]:
        """The agent queue, longest-waiting first."""

    @abc.abstractmethod
    async def memberships(self, identity: str) -> list[str]:
        """The live conversations the identity is in (whichever node holds it)."""

    async def home(self, conversation: str) -> str:
        """The node a conversation's calls are on, made this one if it has none or its
        home is dead or draining; "" if the conversation does not exist, or on a store
        one process has to itself (every call is here)."""
        return ""

    async def media(self, conversation: str) -> list[dict[str, Any]]:
        """Who sends what on the conversation's calls, as their home node recorded it (the
        ``media`` of ``joined`` on a node that is not the home); empty on a store one
        process has to itself: every call is in that process, which knows (``Calls``)."""
        return []

    async def next_version(self) -> int:
        """On a shared store, a number greater than every version it has given
        (``JoinResult.version`` included) to any process: which of two connections with
        one identity on two nodes is newer (an agent's, which no join step orders when it
        is in no conversation). 0 on a store one process has to itself: its connections
        never meet another process's."""
        return 0

    async def queue(self) -> tuple[int, list[QueueEntry]]:
        """The agent queue with its version: a number that grows with every change of the
        queue, read in the same step, so that of two snapshots the newer one wins however
        they travel (to local agents after awaits, to other nodes' agents over the bus)."""
        return 0, await self.waiting()

    @abc.abstractmethod
    async def conversation_count(self) -> int:
        """How many conversations exist."""

    async def close(self) -> None:  # noqa: B027 (most stores hold nothing to close)
        """Release what the store holds (a shared store's connections)."""


class InMemoryStore(Store):
    """The default store: plain dicts; every method completes without yielding.

    A conversation's history outlives its last participant by ``retention_seconds``
    (a customer whose browser restarts finds the chat again); at most
    ``retained_limit`` emptied conversations are remembered, the oldest forgotten first.
    """

    def __init__(
        self,
        history_limit: int = 100,
        retention_seconds: float = 0.0,
        retained_limit: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.history_limit = history_limit
        self.retention_seconds = retention_seconds
        self.retained_limit = retained_limit
        self._clock = clock
        #: emptied conversation -> when its history is forgotten (insertion order = expiry order)
        self._expiry: dict[str, float] = {}
        #: conversation id -> identity -> participant (insertion order = join order)
        self._participants: dict[str, dict[str, Participant]] = {}
        self._history: dict[str, collections.deque[ChatMessage]] = {}
        #: conversation id -> entry; dicts keep insertion order, so this is FIFO.
        self._queue: dict[str, QueueEntry] = {}
        #: Grows with every change of ``_queue`` (``queue``).
        self._queue_version = 0

    async def join(
        self, conversation: str, participant: Participant, limits: Limits, *, take_queue: bool = False
    ) -> JoinResult:
        members = self._participants.get(conversation)
        if members is None:
            if len(self._participants) >= limits.max_conversations:
                return JoinResult(Admission.GATEWAY_FULL)
        elif participant.identity not in members and len(members) >= limits.max_participants:
            return JoinResult(Admission.CONVERSATION_FULL)
        taken = self._queue.pop(conversation, None) if take_queue else None
        self._queue_version += taken is not None
        added = self._add(conversation, participant)
        return JoinResult(Admission.ADMITTED, added=added, opened=members is None, taken=taken)

    async def accept(self, conversation: str, agent: Participant, limits: Limits) -> JoinResult:
        members = self._participants.get(conversation, {})
        if conversation not in self._queue:
            if any(p.role == Role.AGENT for p in members.values()):
                return JoinResult(Admission.TAKEN)
            return JoinResult(Admission.NOT_WAITING)
        if agent.identity not in members and len(members) >= limits.max_participants:
            return JoinResult(Admission.CONVERSATION_FULL)
        taken = self._queue.pop(conversation)
        self._queue_version += 1
        added = self._add(conversation, agent)
        return JoinResult(Admission.ADMITTED, added=added, taken=taken)

    async def claim_bot(self, conversation: str, bot: Participant) -> bool:
        members = self._participants.get(conversation)
        if members is None or bot.identity in members:
            return False
        roles = {p.role for p in members.values()}
        if Role.CUSTOMER not in roles or Role.AGENT in roles or Role.BOT in roles:
            return False
        self._add(conversation, bot)
        return True

    async def escalate(self, conversation: str, reason: str, since: int, customer: str | None = None) -> EnqueueResult:
        members = self._participants.get(conversation, {})
        if any(p.role == Role.AGENT for p in members.values()):
            return EnqueueResult(Enqueued.AGENT_PRESENT)
        waiting = self._queue.get(conversation)
        if waiting is not None:
            return EnqueueResult(Enqueued.ALREADY_WAITING, waiting)
        who = next(
            (p for p in members.values() if p.role == Role.CUSTOMER and (customer is None or p.identity == customer)),
            None,
        )
        if who is None:
            return EnqueueResult(Enqueued.NO_CUSTOMER)
        entry = self._queue[conversation] = QueueEntry(conversation, who, since, reason)
        self._queue_version += 1
        return EnqueueResult(Enqueued.QUEUED, entry)

    async def leave(self, conversation: str, identity: str, *, held_here: bool = False) -> LeaveResult:
        members = self._participants.get(conversation)
        gone = None if members is None else members.pop(identity, None)
        if members is None or gone is None:
            return LeaveResult(None)
        removed = not members
        if removed:
            del self._participants[conversation]
            if self.retention_seconds > 0 and conversation in self._history:
                self._expiry[conversation] = self._clock() + self.retention_seconds
                while len(self._expiry) > self.retained_limit:
                    self._forget(next(iter(self._expiry)))
            else:
                self._history.pop(conversation, None)
            self._forget_expired()
        customers = sum(p.role == Role.CUSTOMER for p in members.values())
        queue_changed = False
        if conversation in self._queue and not customers:
            del self._queue[conversation]
            self._queue_version += 1
            queue_changed = True
        return LeaveResult(gone, conversation_removed=removed, queue_changed=queue_changed, customers_left=customers)

    async def participants(self, conversation: str) -> list[Participant] | None:
        members = self._participants.get(conversation)
        return None if members is None else list(members.values())

    async def append_chat(self, conversation: str, message: ChatMessage) -> bool:
        if conversation not in self._participants:
            return False
        history = self._history.get(conversation)
        if history is None:
            history = self._history[conversation] = collections.deque(maxlen=self.history_limit)
        history.append(message)
        return True

    async def history(self, conversation: str) -> list[ChatMessage]:
        self._forget_expired()
        return list(self._history.get(conversation, ()))

    async def waiting(self) -> list[QueueEntry]:
        return list(self._queue.values())

    async def queue(self) -> tuple[int, list[QueueEntry]]:
        return self._queue_version, list(self._queue.values())

    async def memberships(self, identity: str) -> list[str]:
        return sorted(c for c, members in self._participants.items() if identity in members)

    async def conversation_count(self) -> int:
        return len(self._participants)

    def _add(self, conversation: str, participant: Participant) -> bool:
        self._forget_expired()
        self._expiry.pop(conversation, None)  # live again: its history stays with it
        members = self._participants.setdefault(conversation, {})
        added = participant.identity not in members
        members[participant.identity] = participant
        return added

    def _forget_expired(self) -> None:
        now = self._clock()
        while self._expiry:
            conversation, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                return  # the rest expire later
            self._forget(conversation)

    def _forget(self, conversation: str) -> None:
        del self._expiry[conversation]
        self._history.pop(conversation, None)
