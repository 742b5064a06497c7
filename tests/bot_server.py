"""A scriptable test bot: a real websocket server that records what the gateway sends."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection, serve

from media import opus


class TestBot:
    """Records every message from the gateway; the test sends the bot's side."""

    __test__ = False

    def __init__(self) -> None:
        self.received: asyncio.Queue[dict[str, Any] | bytes] = asyncio.Queue()
        self.connections: list[ServerConnection] = []
        self.connected = asyncio.Event()
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        self.connected.set()
        async for data in ws:
            await self.received.put(data if isinstance(data, bytes) else json.loads(data))

    @property
    def ws(self) -> ServerConnection:
        return self.connections[-1]

    async def send(self, message: dict[str, Any] | bytes) -> None:
        await self.ws.send(message if isinstance(message, bytes) else json.dumps(message))

    async def next_text(self, timeout: float = 5.0, skip_audio: bool = True) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                item = await self.received.get()
                if isinstance(item, dict):
                    return item
                if not skip_audio:
                    raise AssertionError("expected text, got audio")

    async def wait_for(self, mtype: str, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.next_text(timeout)
                if message["type"] == mtype:
                    return message


@contextlib.asynccontextmanager
async def running_bot() -> AsyncIterator[TestBot]:
    """A TestBot serving on a free loopback port (``url``)."""
    test_bot = TestBot()
    async with serve(test_bot.handler, "127.0.0.1", 0, max_size=2**22) as server:
        test_bot.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/bot"
        yield test_bot


def tone(seconds: float, hz: float = 660, rate: int = 16_000) -> bytes:
    """``seconds`` of a sine at ``hz``: what a bot sends as PCM (int16 mono at ``rate``)."""
    t = np.arange(int(seconds * rate)) / rate
    return (9000 * np.sin(2 * np.pi * hz * t)).astype(np.int16).tobytes()


def opus_tone(seconds: float, hz: float = 660) -> list[bytes]:
    """What a bot with an Opus TTS sends: 20 ms packets, encoded by the bot."""
    pcm = np.frombuffer(tone(seconds, hz, 48_000), dtype=np.int16)
    encoder = opus.Encoder(48_000)
    return [encoder.encode(pcm[i : i + 960]) for i in range(0, len(pcm) - 959, 960)]


async def send_audio(bot: TestBot, seconds: float, encoding: str) -> None:
    """``seconds`` of the 660 Hz tone, faster than real time: PCM in one piece, or Opus packets."""
    if encoding == "pcm_s16le":
        await bot.send(tone(seconds))
        return
    for packet in opus_tone(seconds):
        await bot.send(packet)
