"""talkgate's exception hierarchy.

Every error a client can cause maps to exactly one protocol error code, and the
mapping lives here, on the classes, so no handler invents its own codes::

    TalkgateError
    ├── ConfigError              bad server configuration (CLI exits with it)
    └── ProtocolError            sent to the client as {"type":"error",...}
        ├── BadRequest           bad_request: not JSON, unknown type, bad field
        │   └── CallFailed       bad_request, and the sender's call had to be ended
        ├── Unauthorized         unauthorized: missing, bad or expired token
        ├── Forbidden            forbidden: the role may not do that
        ├── NotFound             not_found: no such conversation / queue entry
        ├── TooLarge             too_large: frame or field over its limit
        ├── RateLimited          rate_limited: too many messages per second
        ├── Conflict             conflict: lost a race, or replaced by a new join
        ├── Unavailable          unavailable: a capacity limit is reached; try again later
        └── InternalError        internal: a bug on our side; details are logged

A ``ProtocolError`` never closes the connection by itself; the session decides
that (only when the client cannot be served at all, e.g. a refused join).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class TalkgateError(Exception):
    """Base class of every error talkgate raises on purpose."""


class ConfigError(TalkgateError):
    """The server cannot start with this configuration."""


class ProtocolError(TalkgateError):
    """An error reported to the client that caused it."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ProtocolError):
    code = ErrorCode.BAD_REQUEST


class CallFailed(BadRequest):
    """An offer that was applied but could not be answered: the peer connection is left
    half-negotiated, so the call ends (the client may offer again on a fresh one)."""


class Unauthorized(ProtocolError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(ProtocolError):
    code = ErrorCode.FORBIDDEN


class NotFound(ProtocolError):
    code = ErrorCode.NOT_FOUND


class TooLarge(ProtocolError):
    code = ErrorCode.TOO_LARGE


class RateLimited(ProtocolError):
    code = ErrorCode.RATE_LIMITED


class Conflict(ProtocolError):
    code = ErrorCode.CONFLICT


class Unavailable(ProtocolError):
    code = ErrorCode.UNAVAILABLE


class InternalError(ProtocolError):
    code = ErrorCode.INTERNAL
