"""Twilio Media Streams compatibility (``--bot-protocol twilio``), field for field.

Bots written for Twilio's bidirectional Media Streams work unchanged: the gateway sends
``connected`` when the link opens and, as Twilio does with the answered call, a stream
per voice call of the customer: ``start`` when the call begins (a new ``streamSid``
each time), ``stop`` when it ends; a chat-only conversation has no stream. ``start``
has ``streamSid``, ``callSid`` = conversation id, ``tracks:
["inbound"]``, ``customParameters`` with the customer's identity and name,
``mediaFormat`` μ-law 8 kHz mono), ``media`` every 20 ms (base64 μ-law of the customer's
continuous audio, as Twilio sends it, not VAD-gated; ``track``, ``chunk``,
``timestamp``), ``mark`` echoes and ``stop``, every one with a string
``sequenceNumber``. It accepts ``media`` (played to the customer), ``mark`` and
``clear``; as Twilio does, a ``clear`` sends back the marks it dropped.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from typing import Any

from media.g711 import ulaw_decode, ulaw_encode

from ..messages import Participant
from .native import Action, Audio, BotMark, BotProtocolError, Clear, Outgoing

RATE = 8_000


class TwilioProtocol:
    name = "twilio"
    continuous_rate: int | None = RATE

    def __init__(self, conversation: str, customer: Participant, sample_rate: int, frame_ms: int) -> None:
        self.conversation = conversation
        self.customer = customer
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.account_sid = "AC" + secrets.token_hex(16)
        self._sequence = 0
        self._chunk = 0
        self._first_t: int | None = None
        #: A stream is open (the customer is in a voice call with the bot).
        self.streaming = False

    def _next(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    def _event(self, event: str, body: dict[str, Any] | None = None, **extra: Any) -> str:
        message: dict[str, Any] = {"event": event, "sequenceNumber": self._next(), **extra}
        if body is not None:
            message[event] = body
        message["streamSid"] = self.stream_sid
        return json.dumps(message, separators=(",", ":"))

    def opening(self) -> Outgoing:
        return [json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})]

    def call_started(self) -> Outgoing:
        """A new stream: its own ``streamSid``, sequence numbers, chunks and timestamps."""
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self._sequence = 0
        self._chunk = 0
        self._first_t = None
        self.streaming = True
        start = self._event(
            "start",
            {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.conversation,
                "tracks": ["inbound"],
                "customParameters": {"identity": self.customer.identity, "name": self.customer.name},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
            },
        )
        return [start]

    def call_ended(self, reason: str) -> Outgoing:
        if not self.streaming:
            return []
        self.streaming = False
        return [self._event("stop", {"accountSid": self.account_sid, "callSid": self.conversation})]

    # Twilio streams continuous audio: speech segments are not sent as such.
    def speech_started(self, t: int) -> Outgoing:
        return []

    def speech_frame(self, pcm: bytes) -> Outgoing:
        return []

    def speech_paused(self, t: int) -> Outgoing:
        return []

    def speech_stopped(self, t: int, duration: int) -> Outgoing:
        return []

    def audio(self, pcm: bytes, t: int) -> Outgoing:
        if not self.streaming:
            return []
        if self._first_t is None:
            self._first_t = t
        self._chunk += 1
        media = {
            "track": "inbound",
            "chunk": str(self._chunk),
            "timestamp": str(t - self._first_t),
            "payload": base64.b64encode(ulaw_encode(pcm)).decode(),
        }
        return [self._event("media", media)]

    def chat(self, message: dict[str, Any]) -> Outgoing:
        return []  # Media Streams carry no chat

    def mark(self, name: str) -> Outgoing:
        return [self._event("mark", {"name": name})]

    def interrupted(self, marks: list[str], heard_ms: int) -> Outgoing:
        # The gateway cleared the bot's audio (barge-in), as a Twilio clear would: echo the marks.
        return self.cleared(marks)

    def cleared(self, marks: list[str]) -> Outgoing:
        return [self._event("mark", {"name": name}) for name in marks]

    def stop(self, reason: str) -> Outgoing:
        return self.call_ended(reason)  # the link closes after it; without a stream, nothing to say

    def error(self, code: str, message: str) -> Outgoing:
        return []  # Twilio sends no errors on the stream; the gateway logs them

    def parse(self, data: str | bytes) -> Action:
        if isinstance(data, bytes):
            raise BotProtocolError("Twilio Media Streams messages are JSON text")
        try:
            message = json.loads(data)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack
            raise BotProtocolError("not JSON") from exc
        if not isinstance(message, dict):
            raise BotProtocolError("a message must be a JSON object")
        event = message.get("event")
        if event == "media":
            media = message.get("media")
            payload = media.get("payload") if isinstance(media, dict) else None
            if not isinstance(payload, str):
                raise BotProtocolError("media without a payload")
            try:
                return Audio(ulaw_decode(base64.b64decode(payload, validate=True)), RATE)
            except binascii.Error as exc:
                raise BotProtocolError("media payload is not base64") from exc
        if event == "mark":
            mark = message.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if not isinstance(name, str) or not name:
                raise BotProtocolError("mark without a name")
            return BotMark(name=name)
        if event == "clear":
            return Clear()
        raise BotProtocolError(f"unsupported event {str(event)[:40]!r}")
