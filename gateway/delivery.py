"""Who gets which bytes: this process's connections, and events turned into messages.

``Delivery`` keeps the per-process index of connections (who is connected here, in
which conversations, which agents are in the lobby) and is the wire encoder: each
domain event becomes the client message its conversation's local participants get,
encoded once per fan-out, not once per recipient. On a cluster (``--redis``), the
same bytes also go to the conversation's participants on other nodes (``Remote``,
``bus.py``), with the events other nodes must react to (``REMOTE_REACTIONS``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from . import events as ev
from . import messages
from .errors import BadRequest, NotFound, ProtocolError
from .messages import Participant, QueueEntry, Role
from .protocol import SignalingProtocol

#: Messages held for one member while its ``joined`` is being built (a few ms at most).
PENDING_LIMIT = 512


@dataclass(eq=False)
class Membership:
    """One conversation a connection is in."""

    conversation: str


class Connection(Protocol):
    """What the gateway needs from a client connection (``session.Session``)."""

    protocol: SignalingProtocol
    participant: Participant | None
    #: The conversations this connection is in, in the order it entered them.
    memberships: dict[str, Membership]
    #: Its join's ``Store`` version: a newer connection with its identity through another
    #: node replaces it only if that one's is greater (0 on one process).
    version: int

    def deliver(self, data: bytes, mtype: str) -> None:
        """Queue an encoded message for the client without waiting."""

    def close(self, code: int, reason: str) -> None:
        """Close after the messages already queued have been written."""

    def send_error(self, exc: ProtocolError, request: str | None = None) -> None:
        """Queue an ``error`` for the client (``request``: the type of message that failed)."""


def target(conn: Connection, requested: str | None) -> str:
    """The conversation a client message is about: the one it names, or its only one."""
    if requested is not None:
        if requested not in conn.memberships:
            raise NotFound(f"you are not in conversation {requested[:128]!r}")
        return requested
    if len(conn.memberships) == 1:
        return next(iter(conn.memberships))
    if not conn.memberships:
        raise BadRequest("you are not in a conversation")
    raise BadRequest("you are in several conversations: name one in 'conversation'")


class Remote(Protocol):
    """The other nodes (``bus.Bus``)."""

    def room(
        self,
        conversation: str,
        data: bytes,
        mtype: str,
        *,
        skip: str | None = None,
        event: bytes | None = None,
        fresh: bool = False,
        everyone: bool = False,
        media: tuple[str, bool, bool] | None = None,
    ) -> None:
        """Send to the conversation's participants on other nodes (``event``: for their
        reactions); ``fresh``: where they are must be read now, not taken from this node's
        view (which is only as new as its last step in that conversation); ``everyone``:
        to every other node (an ended conversation: nobody is in it any more, but nodes
        that held its calls or records still hold state about it); ``media``: (identity,
        audio, video) of a call here, recorded for other nodes' ``joined`` in the same
        step as it is sent."""

    def queue(self, data: bytes, version: int) -> None:
        """Send the agent queue to every other node's agents."""

    def replaced(self, identity: str, version: int, *, conversation: str = "", node: str | None = None) -> None:
        """A newer connection of ``identity`` joined here (``version``): its older one in
        ``conversation`` on ``node`` (a customer's), or anywhere on every other node (None:
        an agent's), is replaced."""


#: Events whose reactions may be due on another node: a customer's chat or call reaches
#: the bot wherever its link is, an agent's arrival stops it there, and every node
#: forgets an ended conversation's per-process state.
REMOTE_REACTIONS: dict[str, type[ev.Event]] = {
    t.__name__: t for t in (ev.ChatPosted, ev.AgentAccepted, ev.CallEnded, ev.ConversationClosed)
}
_msgpack = msgspec.msgpack.Encoder()
#: Events that come from a store step this node just made, which told it where the
#: conversation's participants are: its view is fresh. Others (media, speaking,
#: transcripts, upgrades) may come long after this node's last step there.
STEP_EVENTS = (
    ev.ChatPosted,
    ev.ParticipantJoined,
    ev.ParticipantLeft,
    ev.QueueEntered,
    ev.QueueLeft,
    ev.AgentAccepted,
    ev.ConversationClosed,
)


def for_remote_reaction(event: ev.Event) -> bytes | None:
    """The event encoded for other nodes' reactions, or None if none is due."""
    match event:
        case ev.ChatPosted(message=m) if m.sender.role != Role.CUSTOMER:
            return None
        case ev.CallEnded(participant=who) if who.role != Role.CUSTOMER:
            return None
    if type(event).__name__ not in REMOTE_REACTIONS:
        return None
    return _msgpack.encode((type(event).__name__, event))


def remote_reaction(data: bytes) -> ev.Event:
    """What ``for_remote_reaction`` encoded (msgspec.ValidationError if it is not that)."""
    name, raw = msgspec.msgpack.decode(data)
    kind = REMOTE_REACTIONS.get(name)
    if kind is None:
        raise msgspec.ValidationError(f"not an event other nodes react to: {name!r}")
    return msgspec.convert(raw, kind)


@dataclass
class Delivery:
    #: conversation id -> identity -> the local connection that is that participant
    rooms: dict[str, dict[str, Connection]] = field(default_factory=dict)
    #: identity -> the local agent connection (one connection per agent identity)
    agents: dict[str, Connection] = field(default_factory=dict)
    #: connections that have joined and are still connected (replaced ones until they close)
    sessions: set[Connection] = field(default_factory=set)
    #: (conversation, identity) entered but not yet sent its ``joined``: what the room says
    #: meanwhile waits here, so ``joined`` always comes first (building it awaits the records)
    pending: dict[tuple[str, str], list[tuple[bytes, str]]] = field(default_factory=dict)
    #: The other nodes (None: a single process).
    remote: Remote | None = None
    #: The version of the last queue the local agents got (``Store.queue``): an older one
    #: arriving later (from another node, or after a slower build here) is not sent.
    queue_version: int = -1

    def enter(self, conn: Connection, conversation: str) -> None:
        """Make ``conn`` a member; it gets nothing of the room until ``ready`` (after its
        ``joined``), and nothing it should have got is lost."""
        me = conn.participant
        assert me is not None
        conn.memberships.setdefault(conversation, Membership(conversation))
        self.rooms.setdefault(conversation, {})[me.identity] = conn
        self.pending[(conversation, me.identity)] = []

    def ready(self, conn: Connection, conversation: str) -> None:
        """``joined`` went out: deliver what the room said since ``enter``."""
        me = conn.participant
        assert me is not None
        for data, mtype in self.pending.pop((conversation, me.identity), []):
            conn.deliver(data, mtype)

    def exit(self, conn: Connection, conversation: str) -> None:
        conn.memberships.pop(conversation, None)
        me = conn.participant
        if me is not None:
            self.pending.pop((conversation, me.identity), None)
        room = self.rooms.get(conversation)
        if me is not None and room is not None and room.get(me.identity) is conn:
            del room[me.identity]
            if not room:
                del self.rooms[conversation]

    def local(self, conversation: str, identity: str) -> Connection | None:
        return self.rooms.get(conversation, {}).get(identity)

    # -- events -> wire ---------------------------------------------------------------

    def __call__(self, event: ev.Event) -> None:
        """Deliver one event to the conversation's participants as its client message:
        here, and through ``remote`` on other nodes."""
        message, skip = wire(event)
        data = b"" if message is None else messages.encode(message)
        mtype = "" if message is None else str(message["type"])
        if data and event.conversation in self.rooms:
            self.fan_out(event.conversation, data, mtype, skip=skip)
        self._elsewhere(event, data, mtype, skip)

    def elsewhere(self, event: ev.Event) -> None:
        """Deliver one event on other nodes only: what this node says again after the
        shared store lost it (a Redis restart: ``Broker.rebuild``)."""
        message, skip = wire(event)
        data = b"" if message is None else messages.encode(message)
        self._elsewhere(event, data, "" if message is None else str(message["type"]), skip)

    def _elsewhere(self, event: ev.Event, data: bytes, mtype: str, skip: str | None) -> None:
        if self.remote is None:
            return
        reaction = for_remote_reaction(event)
        if data or reaction is not None:
            fresh = not isinstance(event, STEP_EVENTS)
            everyone = isinstance(event, ev.ConversationClosed)
            media = (event.identity, event.audio, event.video) if isinstance(event, ev.MediaChanged) else None
            self.remote.room(
                event.conversation,
                data,
                mtype,
                skip=skip,
                event=reaction,
                fresh=fresh,
                everyone=everyone,
                media=media,
            )

    def fan_out(self, conversation: str, data: bytes, mtype: str, *, skip: str | None = None) -> None:
        """Deliver already encoded bytes to every local participant but ``skip`` (an identity)."""
        for identity, conn in self.rooms.get(conversation, {}).items():
            if identity != skip:
                waiting = self.pending.get((conversation, identity))
                if waiting is None:
                    conn.deliver(data, mtype)
                elif len(waiting) < PENDING_LIMIT:
                    waiting.append((data, mtype))

    def to_agents(
        self, entries: Iterable[QueueEntry], cards: dict[str, dict[str, Any]] | None = None, version: int = 0
    ) -> None:
        """The queue (``version``: ``Store.queue``'s) to every agent, here and on other nodes."""
        if not self.agents and self.remote is None:
            return
        data = messages.encode(messages.queue(list(entries), cards))
        self.queue_to_agents(data, version)
        if self.remote is not None:
            self.remote.queue(data, version)

    def queue_to_agents(self, data: bytes, version: int) -> None:
        """An encoded queue to this node's agents, unless they had a newer one."""
        if version < self.queue_version:
            return
        self.queue_version = version
        for agent in self.agents.values():
            agent.deliver(data, "queue")


def wire(event: ev.Event) -> tuple[dict[str, Any] | None, str | None]:
    """The client message for an event (None: nothing on the wire), and whom it skips."""
    c = event.conversation
    match event:
        case ev.ParticipantJoined(participant=who):
            # The joiner itself gets ``joined`` instead.
            return messages.participant_event("joined", c, who), who.identity
        case ev.ParticipantLeft(participant=who):
            return messages.participant_event("left", c, who), who.identity
        case ev.ChatPosted(message=message):
            return message.as_dict(c), None
        case ev.TranscriptPosted(sender=sender, text=text, final=final, speaker=speaker):
            return {
                "type": "transcript",
                "conversation": c,
                "from": sender.as_dict(),
                "speaker": speaker.as_dict(),
                "text": text,
                "final": final,
            }, None
        case ev.QueueEntered(entry=entry):
            return {"type": "queued", "conversation": c, "reason": entry.reason}, None
        case ev.MediaChanged(identity=identity, audio=audio, video=video):
            return {"type": "media", "conversation": c, "identity": identity, "audio": audio, "video": video}, None
        case ev.SpeakingChanged(identity=identity, speaking=speaking):
            return {"type": "speaking", "conversation": c, "identity": identity, "speaking": speaking}, None
        case ev.RecordingChanged(active=active):
            return {"type": "recording", "conversation": c, "active": active}, None
        case ev.UpgradeRequested(id=rid, media=media, sender=sender):
            # Everyone gets it, the sender included: the echo carries the id to match replies.
            return {
                "type": "upgrade.request",
                "conversation": c,
                "id": rid,
                "media": media,
                "from": sender.as_dict(),
            }, None
        case ev.UpgradeAnswered(id=rid, media=media, replier=replier, accept=accept):
            reply = {
                "type": "upgrade.reply",
                "conversation": c,
                "id": rid,
                "media": media,
                "accept": accept,
                "from": replier.as_dict(),
            }
            return reply, replier.identity
    return None, None
