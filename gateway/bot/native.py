"""The native bot protocol (docs/bot-protocol.md): message types and parsing, no I/O.

Gateway → bot: JSON text messages (start, chat, speech.started, speech.stopped, mark,
interrupted, stop, error) and binary frames of raw PCM16 LE mono, one VAD frame each.
Bot → gateway: JSON text messages (chat, audio.format, mark, clear, transcript,
transfer, upgrade, hangup) and binary frames of PCM16 mono at the announced rate, or
one Opus packet each (``audio.format`` with ``encoding`` ``opus``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec

from ..messages import Participant

AUDIO_RATES = (8_000, 16_000, 24_000, 48_000)


class _BotMsg(msgspec.Struct, tag_field="type", forbid_unknown_fields=False):
    pass


class BotChat(_BotMsg, tag="chat"):
    text: str


class AudioFormat(_BotMsg, tag="audio.format"):
    #: ``pcm_s16le`` (default) or ``opus``: one Opus packet per binary message, sent to
    #: the customer as it is (no encode at the gateway).
    encoding: Literal["pcm_s16le", "opus"] = "pcm_s16le"
    #: PCM's rate (default 16000); Opus is 48000 (its RTP clock), the default for it.
    sample_rate: int | None = None

    @property
    def rate(self) -> int:
        return self.sample_rate or (48_000 if self.encoding == "opus" else 16_000)


class BotMark(_BotMsg, tag="mark"):
    name: str


class Clear(_BotMsg, tag="clear"):
    pass


class Transcript(_BotMsg, tag="transcript"):
    text: str
    final: bool = True
    #: Whose words: what the bot heard the customer say (the default), or its own speech.
    speaker: Literal["customer", "bot"] = "customer"


class Transfer(_BotMsg, tag="transfer"):
    reason: str = "bot_transfer"


class BotUpgrade(_BotMsg, tag="upgrade"):
    media: Literal["audio", "video"]


class Hangup(_BotMsg, tag="hangup"):
    pass


BotMessage = BotChat | AudioFormat | BotMark | Clear | Transcript | Transfer | BotUpgrade | Hangup
_decoder: msgspec.json.Decoder[BotMessage] = msgspec.json.Decoder(BotMessage)
_encoder = msgspec.json.Encoder()


class BotProtocolError(ValueError):
    """A bot message that cannot be used (logged and counted; the conversation goes on)."""


def parse(data: str | bytes) -> BotMessage:
    try:
        message = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BotProtocolError(str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise BotProtocolError("not valid UTF-8") from exc
    if isinstance(message, AudioFormat):
        if message.encoding == "opus" and message.rate != 48_000:
            raise BotProtocolError("Opus is 48000 Hz (its RTP clock)")
        if message.rate not in AUDIO_RATES:
            raise BotProtocolError(f"sample_rate must be one of {AUDIO_RATES}")
    if isinstance(message, BotChat | Transcript) and not 0 < len(message.text) <= 4096:
        raise BotProtocolError("text must be 1 to 4096 characters")
    return message


def encode(message: dict[str, Any]) -> str:
    return _encoder.encode(message).decode()


def start(
    conversation: str, customer: Participant, sample_rate: int, frame_ms: int, card: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``card``: what the records know of the customer (profile, earlier conversations)."""
    return {
        "type": "start",
        "conversation": conversation,
        "customer": {**(card or {}), "identity": customer.identity, "name": customer.name},
        "audio": {"encoding": "pcm_s16le", "sample_rate": sample_rate, "channels": 1, "frame_ms": frame_ms},
    }


# -- the adapter the connector drives ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Audio:
    """Bot audio to play: PCM16 mono at ``sample_rate`` (None: the announced rate), or one
    Opus packet after ``audio.format`` said ``opus`` (the connector knows which)."""

    pcm: bytes
    sample_rate: int | None = None


Action = BotMessage | Audio
Outgoing = list[str | bytes]


class BotProtocol(Protocol):
    """How the connector's events become messages for one kind of bot, and back."""

    name: str
    continuous_rate: int | None

    def opening(self) -> Outgoing: ...
    def call_started(self) -> Outgoing: ...
    def call_ended(self, reason: str) -> Outgoing: ...
    def speech_started(self, t: int) -> Outgoing: ...
    def speech_frame(self, pcm: bytes) -> Outgoing: ...
    def speech_paused(self, t: int) -> Outgoing: ...
    def speech_stopped(self, t: int, duration: int) -> Outgoing: ...
    def audio(self, pcm: bytes, t: int) -> Outgoing: ...
    def chat(self, message: dict[str, Any]) -> Outgoing: ...
    def mark(self, name: str) -> Outgoing: ...
    def interrupted(self, marks: list[str], heard_ms: int) -> Outgoing: ...
    def cleared(self, marks: list[str]) -> Outgoing: ...
    def stop(self, reason: str) -> Outgoing: ...
    def error(self, code: str, message: str) -> Outgoing: ...
    def parse(self, data: str | bytes) -> Action: ...


class NativeProtocol:
    """talkgate's own bot protocol: VAD-gated speech segments, binary PCM both ways."""

    name = "native"
    #: Continuous audio rate wanted by the protocol (None: speech segments only).
    continuous_rate: int | None = None

    def __init__(
        self,
        conversation: str,
        customer: Participant,
        sample_rate: int,
        frame_ms: int,
        card: dict[str, Any] | None = None,
        *,
        message_ms: int | None = None,
    ) -> None:
        """``message_ms`` (a multiple of ``frame_ms``, default ``frame_ms``): the speech per
        binary message, announced as the start's ``frame_ms``; frames wait until one is full,
        and go out before any control message that follows them."""
        message_ms = message_ms or frame_ms
        if message_ms % frame_ms:
            raise ValueError("message_ms must be a multiple of frame_ms")
        self._start = encode(start(conversation, customer, sample_rate, message_ms, card))
        self._per_message = message_ms // frame_ms
        self._waiting: list[bytes] = []

    def _take_waiting(self) -> Outgoing:
        """The speech that waits for a full message, as one message (none if none waits)."""
        if not self._waiting:
            return []
        pcm = b"".join(self._waiting)
        self._waiting.clear()
        return [pcm]

    def _flushed(self, message: str) -> Outgoing:
        """The speech that waits (if any), then ``message``."""
        return [*self._take_waiting(), message]

    def opening(self) -> Outgoing:
        return [self._start]

    def call_started(self) -> Outgoing:
        return [encode({"type": "call.started"})]

    def call_ended(self, reason: str) -> Outgoing:
        return self._flushed(encode({"type": "call.ended", "reason": reason}))

    def speech_started(self, t: int) -> Outgoing:
        return self._flushed(encode({"type": "speech.started", "t": t}))

    def speech_frame(self, pcm: bytes) -> Outgoing:
        if self._per_message == 1:
            return [pcm]
        self._waiting.append(pcm)
        return self._take_waiting() if len(self._waiting) == self._per_message else []

    def speech_paused(self, t: int) -> Outgoing:
        return self._flushed(encode({"type": "speech.paused", "t": t}))

    def speech_stopped(self, t: int, duration: int) -> Outgoing:
        return self._flushed(encode({"type": "speech.stopped", "t": t, "duration_ms": duration}))

    def audio(self, pcm: bytes, t: int) -> Outgoing:
        return []

    def chat(self, message: dict[str, Any]) -> Outgoing:
        return [encode(message)]

    def mark(self, name: str) -> Outgoing:
        return [encode({"type": "mark", "name": name})]

    def interrupted(self, marks: list[str], heard_ms: int) -> Outgoing:
        return [encode({"type": "interrupted", "marks": marks, "heard_ms": heard_ms})]

    def cleared(self, marks: list[str]) -> Outgoing:
        return []  # the bot asked for it; nothing to report

    def stop(self, reason: str) -> Outgoing:
        return [encode({"type": "stop", "reason": reason})]

    def error(self, code: str, message: str) -> Outgoing:
        return [encode({"type": "error", "code": code, "message": message})]

    def parse(self, data: str | bytes) -> Action:
        if isinstance(data, bytes):
            return Audio(data)  # PCM16 or an Opus packet, as the announced format says
        return parse(data)
