"""The conversation rules: operations in, domain events out.

``Conversations`` is the core every entry point shares (client messages through the
broker, bots through the bot manager, the coming server API): each operation checks
who may do what, makes its change in one atomic ``Store`` step and returns the
``events`` that happened. It holds no sockets and sends nothing: the broker hands the
events to their consumers (the wire encoder, metrics, bots, and later records,
webhooks and the cluster bus). A client-caused refusal is raised as a ``ProtocolError``.

``Upgrades`` holds the pending consent requests (voice, video) of this process's
conversations; it is plain state with the same shape: operations in, events out.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import events as ev
from .errors import Conflict, Forbidden, NotFound, Unavailable
from .events import now_ms
from .messages import SYSTEM, ChatMessage, Participant, QueueEntry, Role
from .store import Admission, Enqueued, JoinResult, LeaveResult, Limits, Store

MAX_REASON_CHARS = 200
#: Unanswered upgrade requests kept per conversation (the oldest goes first).
MAX_PENDING_UPGRADES = 16

ESCALATE_NOTICE = "{name} asked to talk to a person. An agent will join shortly."


def new_id() -> str:
    return uuid.uuid4().hex


class Conversations:
    def __init__(
        self, store: Store, limits: Limits, *, clock: Callable[[], int] = now_ms, ids: Callable[[], str] = new_id
    ) -> None:
        self.store = store
        self.limits = limits
        self._clock = clock
        self._ids = ids

    async def join(
        self,
        conversation: str,
        participant: Participant,
        *,
        take_queue: bool = False,
        profile: dict[str, Any] | None = None,
    ) -> tuple[JoinResult, list[ev.Event]]:
        """Enter (or re-enter) a conversation within the limits; rejoining is always let in.
        The store's result says where the participant was held before, and the step's
        version (a newer connection replaces an older one on another node)."""
        result = await self.store.join(conversation, participant, self.limits, take_queue=take_queue)
        _refuse(result)
        ts = self._clock()
        out: list[ev.Event] = []
        if result.opened:
            out.append(ev.ConversationOpened(conversation=conversation, ts=ts))
        if result.added:
            out.append(ev.ParticipantJoined(conversation=conversation, ts=ts, participant=participant, profile=profile))
        elif result.elsewhere:
            # In it through another node until now (away there, in its grace time): back here.
            out.append(ev.ParticipantReturned(conversation=conversation, ts=ts, participant=participant))
        if result.taken is not None:
            out.append(ev.QueueLeft(conversation=conversation, ts=ts, reason="accepted"))
        if participant.role == Role.AGENT and (result.taken is not None or result.added):
            out.append(ev.AgentAccepted(conversation=conversation, ts=ts, agent=participant))
        return result, out

    async def accept(
        self, conversation: str, agent: Participant, *, holding: Sequence[str] = (), capacity: int = 1
    ) -> list[ev.Event]:
        """An agent takes a conversation waiting in the queue (one of several agents wins);
        ``holding``: the conversations its connection is in, at most ``capacity``."""
        if agent.role != Role.AGENT:
            raise Forbidden("only agents can accept conversations")
        if conversation in holding:
            raise Conflict("you are already in this conversation")
        if len(holding) >= capacity:
            if capacity == 1:
                raise Conflict(f"leave conversation {holding[0]!r} before accepting another")
            raise Conflict(f"you hold {len(holding)} conversations, the limit (--agent-capacity) is {capacity}")
        result = await self.store.accept(conversation, agent, self.limits)
        if result.admission is Admission.TAKEN:
            raise Conflict("another agent has already accepted this conversation")
        if result.admission is Admission.NOT_WAITING:
            raise NotFound("that conversation is not waiting in the queue")
        _refuse(result)
        ts = self._clock()
        out: list[ev.Event] = [ev.QueueLeft(conversation=conversation, ts=ts, reason="accepted")]
        if result.added:
            out.append(ev.ParticipantJoined(conversation=conversation, ts=ts, participant=agent))
        out.append(ev.AgentAccepted(conversation=conversation, ts=ts, agent=agent))
        return out

    async def leave(
        self, conversation: str, identity: str, reason: str, *, held_here: bool = False
    ) -> tuple[LeaveResult, list[ev.Event]]:
        """``held_here``: only if this node still holds the participant (``Store.leave``)."""
        result = await self.store.leave(conversation, identity, held_here=held_here)
        return result, self.left(conversation, result, reason)

    def left(self, conversation: str, result: LeaveResult, reason: str) -> list[ev.Event]:
        """The events of a leave the store made (``leave``, or a dead node's reaped one)."""
        if result.participant is None:
            return []
        ts = self._clock()
        out: list[ev.Event] = [
            ev.ParticipantLeft(conversation=conversation, ts=ts, participant=result.participant, reason=reason)
        ]
        if result.queue_changed:
            out.append(ev.QueueLeft(conversation=conversation, ts=ts, reason="abandoned"))
        if result.conversation_removed:
            out.append(ev.ConversationClosed(conversation=conversation, ts=ts))
        return out

    async def post(self, conversation: str, sender: Participant, text: str) -> list[ev.Event]:
        """Keep a chat message in the history; everyone gets it, the sender included."""
        message = ChatMessage(id=self._ids(), sender=sender, text=text, ts=self._clock())
        if not await self.store.append_chat(conversation, message):
            raise NotFound("that conversation has ended")
        return [ev.ChatPosted(conversation=conversation, ts=message.ts, message=message)]

    def post_unattended(self, conversation: str, customer: str, sender: Participant, text: str) -> list[ev.Event]:
        """A chat for a conversation nobody is in (the app writing to a known customer):
        its record is opened for the customer (or their open one continued) and the message
        recorded for whoever joins next. Nothing live changes: there is nobody to tell."""
        message = ChatMessage(id=self._ids(), sender=sender, text=text, ts=self._clock())
        return [
            ev.ConversationOpened(conversation=conversation, ts=message.ts, customer=customer),
            ev.ChatPosted(conversation=conversation, ts=message.ts, message=message),
        ]

    def close_unattended(self, conversation: str) -> list[ev.Event]:
        """The app closes a recorded conversation nobody is in (one it opened with a message)."""
        return [ev.ConversationClosed(conversation=conversation, ts=self._clock(), reason=ev.CLOSED_BY_APP)]

    async def escalate(self, conversation: str, customer: Participant, reason: str | None) -> list[ev.Event]:
        """A customer asks for a person. Asking again while waiting changes nothing (no events)."""
        if customer.role != Role.CUSTOMER:
            raise Forbidden("only customers can ask for an agent")
        why = (reason or "customer_request")[:MAX_REASON_CHARS]
        result = await self.store.escalate(conversation, why, self._clock(), customer.identity)
        if result.outcome is Enqueued.AGENT_PRESENT:
            raise Conflict("an agent is already in this conversation")
        if result.outcome is not Enqueued.QUEUED:
            return []
        return await self._queued(result.entry, ESCALATE_NOTICE.format(name=customer.name))

    async def hand_over(self, conversation: str, reason: str, notice: str) -> list[ev.Event]:
        """A bot (or the gateway for it) puts the conversation in the agent queue; nothing
        happens if an agent is already in it or it has no customer."""
        result = await self.store.escalate(conversation, reason[:MAX_REASON_CHARS], self._clock())
        if result.outcome is not Enqueued.QUEUED:
            return []
        return await self._queued(result.entry, notice, by_bot=True)

    async def claim_bot(self, conversation: str, bot: Participant) -> list[ev.Event]:
        """The bot joins a conversation that has a customer and no agent (and no bot yet)."""
        if not await self.store.claim_bot(conversation, bot):
            return []
        return [ev.ParticipantJoined(conversation=conversation, ts=self._clock(), participant=bot)]

    async def _queued(self, entry: QueueEntry | None, notice: str, *, by_bot: bool = False) -> list[ev.Event]:
        assert entry is not None  # the store returns the entry with QUEUED
        out: list[ev.Event] = [
            ev.QueueEntered(conversation=entry.conversation, ts=entry.since, entry=entry, by_bot=by_bot)
        ]
        # The notice is best effort: the conversation may have just ended.
        message = ChatMessage(id=self._ids(), sender=SYSTEM, text=notice, ts=self._clock())
        if await self.store.append_chat(entry.conversation, message):
            out.insert(0, ev.ChatPosted(conversation=entry.conversation, ts=message.ts, message=message))
        return out


def _refuse(result: JoinResult) -> None:
    if result.admission is Admission.GATEWAY_FULL:
        raise Unavailable("the gateway is at its limit of conversations; try again later")
    if result.admission is Admission.CONVERSATION_FULL:
        raise Unavailable("this conversation is full")


@dataclass(eq=False)
class UpgradeRequest:
    id: str
    conversation: str
    media: str
    sender: Participant
    #: Identities it was sent to that have not replied yet.
    waiting: set[str]


class Upgrades:
    """Pending consent requests to add voice or video, per conversation (bounded)."""

    def __init__(self, *, clock: Callable[[], int] = now_ms, ids: Callable[[], str] = new_id) -> None:
        self._requests: dict[str, UpgradeRequest] = {}
        self._clock = clock
        self._ids = ids

    def __len__(self) -> int:
        return len(self._requests)

    def request(
        self, conversation: str, sender: Participant, media: str, participants: list[Participant]
    ) -> tuple[UpgradeRequest, list[ev.Event]]:
        """Ask everyone else in the conversation; everyone gets the request (the echo carries
        the id that replies name)."""
        others = {p.identity for p in participants if p.identity != sender.identity}
        if not others:
            raise NotFound("nobody else is in this conversation to ask")
        pending = [u for u in self._requests.values() if u.conversation == conversation]
        if len(pending) >= MAX_PENDING_UPGRADES:
            del self._requests[pending[0].id]
        request = UpgradeRequest(self._ids()[:16], conversation, media, sender, others)
        self._requests[request.id] = request
        event = ev.UpgradeRequested(
            conversation=conversation, ts=self._clock(), id=request.id, media=media, sender=sender
        )
        return request, [event]

    def reply(self, conversation: str, request_id: str, replier: Participant, accept: bool) -> list[ev.Event]:
        request = self._requests.get(request_id)
        if request is None or request.conversation != conversation:
            raise NotFound("no such upgrade request in this conversation")
        if replier.identity not in request.waiting:
            if replier.identity == request.sender.identity:
                raise Forbidden("you cannot answer your own upgrade request")
            raise Conflict("you have already answered this upgrade request")
        request.waiting.discard(replier.identity)
        if not request.waiting:
            del self._requests[request.id]
        return [
            ev.UpgradeAnswered(
                conversation=conversation,
                ts=self._clock(),
                id=request.id,
                media=request.media,
                replier=replier,
                accept=accept,
            )
        ]

    def conversation_of(self, request_id: str) -> str | None:
        request = self._requests.get(request_id)
        return None if request is None else request.conversation

    def forget(self, conversation: str) -> None:
        for request in [u for u in self._requests.values() if u.conversation == conversation]:
            del self._requests[request.id]
