"""``talkgate bot echo``: a reference bot that repeats each speech segment back as audio.

It speaks the native protocol (docs/bot-protocol.md) as a websocket server, and is
what tests and benchmarks use as a bot: every finished speech segment is sent back
at once as binary PCM at 16 kHz (faster than real time, as TTS engines do) followed
by a mark; chat is answered with "You said: …".
"""

from __future__ import annotations

import json
import logging

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from . import run_bot

log = logging.getLogger("talkgate.bot.echo")

#: Bytes per binary message sent back (100 ms of 16 kHz PCM16).
CHUNK = 3200


async def handle(ws: ServerConnection) -> None:
    segment: list[bytes] = []
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
                await ws.send(json.dumps({"type": "audio.format", "sample_rate": rate}))
                log.info("conversation %s started", message.get("conversation"))
            elif kind == "speech.started":
                speaking, segment = True, []
            elif kind == "speech.stopped":
                speaking = False
                replies += 1
                audio = b"".join(segment)
                for i in range(0, len(audio), CHUNK):
                    await ws.send(audio[i : i + CHUNK])
                await ws.send(json.dumps({"type": "mark", "name": f"echo-{replies}"}))
            elif kind == "chat":
                await ws.send(json.dumps({"type": "chat", "text": f"You said: {message['text']}"}))
            elif kind == "stop":
                return
    except ConnectionClosed:
        return


async def run(host: str, port: int) -> None:
    await run_bot(handle, host, port, "echo bot")
