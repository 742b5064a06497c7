"""The client protocol's message types (docs/protocol.md is the prose version).

Client → gateway messages are msgspec structs tagged by ``type``: one decoder
validates shape and types in C and names the offending field in its error.
Gateway → client messages are plain dicts built by the helpers at the bottom and
encoded once per fan-out, not once per recipient.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec


class Role(enum.StrEnum):
    CUSTOMER = "customer"
    AGENT = "agent"
    BOT = "bot"
    SYSTEM = "system"


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=False):
    """Base of client messages; unknown fields are ignored for forward compatibility.

    Conversation-scoped messages take an optional ``conversation``: required when the
    connection is in more than one (an agent with --agent-capacity > 1), else its only one.
    """


class Join(_Msg, tag="join"):
    token: str | None = None
    # Only honoured by a server started with --dev, and only without a token.
    room: str | None = None
    identity: str | None = None
    role: str | None = None
    name: str | None = None


class Chat(_Msg, tag="chat"):
    text: str
    conversation: str | None = None


class Escalate(_Msg, tag="escalate"):
    reason: str | None = None
    conversation: str | None = None


class Accept(_Msg, tag="accept"):
    conversation: str


class Leave(_Msg, tag="leave"):
    #: Which conversation (optional while the connection is in exactly one).
    conversation: str | None = None


class Ping(_Msg, tag="ping"):
    pass


class Offer(_Msg, tag="offer"):
    sdp: str
    conversation: str | None = None


class Answer(_Msg, tag="answer"):
    sdp: str
    conversation: str | None = None


class Candidate(_Msg, tag="candidate"):
    candidate: str
    sdpMid: str | None = None
    sdpMLineIndex: int | None = None
    conversation: str | None = None


MediaKind = Literal["audio", "video"]


class Upgrade(_Msg, tag="upgrade"):
    media: MediaKind
    conversation: str | None = None


class UpgradeReply(_Msg, tag="upgrade.reply"):
    id: str
    accept: bool
    conversation: str | None = None


class Hangup(_Msg, tag="hangup"):
    #: Which conversation (optional while the connection is in exactly one).
    conversation: str | None = None


#: Events a ``history`` page holds unless the client asks for fewer, and at most.
HISTORY_PAGE = 50
HISTORY_PAGE_MAX = 200


class History(_Msg, tag="history"):
    """A page of a recorded conversation's timeline (docs/protocol.md#history)."""

    #: A recorded conversation's id (as in a customer card's ``previous``), or a room id:
    #: its current (or latest) record.
    conversation: str
    #: The page ends just before this event id (None: with the newest event).
    before: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=HISTORY_PAGE_MAX)] = HISTORY_PAGE


ClientMessage = (
    Join
    | Chat
    | Escalate
    | Accept
    | Leave
    | Ping
    | Offer
    | Answer
    | Candidate
    | Upgrade
    | UpgradeReply
    | Hangup
    | History
)

#: Client message class -> its ``type`` name (metrics labels, docs).
TAGS: dict[type, str] = {
    t: str(t.__struct_config__.tag)
    for t in (
        Join,
        Chat,
        Escalate,
        Accept,
        Leave,
        Ping,
        Offer,
        Answer,
        Candidate,
        Upgrade,
        UpgradeReply,
        Hangup,
        History,
    )
}
CLIENT_TYPES: tuple[str, ...] = tuple(TAGS.values())

_decoder: msgspec.json.Decoder[ClientMessage] = msgspec.json.Decoder(ClientMessage)
_encoder = msgspec.json.Encoder()


def decode(data: bytes | str) -> ClientMessage:
    """Parse one frame; raises ``msgspec.DecodeError`` / ``ValidationError``."""
    return _decoder.decode(data)


def encode(message: dict[str, Any]) -> bytes:
    """Encode a gateway → client message to UTF-8 JSON bytes (sent as a text frame)."""
    return _encoder.encode(message)


class Participant(msgspec.Struct, frozen=True):
    """Who is in a conversation, as every other participant sees them."""

    identity: str
    role: str
    name: str

    def as_dict(self) -> dict[str, str]:
        return {"identity": self.identity, "role": self.role, "name": self.name}


SYSTEM = Participant(identity="system", role=Role.SYSTEM.value, name="talkgate")


class ChatMessage(msgspec.Struct, frozen=True):
    id: str
    sender: Participant
    text: str
    ts: int
    #: A spoken turn (a bot's final transcript: the customer's words or the bot's), kept in
    #: the recorded history; ``sender`` is whoever spoke.
    spoken: bool = False

    def as_dict(self, conversation: str | None = None) -> dict[str, Any]:
        """The ``chat`` message (naming its conversation when given)."""
        message: dict[str, Any] = {
            "type": "chat",
            "id": self.id,
            "from": self.sender.as_dict(),
            "text": self.text,
            "ts": self.ts,
        }
        if conversation is not None:
            message["conversation"] = conversation
        if self.spoken:
            message["spoken"] = True
        return message


class QueueEntry(msgspec.Struct, frozen=True):
    conversation: str
    customer: Participant
    since: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "conversation": self.conversation,
            "customer": self.customer.as_dict(),
            "since": self.since,
            "reason": self.reason,
        }


def error(code: str, message: str, request: str | None = None) -> dict[str, Any]:
    """``request`` names the type of the client message that failed (None: unparsable)."""
    return {"type": "error", "code": code, "message": message, "request": request}


def joined(
    conversation: str | None,
    me: Participant,
    participants: list[Participant],
    history: list[ChatMessage],
    *,
    ice_servers: list[dict[str, Any]],
    media: list[dict[str, Any]],
    capacity: int | None = None,
    customer: dict[str, Any] | None = None,
    recording: bool = False,
) -> dict[str, Any]:
    """``capacity``: for agents, how many conversations the connection may hold;
    ``customer``: for agents, the customer's card (profile, earlier conversations);
    ``recording``: the conversation's call is being recorded (absent: it is not)."""
    message: dict[str, Any] = {
        "type": "joined",
        "conversation": conversation,
        "identity": me.identity,
        "role": me.role,
        "name": me.name,
        "participants": [p.as_dict() for p in participants],
        "history": [m.as_dict(conversation) for m in history],
        "ice_servers": ice_servers,
        "media": media,
    }
    if capacity is not None:
        message["capacity"] = capacity
    if customer is not None:
        message["customer"] = customer
    if recording:
        message["recording"] = True
    return message


def participant_event(kind: str, conversation: str, who: Participant) -> dict[str, Any]:
    return {"type": f"participant.{kind}", "conversation": conversation, **who.as_dict()}


def shutdown(retry_after_ms: int) -> dict[str, Any]:
    """The gateway is going away: finish up, then reconnect after ``retry_after_ms``."""
    return {"type": "shutdown", "retry_after_ms": retry_after_ms}


def queue(entries: list[QueueEntry], cards: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``cards``: conversation -> what the records know of its customer (profile, previous)."""
    waiting = []
    for entry in entries:
        item = entry.as_dict()
        card = (cards or {}).get(entry.conversation)
        if card is not None:
            item["customer"] = {**item["customer"], "profile": card["profile"], "previous": card["previous"]}
        waiting.append(item)
    return {"type": "queue", "waiting": waiting}


#: Fields of a timeline event on the wire that a recorded body cannot override.
_TIMELINE_FIELDS = frozenset({"id", "ts", "type", "from"})


def timeline_event(
    event_id: int, ts: int, kind: str, actor: Participant | None, body: dict[str, Any]
) -> dict[str, Any]:
    """One recorded event in a ``history`` page: ``{"id", "ts", "type", "from", ...}``, the
    body's fields flattened (its ``name`` is in ``from``; its own ``id``, a chat message's or
    an upgrade request's, is ``ref``)."""
    item: dict[str, Any] = {"id": event_id, "ts": ts, "type": kind, "from": actor.as_dict() if actor else None}
    for key, value in body.items():
        if key == "id":
            item["ref"] = value
        elif key != "name" and key not in _TIMELINE_FIELDS:
            item[key] = value
    return item


def history(
    conversation: str, before: int | None, record: str, room: str, events: list[dict[str, Any]], more: bool
) -> dict[str, Any]:
    """A page of a recorded timeline, oldest first; ``more``: older events exist (ask again
    with ``before`` = the first event's id). ``conversation`` and ``before`` are what the
    client asked for (it matches answers to requests by them), ``record`` the conversation
    record it names."""
    return {
        "type": "history",
        "conversation": conversation,
        "before": before,
        "record": record,
        "room": room,
        "events": events,
        "more": more,
    }
