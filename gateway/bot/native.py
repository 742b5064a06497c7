"""The native bot protocol (docs/bot-protocol.md): message types and parsing, no I/O.

Gateway → bot: JSON text messages (start, chat, speech.started, speech.stopped, mark,
interrupted, stop, error) and binary frames of raw PCM16 LE mono, one VAD frame each.
Bot → gateway: JSON text messages (chat, audio.format, mark, clear, transcript,
transfer, upgrade, hangup) and binary frames of PCM16 mono at the announced rate.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from ..messages import Participant

AUDIO_RATES = (8_000, 16_000, 24_000, 48_000)


class _BotMsg(msgspec.Struct, tag_field="type", forbid_unknown_fields=False):
    pass


class BotChat(_BotMsg, tag="chat"):
    text: str


class AudioFormat(_BotMsg, tag="audio.format"):
    sample_rate: int = 16_000


class BotMark(_BotMsg, tag="mark"):
    name: str


class Clear(_BotMsg, tag="clear"):
    pass


class Transcript(_BotMsg, tag="transcript"):
    text: str
    final: bool = True


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
        raise BotProtocolError(str(exc)) from None
    if isinstance(message, AudioFormat) and message.sample_rate not in AUDIO_RATES:
        raise BotProtocolError(f"sample_rate must be one of {AUDIO_RATES}")
    if isinstance(message, BotChat | Transcript) and not 0 < len(message.text) <= 4096:
        raise BotProtocolError("text must be 1 to 4096 characters")
    return message


def encode(message: dict[str, Any]) -> str:
    return _encoder.encode(message).decode()


def start(conversation: str, customer: Participant, sample_rate: int, frame_ms: int) -> dict[str, Any]:
    return {
        "type": "start",
        "conversation": conversation,
        "customer": {"identity": customer.identity, "name": customer.name},
        "audio": {"encoding": "pcm_s16le", "sample_rate": sample_rate, "channels": 1, "frame_ms": frame_ms},
    }
