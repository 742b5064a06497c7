"""The offline booking assistant, spoken to over the native protocol with real speech."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import serve

from gateway.bot import assistant
from tests.speech import speak


@pytest.fixture
async def bot() -> AsyncIterator[ClientConnection]:
    """The assistant on a free port, and a connection to it as the gateway would open."""
    async with serve(assistant.handle, "127.0.0.1", 0, max_size=2**22) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/", max_size=2**22) as ws:
            await ws.send(
                json.dumps(
                    {
                        "type": "start",
                        "conversation": "r1",
                        "customer": {"identity": "u1", "name": "Ann"},
                        "audio": {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1, "frame_ms": 20},
                    }
                )
            )
            greeting = json.loads(await ws.recv())  # written at once: chat works without a call
            assert greeting["type"] == "chat" and "booking assistant" in greeting["text"]
            await ws.send(json.dumps({"type": "call.started"}))
            spoken = await reply(ws)  # the caller hears it, not written twice
            assert "chat" not in spoken and spoken["mark"].startswith("greeting-") and len(spoken["audio"]) > 16_000
            yield ws


async def reply(ws: ClientConnection) -> dict[str, Any]:
    """Collect one answer: chat text, transcript, audio bytes, mark, transfer."""
    answer: dict[str, Any] = {"audio": b""}
    async with asyncio.timeout(15):
        while True:
            data = await ws.recv()
            if isinstance(data, bytes):
                answer["audio"] += data
                continue
            message = json.loads(data)
            if message["type"] == "chat":
                answer["chat"] = message["text"]
            elif message["type"] == "transcript":
                answer["heard"] = message["text"]
            elif message["type"] == "transfer":
                answer["transfer"] = message["reason"]
            elif message["type"] == "mark":
                answer["mark"] = message["name"]
                return answer


async def say(ws: ClientConnection, text: str) -> dict[str, Any]:
    """Send an espeak-ng recording as one speech segment, framed as the gateway does."""
    pcm = np.concatenate([np.zeros(3200, np.int16), speak(text), np.zeros(8000, np.int16)]).tobytes()
    await ws.send(json.dumps({"type": "speech.started", "t": 1000}))
    for i in range(0, len(pcm) - 639, 640):
        await ws.send(pcm[i : i + 640])
    await ws.send(json.dumps({"type": "speech.stopped", "t": 3000, "duration_ms": 2000}))
    return await reply(ws)


async def test_a_spoken_booking_request_gets_the_booking_answer_in_text_and_speech(bot: ClientConnection) -> None:
    answer = await say(bot, "I would like to book an appointment")
    assert "book an appointment" in answer["heard"]
    assert assistant.intent_of(answer["heard"]).name == "book"
    assert answer["chat"] == assistant.intent_of("book an appointment").reply
    assert "book an appointment" in answer["chat"]
    speech = np.frombuffer(answer["audio"], dtype="<i2")
    assert len(speech) > 16_000  # more than a second of synthesised voice
    assert np.sqrt(np.mean(speech.astype(np.float64) ** 2)) > 300
    assert answer["mark"].startswith("book-")


async def test_asking_for_a_person_transfers(bot: ClientConnection) -> None:
    answer = await say(bot, "Can I talk to a human please")
    assert answer["transfer"] == "customer_asked_for_a_person"
    assert "person" in answer["chat"]


@pytest.mark.parametrize(
    ("typed", "intent"),
    [
        ("What are your opening hours?", "hours"),
        ("I need to cancel my appointment", "cancel"),
        ("can we move it to friday", "reschedule"),
        ("book me in please", "book"),
        ("blue elephants", "unknown"),
    ],
)
async def test_typed_chat_is_understood_too(bot: ClientConnection, typed: str, intent: str) -> None:
    await bot.send(json.dumps({"type": "chat", "id": "x", "from": {}, "text": typed, "ts": 0}))
    answer = await reply(bot)
    assert assistant.intent_of(typed).name == intent
    assert answer["chat"] == assistant.intent_of(typed).reply


async def test_without_a_call_answers_are_written_only(bot: ClientConnection) -> None:
    await bot.send(json.dumps({"type": "call.ended", "reason": "hangup"}))
    await bot.send(json.dumps({"type": "chat", "id": "x", "from": {}, "text": "What are your opening hours?", "ts": 0}))
    answer = json.loads(await asyncio.wait_for(bot.recv(), 15))
    assert answer == {"type": "chat", "text": assistant.intent_of("opening hours").reply}
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(bot.recv(), 1.0)  # no audio: nobody is on the phone
