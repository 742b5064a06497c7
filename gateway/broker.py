"""The conversation broker: joins, chat, the agent queue, and fan-out.

The broker owns the rules of the client protocol. It holds no sockets: it talks
to each connection through the small ``Peer`` interface (deliver bytes, close),
keeps the per-process index of which peer is which participant, and keeps
everything shared between processes in the ``Store``. Every client-caused
failure is raised as a ``ProtocolError`` for the session to report.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Protocol

from . import messages, tokens
from .config import Config
from .errors import BadRequest, Conflict, Forbidden, NotFound, TooLarge, Unauthorized
from .messages import ChatMessage, Participant, QueueEntry, Role
from .metrics import Metrics
from .protocol import SignalingProtocol
from .store import Store

log = logging.getLogger("talkgate.broker")

#: WebSocket close codes (documented in docs/protocol.md).
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_JOIN_TIMEOUT = 4408
CLOSE_REPLACED = 4409
CLOSE_TOO_SLOW = 1013

_PONG = messages.encode({"type": "pong"})
MAX_FIELD_CHARS = tokens.MAX_FIELD_CHARS
MAX_REASON_CHARS = 200


class Peer(Protocol):
    """What the broker needs from a client connection."""

    protocol: SignalingProtocol
    participant: Participant | None
    conversation: str | None

    def deliver(self, data: bytes, mtype: str) -> None:
        """Queue an encoded message for the client without waiting."""

    def close(self, code: int, reason: str) -> None:
        """Close after the messages already queued have been written."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Broker:
    def __init__(self, config: Config, store: Store, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        #: conversation id -> identity -> the local peer that is that participant
        self._rooms: dict[str, dict[str, Peer]] = {}
        #: identity -> the local agent peer (one connection per agent identity)
        self._agents: dict[str, Peer] = {}
        #: peers that have joined and are still connected (evicted ones until they close)
        self.sessions: set[Peer] = set()
        metrics.sessions.set_function(lambda: len(self.sessions))

    # -- dispatch ---------------------------------------------------------------------

    async def handle(self, peer: Peer, msg: messages.ClientMessage) -> None:
        match msg:
            case messages.Chat():
                await self.chat(peer, msg)
            case messages.Ping():
                peer.deliver(_PONG, "pong")
            case messages.Join():
                await self.join(peer, msg)
            case messages.Escalate():
                await self.escalate(peer, msg)
            case messages.Accept():
                await self.accept(peer, msg)
            case messages.Leave():
                await self.leave(peer)

    # -- join -------------------------------------------------------------------------

    def authorize(self, msg: messages.Join) -> tokens.Grant:
        """Who this join may act as: from its token, or (dev mode only) from its fields."""
        if msg.token is not None:
            grant = tokens.verify(self.config.token_secret, msg.token)
            if msg.room is not None and msg.room != grant.room:
                raise Forbidden("this token does not grant that room")
            return grant
        if not self.config.dev:
            raise Unauthorized("a join token is required")
        identity = _field(msg.identity, "identity")
        role = msg.role or Role.CUSTOMER.value
        if role not in (Role.CUSTOMER, Role.AGENT):
            raise BadRequest("role must be 'customer' or 'agent'")
        room = None if msg.room is None else _field(msg.room, "room")
        if role == Role.CUSTOMER and room is None:
            raise BadRequest("a customer join needs a room")
        name = identity if msg.name is None else _field(msg.name, "name")
        return tokens.Grant(identity=identity, role=Role(role), room=room, name=name)

    async def join(self, peer: Peer, msg: messages.Join) -> None:
        grant = self.authorize(msg)
        me = Participant(identity=grant.identity, role=grant.role.value, name=grant.name)
        peer.participant = me
        peer.protocol.joined()
        self.sessions.add(peer)
        if grant.role is Role.AGENT:
            await self._join_agent(peer, me, grant.room)
            return
        assert grant.room is not None  # tokens.verify and authorize guarantee it
        old = self._rooms.get(grant.room, {}).get(me.identity)
        if old is not None:
            self._evict(old)
        await self._enter(peer, grant.room, announce=old is None)

    async def _join_agent(self, peer: Peer, me: Participant, room: str | None) -> None:
        """Agents get exactly one ``joined`` (lobby or room), then the queue."""
        inherited: str | None = None
        old = self._agents.get(me.identity)
        if old is not None:
            # A reload of the agent console: the new connection takes over the old
            # one's conversation without the customer seeing the agent leave.
            inherited = old.conversation
            self._evict(old)
        self._agents[me.identity] = peer
        if inherited is not None:
            self._rooms.setdefault(inherited, {})[me.identity] = peer
            peer.conversation = inherited
            if room not in (None, inherited):
                await self._exit(peer)  # the new token names another room
        target = room if room is not None else inherited
        queue_changed = False
        if target is None:
            peer.deliver(messages.encode(messages.joined(None, me, [], [])), "joined")
        elif target == inherited:
            await self._send_joined(peer, target)
        else:
            queue_changed = await self.store.take(target) is not None
            await self._enter(peer, target, announce=True)
        if queue_changed:
            await self.publish_queue()
        else:
            self._deliver_queue(peer, await self.store.waiting())

    def _evict(self, old: Peer) -> None:
        """Detach a connection replaced by a newer one with the same identity."""
        old.conversation = None
        old.deliver(
            messages.encode(messages.error("conflict", "replaced by a newer connection with the same identity")),
            "error",
        )
        self.metrics.error_by_code["conflict"].inc()
        old.close(CLOSE_REPLACED, "replaced")

    async def _enter(self, peer: Peer, conversation: str, *, announce: bool) -> None:
        me = _me(peer)
        await self.store.add_participant(conversation, me)
        self._rooms.setdefault(conversation, {})[me.identity] = peer
        peer.conversation = conversation
        await self._send_joined(peer, conversation)
        if announce:
            self.broadcast(conversation, messages.participant_event("joined", conversation, me), skip=peer)

    async def _send_joined(self, peer: Peer, conversation: str) -> None:
        participants = await self.store.participants(conversation) or []
        history = await self.store.history(conversation)
        peer.deliver(messages.encode(messages.joined(conversation, _me(peer), participants, history)), "joined")

    # -- chat and queue ---------------------------------------------------------------

    async def chat(self, peer: Peer, msg: messages.Chat) -> None:
        conversation = _conversation(peer)
        if len(msg.text) > self.config.max_chat_chars:
            raise TooLarge(f"chat text is {len(msg.text)} characters; the limit is {self.config.max_chat_chars}")
        if not msg.text.strip():
            raise BadRequest("chat text is empty")
        await self.post(conversation, _me(peer), msg.text)

    async def post(self, conversation: str, sender: Participant, text: str) -> ChatMessage:
        """Store a chat message and deliver it to every participant, the sender included."""
        message = ChatMessage(id=uuid.uuid4().hex, sender=sender, text=text, ts=now_ms())
        await self.store.append_chat(conversation, message)
        self.broadcast(conversation, message.as_dict())
        return message

    async def escalate(self, peer: Peer, msg: messages.Escalate) -> None:
        me = _me(peer)
        if me.role != Role.CUSTOMER:
            raise Forbidden("only customers can ask for an agent")
        conversation = _conversation(peer)
        participants = await self.store.participants(conversation) or []
        if any(p.role == Role.AGENT for p in participants):
            raise Conflict("an agent is already in this conversation")
        reason = (msg.reason or "customer_request")[:MAX_REASON_CHARS]
        queued = {"type": "queued", "conversation": conversation, "reason": reason}
        if not await self.store.enqueue(QueueEntry(conversation, me, now_ms(), reason)):
            peer.deliver(messages.encode(queued), "queued")  # already waiting: acknowledge again
            return
        await self.post(
            conversation, messages.SYSTEM, f"{me.name} asked to talk to a person. An agent will join shortly."
        )
        self.broadcast(conversation, queued)
        await self.publish_queue()

    async def accept(self, peer: Peer, msg: messages.Accept) -> None:
        me = _me(peer)
        if me.role != Role.AGENT:
            raise Forbidden("only agents can accept conversations")
        if peer.conversation == msg.conversation:
            raise Conflict("you are already in this conversation")
        if peer.conversation is not None:
            raise Conflict(f"leave conversation {peer.conversation!r} before accepting another")
        if await self.store.take(msg.conversation) is None:
            participants = await self.store.participants(msg.conversation)
            if participants and any(p.role == Role.AGENT for p in participants):
                raise Conflict("another agent has already accepted this conversation")
            raise NotFound("that conversation is not waiting in the queue")
        await self._enter(peer, msg.conversation, announce=True)
        await self.publish_queue()

    async def publish_queue(self) -> None:
        entries = await self.store.waiting()
        self.metrics.queue_length.set(len(entries))
        if self._agents:
            data = messages.encode(messages.queue(entries))
            for agent in self._agents.values():
                agent.deliver(data, "queue")

    def _deliver_queue(self, peer: Peer, entries: list[QueueEntry]) -> None:
        peer.deliver(messages.encode(messages.queue(entries)), "queue")

    # -- leaving ----------------------------------------------------------------------

    async def leave(self, peer: Peer) -> None:
        me = _me(peer)
        conversation = _conversation(peer)
        await self._exit(peer)
        peer.deliver(messages.encode({"type": "left", "conversation": conversation}), "left")
        if me.role == Role.CUSTOMER:
            # A customer without a conversation has nothing to do until it joins again.
            peer.protocol.left()
            peer.participant = None
            self.sessions.discard(peer)

    async def disconnect(self, peer: Peer) -> None:
        """The connection is gone: leave whatever it was part of (unless it was replaced)."""
        self.sessions.discard(peer)
        me = peer.participant
        if me is None:
            return
        if self._agents.get(me.identity) is peer:
            del self._agents[me.identity]
        if peer.conversation is not None:
            await self._exit(peer)

    async def _exit(self, peer: Peer) -> None:
        me = _me(peer)
        conversation = _conversation(peer)
        peer.conversation = None
        room = self._rooms.get(conversation)
        if room is not None and room.get(me.identity) is peer:
            del room[me.identity]
            if not room:
                del self._rooms[conversation]
        result = await self.store.remove_participant(conversation, me.identity)
        if result.left and not result.conversation_removed:
            self.broadcast(conversation, messages.participant_event("left", conversation, me))
        if result.queue_changed:
            await self.publish_queue()

    # -- fan-out ----------------------------------------------------------------------

    def broadcast(self, conversation: str, message: dict[str, Any], *, skip: Peer | None = None) -> None:
        """Encode once and deliver to every local participant of the conversation."""
        room = self._rooms.get(conversation)
        if not room:
            return
        data = messages.encode(message)
        mtype = str(message["type"])
        for peer in room.values():
            if peer is not skip:
                peer.deliver(data, mtype)


def _me(peer: Peer) -> Participant:
    if peer.participant is None:  # pragma: no cover - the protocol state machine prevents it
        raise Unauthorized("join first")
    return peer.participant


def _conversation(peer: Peer) -> str:
    if peer.conversation is None:
        raise BadRequest("you are not in a conversation")
    return peer.conversation


def _field(value: str | None, name: str) -> str:
    if value is None or not value.strip():
        raise BadRequest(f"join needs a non-empty '{name}'")
    if len(value) > MAX_FIELD_CHARS:
        raise TooLarge(f"'{name}' is longer than {MAX_FIELD_CHARS} characters")
    if not value.isprintable():
        raise BadRequest(f"'{name}' contains control characters")
    return value
