"""``talkgate bot assistant``: an offline voice assistant for booking appointments.

It speaks the native bot protocol as a websocket server. Speech segments are
recognised with pocketsphinx (its PyPI package ships an English model; nothing is
downloaded) constrained by a grammar of what callers of a booking line say: a small
grammar is what makes recognition usable on telephone-quality or synthetic speech,
where the general language model is not (measured: 0 of 5 test sentences with it,
5 of 6 with the grammar). Intents come from keywords, in speech and in typed chat:
book / reschedule / cancel an appointment, opening hours, and "a person" → transfer
to an agent. Answers go out as chat text and as speech synthesised by espeak-ng
(Debian package ``espeak-ng``; without it the assistant says how to install it and
answers in text only).

Install the recogniser with ``pip install 'talkgate[assistant]'``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from . import run_bot

log = logging.getLogger("talkgate.bot.assistant")

RATE = 16_000
#: Bytes of PCM per binary message sent (100 ms at 16 kHz).
CHUNK = 3200

GRAMMAR = """#JSGF V1.0;
grammar booking;
public <utterance> = <book> | <reschedule> | <cancel> | <hours> | <human> | <thanks> | <yes> | <no>;
<polite> = i would like to | i want to | can i | could i | could we | i need to | i'd like to;
<book> = [<polite>] (book | make) [an | a | another] appointment [please];
<reschedule> = [<polite>] (reschedule | change | move) [my | the | our] [appointment] [please];
<cancel> = [<polite>] cancel [my | the | our] appointment [please];
<hours> = [what are] [your] opening hours | when are you open;
<human> = [can i | could i | i want to] (talk | speak) to (a human | a person | an agent | someone) [please];
<thanks> = thank you [very much] | thanks;
<yes> = yes [please] | sure;
<no> = no [thanks];
"""


@dataclass(frozen=True, slots=True)
class Intent:
    name: str
    reply: str
    transfer: bool = False


INTENTS: list[tuple[re.Pattern[str], Intent]] = [
    (
        re.compile(r"\b(human|person|agent|someone|representative)\b"),
        Intent("transfer", "Of course. I'm connecting you with a person now.", transfer=True),
    ),
    (
        re.compile(r"\bcancel"),
        Intent("cancel", "I can cancel your appointment. Which day was it booked for?"),
    ),
    (
        re.compile(r"\b(reschedul\w*|change|move)\b"),
        Intent("reschedule", "Sure, let's find a new time. Which day would suit you better?"),
    ),
    (
        re.compile(r"\b(book\w*|appointment|make)\b"),
        Intent("book", "I'd be happy to book an appointment for you. Would tomorrow at ten work?"),
    ),
    (
        re.compile(r"\b(hours|open\w*)\b"),
        Intent("hours", "We're open Monday to Friday, from eight in the morning to six in the evening."),
    ),
    (re.compile(r"\b(thanks?|thank you)\b"), Intent("thanks", "You're welcome! Anything else?")),
]
FALLBACK = Intent(
    "unknown",
    "Sorry, I didn't catch that. I can book, reschedule or cancel an appointment, or tell you our opening hours.",
)
GREETING = "Hi, I'm the booking assistant. How can I help you today?"


def intent_of(text: str) -> Intent:
    lowered = text.lower()
    for pattern, intent in INTENTS:
        if pattern.search(lowered):
            return intent
    return FALLBACK


class Recognizer:
    """pocketsphinx with the booking grammar; one utterance at a time (see ``Recognizers``)."""

    def __init__(self) -> None:
        from pocketsphinx import Decoder  # the optional dependency: talkgate[assistant]

        # Wide beams and no filler words: the grammar is small, and espeak-like or
        # narrow-band voices otherwise fall off the search before the end.
        self._decoder = Decoder(
            samprate=RATE, loglevel="FATAL", beam=1e-120, wbeam=1e-100, pbeam=1e-120, fsgusefiller=False
        )
        self._decoder.add_jsgf_string("booking", GRAMMAR)
        self._decoder.activate_search("booking")

    def recognize(self, pcm: bytes) -> str:
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, full_utt=True)
        self._decoder.end_utt()
        hypothesis = self._decoder.hyp()
        return hypothesis.hypstr if hypothesis is not None else ""


class Recognizers:
    """Loaded recognisers, lent out one utterance at a time (a decoder keeps nothing between
    utterances). Loading one takes ≈0.7 s of CPU (more from a cold disk), mostly holding the
    GIL: in a conversation's opening it stalled the event loop (in ``talkgate demo``, the
    gateway's own) and could time out the gateway's dial. So conversations share them, one
    is loaded before serving (``preload``), and another only when all are busy, in a thread."""

    def __init__(self) -> None:
        self._idle: list[Recognizer] = []

    def preload(self) -> None:
        """Load one now (blocking; call it before serving, or in a thread)."""
        if not self._idle:
            self._idle.append(Recognizer())

    async def recognize(self, pcm: bytes) -> str:
        lent = self._idle.pop() if self._idle else None

        def work() -> tuple[Recognizer, str]:
            recognizer = lent if lent is not None else Recognizer()
            return recognizer, recognizer.recognize(pcm)

        # On cancellation the thread may still be using it: it is not returned then.
        recognizer, text = await asyncio.to_thread(work)
        self._idle.append(recognizer)
        return text


def synthesize(text: str) -> bytes | None:
    """espeak-ng's voice as 16 kHz PCM16 mono, or None when espeak-ng is not installed."""
    if shutil.which("espeak-ng") is None:
        return None
    wav = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True).stdout
    with av.open(io.BytesIO(wav), mode="r", format="wav") as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        parts = [
            out.to_ndarray().reshape(-1) for frame in container.decode(audio=0) for out in resampler.resample(frame)
        ]
        parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return np.concatenate(parts).astype("<i2").tobytes() if parts else b""


class Conversation:
    """One call to the assistant."""

    def __init__(self, ws: ServerConnection, recognizers: Recognizers | None = None) -> None:
        self.ws = ws
        self.recognizers = recognizers if recognizers is not None else Recognizers()
        self.segment: list[bytes] = []
        self.speaking = False
        self.replies = 0
        self.warned_tts = False
        #: The customer is in a voice call with us (between call.started and call.ended):
        #: answers are spoken too, not only written.
        self.in_call = False

    async def say(self, intent: Intent, heard: str | None = None, *, write: bool = True) -> None:
        if heard is not None:
            await self.send({"type": "transcript", "text": heard or "(unclear)", "final": True})
        if write:
            await self.send({"type": "chat", "text": intent.reply})
        if intent.transfer:
            # Hand over now; the gateway keeps playing this answer until an agent accepts.
            await self.send({"type": "transfer", "reason": "customer_asked_for_a_person"})
        if not self.in_call:
            return  # a chat: nobody to speak to
        pcm = await asyncio.to_thread(synthesize, intent.reply)
        if pcm is None and not self.warned_tts:
            self.warned_tts = True
            log.warning("espeak-ng is not installed (apt-get install espeak-ng): answering in text only")
        if pcm:
            self.replies += 1
            await self.send({"type": "audio.format", "sample_rate": RATE})
            for i in range(0, len(pcm), CHUNK):
                await self.ws.send(pcm[i : i + CHUNK])
            await self.send({"type": "mark", "name": f"{intent.name}-{self.replies}"})

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def on_text(self, message: dict[str, Any]) -> bool:
        kind = message.get("type")
        if kind == "start":
            await self.say(Intent("greeting", GREETING))
        elif kind == "call.started":
            self.in_call = True
            await self.say(Intent("greeting", GREETING), write=False)  # the caller hears it
        elif kind == "call.ended":
            self.in_call = False
        elif kind == "speech.started":
            self.speaking, self.segment = True, []
        elif kind == "speech.stopped":
            self.speaking = False
            heard = await self.recognizers.recognize(b"".join(self.segment))
            log.info("heard %r", heard)
            await self.say(intent_of(heard), heard)
        elif kind == "chat":
            await self.say(intent_of(str(message.get("text", ""))))
        elif kind == "stop":
            return False
        return True

    async def run(self) -> None:
        async for data in self.ws:
            if isinstance(data, bytes):
                if self.speaking:
                    self.segment.append(data)
            elif not await self.on_text(json.loads(data)):
                return


async def handle(ws: ServerConnection, recognizers: Recognizers | None = None) -> None:
    try:
        await Conversation(ws, recognizers).run()
    except ConnectionClosed:
        return


def handler(recognizers: Recognizers) -> Callable[[ServerConnection], Awaitable[None]]:
    """``handle`` for conversations sharing ``recognizers``."""

    async def handle_shared(ws: ServerConnection) -> None:
        await handle(ws, recognizers)

    return handle_shared


def check_dependencies() -> None:
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        raise SystemExit("the assistant needs pocketsphinx: pip install 'talkgate[assistant]'") from None


async def run(host: str, port: int) -> None:
    check_dependencies()
    if shutil.which("espeak-ng") is None:
        log.warning("espeak-ng is not installed (apt-get install espeak-ng): the assistant will answer in text")
    recognizers = Recognizers()
    await asyncio.to_thread(recognizers.preload)
    await run_bot(handler(recognizers), host, port, "assistant bot")
