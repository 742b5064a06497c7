"""The server API's request and response bodies (gateway/api.py): msgspec structs.

Requests refuse unknown fields and bound every size; responses document what the
handlers return (the OpenAPI document's schemas are generated from these).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from . import tokens
from .errors import BadRequest

#: Join tokens the API mints live at most this long (a day).
MAX_TOKEN_TTL = 86_400

Field = Annotated[str, msgspec.Meta(min_length=1, max_length=tokens.MAX_FIELD_CHARS)]


class TokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["customer", "agent"]
    identity: Field
    name: Field | None = None
    #: Required for a customer; an agent's token may name a room to enter.
    room: Field | None = None
    #: What the app says about a customer (kept in the records; at most 4 KiB as JSON).
    profile: dict[str, Any] | None = None
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKEN_TTL)] = 3600


class TokenResponse(msgspec.Struct):
    token: str
    #: The customer page (``/?token=``) or the agent console (``/agent?token=``).
    url: str
    #: Unix seconds.
    expires: int


class MessageRequest(msgspec.Struct, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(min_length=1)]
    #: Recorded with the message (a ``meta`` event), never shown to participants.
    meta: dict[str, Any] | None = None
    #: Nobody is in the conversation: start it (or continue its open record) for this known
    #: customer, who finds the message when they join (default: the room's last customer).
    customer: Field | None = None


class EscalateRequest(msgspec.Struct, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = "app_request"


class ProfileRequest(msgspec.Struct, forbid_unknown_fields=True):
    profile: dict[str, Any]
    name: Field | None = None


class Problem(msgspec.Struct):
    type: str
    title: str
    status: int
    detail: str
    code: str


class ParticipantBody(msgspec.Struct):
    identity: str
    role: str
    name: str


class ConversationBody(msgspec.Struct):
    id: str
    room: str
    state: Literal["open", "closed"]
    customer: str | None
    opened: int
    closed: int | None
    ended: str | None
    channels: list[str]
    bot: str | None
    agents: list[Any]
    #: Who is in it now (the live state; empty once closed). Only in ``GET .../{id}``.
    participants: list[ParticipantBody] | None = None


class ConversationPage(msgspec.Struct):
    conversations: list[ConversationBody]
    #: Pass as ``cursor`` for the next page; None: this was the last.
    next: str | None


class TimelineEventBody(msgspec.Struct):
    """As in a ``history`` page (docs/protocol.md#history): the body's fields flattened
    beside these (a chat's ``text``, its message id as ``ref``, ...)."""

    id: int
    ts: int
    type: str
    #: Who did it (None: the gateway or the app).
    from_: ParticipantBody | None = msgspec.field(name="from")


class EventPage(msgspec.Struct):
    conversation: str
    events: list[TimelineEventBody]
    #: Pass as ``after`` for the next page; None: this was the last.
    next: int | None


class MessageBody(msgspec.Struct):
    """The ``chat`` message the participants got (or will find when they join)."""

    type: Literal["chat"]
    id: str
    conversation: str
    text: str
    ts: int
    #: ``{"identity": "system", "role": "system", "name": ...}``
    from_: ParticipantBody = msgspec.field(name="from")
    #: Someone was in the conversation and got it (false: recorded for the customer's next join).
    live: bool = True


class QueueBody(msgspec.Struct):
    type: Literal["queue"]
    waiting: list[dict[str, Any]]


class CustomerBody(msgspec.Struct):
    identity: str
    name: str
    profile: dict[str, Any] | None
    first_seen: int
    last_seen: int


class ErasedBody(msgspec.Struct):
    customers: int
    conversations: int
    events: int
    events_elsewhere: int
    #: The call recordings the erased records listed (their conversations' calls, their voice
    #: elsewhere), relative to the ``--record`` directory: deleted from this gateway's, and
    #: named so that copies elsewhere (archived from ``recording.saved`` webhooks) can go too.
    recordings: list[str]


class DeliveryBody(msgspec.Struct):
    """One webhook outbox row: one event for one endpoint (docs/api.md#webhooks)."""

    id: int
    endpoint: str
    msg_id: str
    type: str
    conversation: str | None
    created: int
    payload: dict[str, Any]
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt: int
    last_error: str | None
    delivered: int | None


class DeliveryPage(msgspec.Struct):
    deliveries: list[DeliveryBody]
    #: Pass as ``after`` for the next page; None: this was the last.
    next: int | None


class Done(msgspec.Struct):
    conversation: str
    #: ``close``: ``closed``; ``escalate``: ``queued``.
    status: str


_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def decode(body: bytes, kind: type[Any]) -> Any:
    """A request body as ``kind``; ``BadRequest`` (400) for anything else."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(body or b"{}")
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
