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
from dataclasses import dataclass

from .messages import ChatMessage, Participant, QueueEntry, Role


@dataclass(frozen=True, slots=True)
class LeaveResult:
    #: The participant was in the conversation (and is no longer).
    left: bool
    #: That was the last participant: the conversation and its history are gone.
    conversation_removed: bool
    #: The conversation's queue entry was removed (no customer remains).
    queue_changed: bool


class Store(abc.ABC):
    @abc.abstractmethod
    async def add_participant(self, conversation: str, participant: Participant) -> list[Participant]:
        """Create the conversation if needed, add or update the participant, return everyone."""

    @abc.abstractmethod
    async def remove_participant(self, conversation: str, identity: str) -> LeaveResult:
        """Remove one participant; drop the conversation when empty, its queue entry when customer-less."""

    @abc.abstractmethod
    async def participants(self, conversation: str) -> list[Participant] | None:
        """Everyone in the conversation, or None if it does not exist."""

    @abc.abstractmethod
    async def append_chat(self, conversation: str, message: ChatMessage) -> None:
        """Add to the conversation's history, keeping the most recent ``history_limit``."""

    @abc.abstractmethod
    async def history(self, conversation: str) -> list[ChatMessage]:
        """The retained chat messages, oldest first."""

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
    """The default store: plain dicts; every method completes without yielding."""

    def __init__(self, history_limit: int = 100) -> None:
        self.history_limit = history_limit
        #: conversation id -> identity -> participant (insertion order = join order)
        self._participants: dict[str, dict[str, Participant]] = {}
        self._history: dict[str, collections.deque[ChatMessage]] = {}
        #: conversation id -> entry; dicts keep insertion order, so this is FIFO.
        self._queue: dict[str, QueueEntry] = {}

    async def add_participant(self, conversation: str, participant: Participant) -> list[Participant]:
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
            self._history.pop(conversation, None)
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
