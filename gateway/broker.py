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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiortc import RTCIceServer

from media.ice import parse_networks
from media.pipeline import VoicePipeline
from media.vad import Event, SpeechStarted, SpeechStopped

from . import messages, tokens
from .bot.manager import BotManager
from .config import Config
from .errors import BadRequest, CallFailed, Conflict, Forbidden, NotFound, TooLarge, Unauthorized, Unavailable
from .messages import ChatMessage, Participant, QueueEntry, Role
from .metrics import Metrics
from .protocol import SignalingProtocol
from .routing import Router, taps
from .rtc import MediaPeer, RtcSettings
from .store import Store

log = logging.getLogger("talkgate.broker")

#: WebSocket close codes (documented in docs/protocol.md).
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_JOIN_TIMEOUT = 4408
CLOSE_REPLACED = 4409
#: 1013 Try Again Later: a client that fell behind, or a join refused for capacity.
CLOSE_TRY_LATER = 1013

_PONG = messages.encode({"type": "pong"})
MAX_FIELD_CHARS = tokens.MAX_FIELD_CHARS
MAX_REASON_CHARS = 200
#: Unanswered upgrade requests kept per conversation (the oldest goes first).
MAX_PENDING_UPGRADES = 16
NO_MEDIA = {"audio": False, "video": False}


@dataclass(eq=False)
class UpgradeRequest:
    id: str
    conversation: str
    media: str
    sender: Participant
    #: Identities it was sent to that have not replied yet.
    waiting: set[str]


class Peer(Protocol):
    """What the broker needs from a client connection."""

    protocol: SignalingProtocol
    participant: Participant | None
    conversation: str | None
    #: The participant's peer connection with the gateway, once it has offered.
    media: MediaPeer | None

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
        ice = config.ice_servers()
        self.ice_servers_json = ice
        self.rtc = RtcSettings(
            ice_servers=tuple(RTCIceServer(**server) for server in ice),
            allowed_networks=parse_networks(config.rtc_allowed_networks),
        )
        self.router = Router(self._media_changed)
        metrics.peer_connections.set_function(lambda: len(self.router))
        #: conversation -> identity -> the last ``media`` state announced (only senders)
        self._media: dict[str, dict[str, dict[str, bool]]] = {}
        #: upgrade id -> request; per conversation at most MAX_PENDING_UPGRADES
        self._upgrades: dict[str, UpgradeRequest] = {}
        #: Each conversation's link to the speech bot, if the gateway has one.
        self.bots = BotManager(self)

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
            case messages.Offer():
                await self.offer(peer, msg)
            case messages.Answer():
                await _media(peer).accept_answer(msg.sdp)
            case messages.Candidate():
                await _media(peer).add_candidate(msg.candidate, msg.sdpMid, msg.sdpMLineIndex)
            case messages.Hangup():
                _media(peer)  # raises bad_request when there is no call to hang up
                await self.close_media(peer)
            case messages.Upgrade():
                await self.upgrade(peer, msg)
            case messages.UpgradeReply():
                await self.upgrade_reply(peer, msg)

    @property
    def local_conversations(self) -> int:
        """Conversations with a participant connected to this process (what a drain waits for;
        the store's count covers every gateway process sharing it)."""
        return len(self._rooms)

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
        if grant.room is not None:
            await self._admit(grant.room, grant.identity)
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
        await self.bots.start(grant.room, me)

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
            peer.deliver(self._joined(None, me, [], []), "joined")
        elif target == inherited:
            await self._send_joined(peer, target)
        else:
            queue_changed = await self.store.take(target) is not None
            await self._enter(peer, target, announce=True)
            await self.bots.stop(target, "transferred")
        if queue_changed:
            await self.publish_queue()
        else:
            self._deliver_queue(peer, await self.store.waiting())

    async def _admit(self, conversation: str, identity: str) -> None:
        """Refuse (``unavailable``) an entry that would open a conversation over
        ``max_conversations`` or fill one over ``max_participants``; rejoining is always fine."""
        participants = await self.store.participants(conversation)
        if participants is None:
            if await self.store.conversation_count() >= self.config.max_conversations:
                raise Unavailable("the gateway is at its limit of conversations; try again later")
        elif len(participants) >= self.config.max_participants and all(p.identity != identity for p in participants):
            raise Unavailable(f"this conversation is full ({self.config.max_participants} participants)")

    def _evict(self, old: Peer) -> None:
        """Detach a connection replaced by a newer one with the same identity."""
        if old.media is not None:
            # Its session closes the peer connection when it ends; the new
            # connection negotiates its own.
            self.router.detach(old.media)
            self._announce_media(old.media.conversation, old.media.identity, NO_MEDIA)
        old.conversation = None
        old.deliver(
            messages.encode(
                messages.error("conflict", "replaced by a newer connection with the same identity", "join")
            ),
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
        peer.deliver(self._joined(conversation, _me(peer), participants, history), "joined")

    def _joined(
        self, conversation: str | None, me: Participant, participants: list[Participant], history: list[ChatMessage]
    ) -> bytes:
        media = [{"identity": identity, **state} for identity, state in self._media.get(conversation or "", {}).items()]
        return messages.encode(
            messages.joined(conversation, me, participants, history, ice_servers=self.ice_servers_json, media=media)
        )

    # -- chat and queue ---------------------------------------------------------------

    async def chat(self, peer: Peer, msg: messages.Chat) -> None:
        conversation = _conversation(peer)
        if len(msg.text) > self.config.max_chat_chars:
            raise TooLarge(f"chat text is {len(msg.text)} characters; the limit is {self.config.max_chat_chars}")
        if not msg.text.strip():
            raise BadRequest("chat text is empty")
        message = await self.post(conversation, _me(peer), msg.text)
        bot = self.bots.get(conversation)
        if bot is not None and message.sender.role == Role.CUSTOMER:
            bot.customer_chat(message.as_dict())

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
        notice = f"{me.name} asked to talk to a person. An agent will join shortly."
        if not await self._enqueue(conversation, me, reason, notice):
            # Already waiting: acknowledge again.
            queued = {"type": "queued", "conversation": conversation, "reason": reason}
            peer.deliver(messages.encode(queued), "queued")

    async def accept(self, peer: Peer, msg: messages.Accept) -> None:
        me = _me(peer)
        if me.role != Role.AGENT:
            raise Forbidden("only agents can accept conversations")
        if peer.conversation == msg.conversation:
            raise Conflict("you are already in this conversation")
        if peer.conversation is not None:
            raise Conflict(f"leave conversation {peer.conversation!r} before accepting another")
        await self._admit(msg.conversation, me.identity)
        if await self.store.take(msg.conversation) is None:
            participants = await self.store.participants(msg.conversation)
            if participants and any(p.role == Role.AGENT for p in participants):
                raise Conflict("another agent has already accepted this conversation")
            raise NotFound("that conversation is not waiting in the queue")
        await self._enter(peer, msg.conversation, announce=True)
        await self.publish_queue()
        await self.bots.stop(msg.conversation, "transferred")

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
        await self.close_media(peer)
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
        await self.close_media(peer)
        peer.conversation = None
        room = self._rooms.get(conversation)
        if room is not None and room.get(me.identity) is peer:
            del room[me.identity]
            if not room:
                del self._rooms[conversation]
        if me.role == Role.CUSTOMER and self.bots.get(conversation) is not None:
            others = await self.store.participants(conversation) or []
            if not any(p.role == Role.CUSTOMER and p.identity != me.identity for p in others):
                await self.bots.stop(conversation, "customer_left")  # before the last customer goes
        result = await self.store.remove_participant(conversation, me.identity)
        if result.conversation_removed:
            self._media.pop(conversation, None)
            for request in [u for u in self._upgrades.values() if u.conversation == conversation]:
                del self._upgrades[request.id]
        elif result.left:
            self.broadcast(conversation, messages.participant_event("left", conversation, me))
        if result.queue_changed:
            await self.publish_queue()

    # -- media ------------------------------------------------------------------------

    async def offer(self, peer: Peer, msg: messages.Offer) -> None:
        conversation = _conversation(peer)
        if peer.media is None:
            if len(self.router) >= self.config.max_peer_connections:
                raise Unavailable(
                    f"the gateway holds its limit of {self.config.max_peer_connections} calls; try again later"
                )
            me = _me(peer)
            peer.media = MediaPeer(
                conversation=conversation,
                participant=me,
                settings=self.rtc,
                send=lambda message: peer.deliver(messages.encode(message), str(message["type"])),
                router=self.router,
            )
            if taps(me):
                pipeline = VoicePipeline(self.config.vad_settings())
                pipeline.timer = self.metrics.rtp_to_pipeline
                pipeline.listeners.append(self._speaking_listener(conversation, me.identity))
                peer.media.pipeline = pipeline
                bot = self.bots.get(conversation)
                if bot is not None:
                    bot.attach(pipeline, peer.media.taps)
            self.router.attach(peer.media)
        try:
            accepted = await peer.media.accept_offer(msg.sdp)
        except CallFailed:
            await self.close_media(peer)
            raise
        if not accepted:
            self.metrics.offer_collisions.inc()
            raise Conflict("offer collision: answer the gateway's pending offer, then offer again")

    async def close_media(self, peer: Peer) -> None:
        """End the participant's peer connection (hang-up, leave, disconnect)."""
        media = peer.media
        if media is None:
            return
        peer.media = None
        self.router.detach(media)
        self._announce_media(media.conversation, media.identity, NO_MEDIA)
        await media.close()

    def _speaking_listener(self, conversation: str, identity: str) -> Callable[[Event], None]:
        """Tell the conversation when a customer starts and stops talking (agents see it)."""
        started = messages.encode({"type": "speaking", "identity": identity, "speaking": True})
        stopped = messages.encode({"type": "speaking", "identity": identity, "speaking": False})

        def on_event(event: Event) -> None:
            if isinstance(event, SpeechStarted):
                self.fan_out(conversation, started, "speaking")
            elif isinstance(event, SpeechStopped):
                self.fan_out(conversation, stopped, "speaking")

        return on_event

    def _media_changed(self, media: MediaPeer) -> None:
        self._announce_media(media.conversation, media.identity, media.media_state())

    def _announce_media(self, conversation: str, identity: str, state: dict[str, bool]) -> None:
        """Tell everyone in the conversation what a participant now sends, when it changed."""
        known = self._media.setdefault(conversation, {})
        if known.get(identity, NO_MEDIA) == state:
            if not known:
                del self._media[conversation]
            return
        if state == NO_MEDIA:
            del known[identity]
            if not known:
                del self._media[conversation]
        else:
            known[identity] = state
        self.broadcast(conversation, {"type": "media", "identity": identity, **state})

    async def upgrade(self, peer: Peer, msg: messages.Upgrade) -> None:
        await self.request_upgrade(_conversation(peer), _me(peer), msg.media)

    async def request_upgrade(self, conversation: str, sender: Participant, media: str) -> None:
        """Ask everyone else in the conversation to add ``media`` (a participant or the bot asks)."""
        participants = await self.store.participants(conversation) or []
        others = [p.identity for p in participants if p.identity != sender.identity]
        if not others:
            raise NotFound("nobody else is in this conversation to ask")
        pending = [u for u in self._upgrades.values() if u.conversation == conversation]
        if len(pending) >= MAX_PENDING_UPGRADES:
            del self._upgrades[pending[0].id]
        request = UpgradeRequest(uuid.uuid4().hex[:16], conversation, media, sender, set(others))
        self._upgrades[request.id] = request
        # Everyone gets it, the sender included: the echo carries the id to match replies.
        self.broadcast(
            conversation, {"type": "upgrade.request", "id": request.id, "media": media, "from": sender.as_dict()}
        )
        for participant in participants:
            accept = self.bots.answers_upgrade(conversation, participant.identity, media)
            if accept is not None:
                self._reply_upgrade(request, participant, accept)

    def _reply_upgrade(
        self, request: UpgradeRequest, replier: Participant, accept: bool, skip: Peer | None = None
    ) -> None:
        request.waiting.discard(replier.identity)
        if not request.waiting:
            self._upgrades.pop(request.id, None)
        self.broadcast(
            request.conversation,
            {
                "type": "upgrade.reply",
                "id": request.id,
                "media": request.media,
                "accept": accept,
                "from": replier.as_dict(),
            },
            skip=skip,
        )

    async def upgrade_reply(self, peer: Peer, msg: messages.UpgradeReply) -> None:
        me = _me(peer)
        request = self._upgrades.get(msg.id)
        if request is None or request.conversation != peer.conversation:
            raise NotFound("no such upgrade request in this conversation")
        if me.identity not in request.waiting:
            if me.identity == request.sender.identity:
                raise Forbidden("you cannot answer your own upgrade request")
            raise Conflict("you have already answered this upgrade request")
        self._reply_upgrade(request, me, msg.accept, skip=peer)

    async def hand_over(self, conversation: str, reason: str, notice: str) -> None:
        """Put a bot conversation in the agent queue and tell the customer."""
        participants = await self.store.participants(conversation) or []
        customer = next((p for p in participants if p.role == Role.CUSTOMER), None)
        if customer is None or any(p.role == Role.AGENT for p in participants):
            return
        await self._enqueue(conversation, customer, reason, notice)

    async def _enqueue(self, conversation: str, customer: Participant, reason: str, notice: str) -> bool:
        """Queue the conversation for agents: a system chat line, ``queued``, the new queue.

        False if it was already waiting (nothing is sent then).
        """
        if not await self.store.enqueue(QueueEntry(conversation, customer, now_ms(), reason)):
            return False
        await self.post(conversation, messages.SYSTEM, notice)
        self.broadcast(conversation, {"type": "queued", "conversation": conversation, "reason": reason})
        await self.publish_queue()
        return True

    # -- fan-out ----------------------------------------------------------------------

    def broadcast(self, conversation: str, message: dict[str, Any], *, skip: Peer | None = None) -> None:
        """Encode once and deliver to every local participant of the conversation."""
        if conversation in self._rooms:
            self.fan_out(conversation, messages.encode(message), str(message["type"]), skip=skip)

    def fan_out(self, conversation: str, data: bytes, mtype: str, *, skip: Peer | None = None) -> None:
        """Deliver an already encoded message to every local participant."""
        for peer in self._rooms.get(conversation, {}).values():
            if peer is not skip:
                peer.deliver(data, mtype)


def _me(peer: Peer) -> Participant:
    if peer.participant is None:  # pragma: no cover - the protocol state machine prevents it
        raise Unauthorized("join first")
    return peer.participant


def _media(peer: Peer) -> MediaPeer:
    if peer.media is None:
        raise BadRequest("there is no call yet: send an offer first")
    return peer.media


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
