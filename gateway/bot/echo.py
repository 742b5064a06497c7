"""``talkgate bot echo``: a reference bot that repeats each speech segment back as audio.

It speaks the native protocol (docs/bot-protocol.md) as a websocket server, and is
what tests and benchmarks use as a bot: every finished speech segment is sent back
at once as binary PCM at 16 kHz (faster than real time, as TTS engines do) followed
by a mark; chat is answered with "You said: …".

With ``opus=True`` (``talkgate bot echo --opus``) it answers as a bot whose TTS speaks
Opus: ``audio.format`` ``opus``, then one 20 ms Opus packet per message (encoded here,
with libopus's DTX, so its silence costs one byte a frame), which the gateway sends on
unencoded.
"""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from media import opus as libopus

from . import BotHandler, run_bot

log = logging.getLogger("talkgate.bot.echo")

#: Bytes per binary message sent back (100 ms of 16 kHz PCM16).
CHUNK = 3200


async def handle(ws: ServerConnection, *, opus: bool = False) -> None:
    segment: list[bytes] = []
    encoder: libopus.Encoder | None = None
    speaking = False
    replies = 0
    try:
        async for data in ws:
            if isinstance(data, bytes):
                if speaking:
                    segment.append(data)
                continue
            message = json.loads(data)
            kind = message.get("type")
            if kind == "start":
                rate = message["audio"]["sample_rate"]
                if opus:
                    encoder = libopus.Encoder(rate, dtx=True)
                    await ws.send(json.dumps({"type": "audio.format", "encoding": "opus"}))
                else:
                    await ws.send(json.dumps({"type": "audio.format", "sample_rate": rate}))
                log.info("conversation %s started", message.get("conversation"))
            elif kind == "speech.started":
                speaking, segment = True, []
            elif kind == "speech.stopped":
                speaking = False
                replies += 1
                audio = b"".join(segment)
                if encoder is not None:
                    pcm = np.frombuffer(audio, dtype="<i2")
                    for i in range(0, len(pcm) - encoder.samples + 1, encoder.samples):
                        await ws.send(encoder.encode(pcm[i : i + encoder.samples]))
                else:
                    for i in range(0, len(audio), CHUNK):
                        await ws.send(audio[i : i + CHUNK])
                await ws.send(json.dumps({"type": "mark", "name": f"echo-{replies}"}))
            elif kind == "chat":
                await ws.send(json.dumps({"type": "chat", "text": f"You said: {message['text']}"}))
            elif kind == "stop":
                return
    except ConnectionClosed:
        return


def handler(*, opus: bool = False) -> BotHandler:
    """The echo bot's connection handler, answering in PCM or in Opus packets."""
    return functools.partial(handle, opus=opus) if opus else handle


async def run(host: str, port: int, *, opus: bool = False) -> None:
    await run_bot(handler(opus=opus), host, port, "echo bot (Opus)" if opus else "echo bot")
