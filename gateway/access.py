"""Who may act as whom: join authorisation, reserved identities, close codes.

A join is authorised by its token (always) or, on a ``--dev`` server only, by the
fields it names. Identities the gateway uses itself (``bot``, ``system``) are
refused in both, so nobody can impersonate the bot or the gateway. How a refused
join's connection is closed is decided here, once, and so is who may read which
recorded conversation (``history``).
"""

from __future__ import annotations

from collections.abc import Collection

from . import messages, tokens
from .config import Config
from .errors import BadRequest, Forbidden, ProtocolError, TooLarge, Unauthorized, Unavailable
from .messages import Role

#: WebSocket close codes (documented in docs/protocol.md).
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_JOIN_TIMEOUT = 4408
CLOSE_REPLACED = 4409
#: 1013 Try Again Later: a client that fell behind, or a join refused for capacity.
CLOSE_TRY_LATER = 1013

#: How a refused join's connection is closed: 1013 (try again later) when the gateway is full.
_REFUSED_JOIN_CLOSE: dict[type[ProtocolError], int] = {
    Unauthorized: CLOSE_UNAUTHORIZED,
    Forbidden: CLOSE_FORBIDDEN,
    Unavailable: CLOSE_TRY_LATER,
}

RESERVED_IDENTITIES = tokens.RESERVED_IDENTITIES


def refused_join_close(exc: ProtocolError) -> int | None:
    """The close code for a join refused with ``exc``; None: the connection stays open."""
    return next((code for kind, code in _REFUSED_JOIN_CLOSE.items() if isinstance(exc, kind)), None)


def authorize(config: Config, msg: messages.Join) -> tokens.Grant:
    """Who this join may act as: from its token, or (dev mode only) from its fields."""
    if msg.token is not None:
        grant = tokens.verify(config.token_secret, msg.token)
        if msg.room is not None and msg.room != grant.room:
            raise Forbidden("this token does not grant that room")
        return grant
    if not config.dev:
        raise Unauthorized("a join token is required")
    identity = field(msg.identity, "identity")
    if identity in RESERVED_IDENTITIES:
        raise Forbidden(f"the identity {identity!r} is reserved for the gateway")
    role = msg.role or Role.CUSTOMER.value
    if role not in (Role.CUSTOMER, Role.AGENT):
        raise BadRequest("role must be 'customer' or 'agent'")
    room = None if msg.room is None else field(msg.room, "room")
    if role == Role.CUSTOMER and room is None:
        raise BadRequest("a customer join needs a room")
    name = identity if msg.name is None else field(msg.name, "name")
    return tokens.Grant(identity=identity, role=Role(role), room=room, name=name)


def may_read_record(
    me: messages.Participant, customer: str | None, *, present: bool, serving: Collection[str] = ()
) -> bool:
    """Whether ``me`` may page through a conversation record whose customer is ``customer``:
    anyone the conversation they are in now (``present``); a customer its own conversations;
    an agent those of the customers it is serving (``serving``: the customers of its
    conversations and of the queue, whose cards it sees)."""
    if present:
        return True
    if customer is None:
        return False
    if me.role == Role.CUSTOMER:
        return customer == me.identity
    return me.role == Role.AGENT and customer in serving


def field(value: str | None, name: str) -> str:
    if value is None or not value.strip():
        raise BadRequest(f"join needs a non-empty '{name}'")
    if len(value) > tokens.MAX_FIELD_CHARS:
        raise TooLarge(f"'{name}' is longer than {tokens.MAX_FIELD_CHARS} characters")
    if not value.isprintable():
        raise BadRequest(f"'{name}' contains control characters")
    return value
