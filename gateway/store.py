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
import time
from collections.abc import Callable
from dataclasses import dataclass

from .messages import ChatMessage, Participant, QueueEntry, Role


@dataclass(frozen=True, slots=True)
class LeaveResult:
    #: The participant was in the conversation (and is no longer).
    left: bool
    #: That was the last participant: the conversation is gone (its history is kept for
    #: the store's retention time, for someone who reconnects).
    conversation_removed: bool
    #: The conversation's queue entry was removed (no customer remains).
    queue_changed: bool


class Store(abc.ABC):
    @abc.abstractmethod
    async def add_participant(self, conversation: str, participant: Participant) -> list[Participant]:
        """Create the conversation if needed, add or update the participant, return everyone."""

    @abc.abstractmethod
    async def remove_participant(self, conversation: str, identity: str) -> LeaveResult:
        """Remove one participant; drop the conversation when empty (keeping its history for the
        retention time), its queue entry when customer-less."""

    @abc.abstractmethod
    async def participants(self, conversation: str) -> list[Participant] | None:
        """Everyone in the conversation, or None if it does not exist."""

    @abc.abstractmethod
    async def append_chat(self, conversation: str, message: ChatMessage) -> None:
        """Add to the conversation's history, keeping the most recent ``history_limit``."""

    @abc.abstractmethod
    async def history(self, conversation: str) -> list[ChatMessage]:
        """The retained chat messages, oldest first (also of a conversation that emptied
        less than the retention time ago)."""

    @abc.abstractmethod
    async def enqueue(self, entry: QueueEntry) -> bool:
        """Put the conversation in the agent queue; False if it is already waiting."""

    @abc.abstractmethod
    async def take(self, conversation: str) -> QueueEntry | None:
        """Atomically remove and return the conversation's queue entry (one taker wins)."""

    @abc.abstractmethod
    async def waiting(self) -> list[QueueEntry]:
        """The agent queue, longest-waiting first."""

    @abc.abstractmethod
    async def conversation_count(self) -> int:
        """How many conversations exist."""


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

    async def add_participant(self, conversation: str, participant: Participant) -> list[Participant]:
        self._forget_expired()
        self._expiry.pop(conversation, None)  # live again: its history stays with it
        members = self._participants.setdefault(conversation, {})
        members[participant.identity] = participant
        return list(members.values())

    async def remove_participant(self, conversation: str, identity: str) -> LeaveResult:
        members = self._participants.get(conversation)
        if members is None or members.pop(identity, None) is None:
            return LeaveResult(left=False, conversation_removed=False, queue_changed=False)
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
        queue_changed = False
        if conversation in self._queue and not any(p.role == Role.CUSTOMER for p in members.values()):
            del self._queue[conversation]
            queue_changed = True
        return LeaveResult(left=True, conversation_removed=removed, queue_changed=queue_changed)

    async def participants(self, conversation: str) -> list[Participant] | None:
        members = self._participants.get(conversation)
        return None if members is None else list(members.values())

    async def append_chat(self, conversation: str, message: ChatMessage) -> None:
        if conversation not in self._participants:
            return
        history = self._history.get(conversation)
        if history is None:
            history = self._history[conversation] = collections.deque(maxlen=self.history_limit)
        history.append(message)

    async def history(self, conversation: str) -> list[ChatMessage]:
        self._forget_expired()
        return list(self._history.get(conversation, ()))

    async def enqueue(self, entry: QueueEntry) -> bool:
        if entry.conversation in self._queue or entry.conversation not in self._participants:
            return False
        self._queue[entry.conversation] = entry
        return True

    async def take(self, conversation: str) -> QueueEntry | None:
        return self._queue.pop(conversation, None)

    async def waiting(self) -> list[QueueEntry]:
        return list(self._queue.values())

    async def conversation_count(self) -> int:
        return len(self._participants)

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
