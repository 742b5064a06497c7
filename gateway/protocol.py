"""Sans-I/O signaling protocol: frames in, client messages or errors out.

``SignalingProtocol`` holds everything about one client connection that does
not need a socket: the join state machine, the frame size limit, the rate
limit and message parsing. The session feeds it each frame with the current
time and gets back either a decoded message or a ``ProtocolError`` to send;
it never raises into the I/O layer, so tests drive it with plain bytes.
"""

from __future__ import annotations

import enum

import msgspec

from . import messages
from .errors import BadRequest, ProtocolError, RateLimited, TooLarge, Unauthorized


class State(enum.Enum):
    #: Connected, no successful join yet: only ``join`` and ``ping`` are served.
    AWAITING_JOIN = "awaiting_join"
    #: Joined (a conversation, or the agent lobby).
    JOINED = "joined"
    #: The connection is closing or closed; frames are ignored.
    CLOSED = "closed"


class TokenBucket:
    """Allow ``rate`` events per second on average, ``burst`` at once."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


_PRE_JOIN = (messages.Join, messages.Ping)


class SignalingProtocol:
    def __init__(self, *, max_message_bytes: int, rate: float, burst: int, now: float) -> None:
        self.state = State.AWAITING_JOIN
        self.max_message_bytes = max_message_bytes
        #: Limits how fast one client can make the gateway work for it.
        self.bucket = TokenBucket(rate, burst, now)

    def receive(self, data: bytes | str, now: float) -> messages.ClientMessage | ProtocolError | None:
        """Parse one frame. Returns the message, the error to report, or None once closed."""
        if self.state is State.CLOSED:
            return None
        if not self.bucket.take(now):
            return RateLimited("too many messages; slow down")
        if len(data) > self.max_message_bytes:
            return TooLarge(f"message is {len(data)} bytes; the limit is {self.max_message_bytes}")
        try:
            message = messages.decode(data)
        except msgspec.ValidationError as exc:
            return BadRequest(_describe(exc, data))
        except msgspec.DecodeError as exc:
            return BadRequest(f"not valid JSON: {exc}")
        except UnicodeDecodeError:
            # A binary frame (websockets checks text frames) with bad UTF-8 in a string.
            return BadRequest("not valid UTF-8")
        if self.state is State.AWAITING_JOIN and not isinstance(message, _PRE_JOIN):
            return Unauthorized("the first message must be a join")
        if self.state is State.JOINED and isinstance(message, messages.Join):
            return BadRequest("already joined; open a new connection to join again")
        return message

    def joined(self) -> None:
        if self.state is State.AWAITING_JOIN:
            self.state = State.JOINED

    def left(self) -> None:
        """Back to awaiting a join (a customer who left may join again)."""
        if self.state is State.JOINED:
            self.state = State.AWAITING_JOIN

    def close(self) -> None:
        self.state = State.CLOSED


def _describe(exc: msgspec.ValidationError, data: bytes | str) -> str:
    """Turn msgspec's message into one a client developer can act on."""
    text = str(exc)
    if text.startswith("Invalid value") and text.endswith("`$.type`"):
        try:
            kind = msgspec.json.decode(data).get("type")
        except (msgspec.DecodeError, UnicodeDecodeError, AttributeError):
            kind = None
        if isinstance(kind, str) and len(kind) > 40:
            kind = kind[:40] + "…"
        return f"unknown message type {kind!r}; expected one of {', '.join(messages.CLIENT_TYPES)}"
    if text == "Object missing required field `type`":
        return "message has no 'type' field"
    if text.startswith("Expected `object`"):
        return "a message must be a JSON object with a 'type' field"
    return text
