"""Twilio Media Streams mode, checked by a bot written from Twilio's published message schema."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import time
from typing import Any

import numpy as np
import pytest

from gateway.config import Config
from gateway.server import GatewayServer
from media.g711 import ulaw_decode, ulaw_encode
from tests.bot_server import TestBot
from tests.conftest import Party, listen_only, start_audio, until
from tests.rtc_client import SpeechTrack
from tests.speech import speak


@pytest.fixture
def config(config: Config) -> Config:
    return dataclasses.replace(config, bot_protocol="twilio")


async def next_event(bot: TestBot, event: str, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            message = await bot.next_text(timeout)
            if message.get("event") == event:
                return message


def dominant_hz(pcm: bytes, rate: int = 8000) -> float:
    data = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(data * np.hanning(len(data))))
    return float(np.fft.rfftfreq(len(data), 1 / rate)[int(np.argmax(spectrum))])


def ulaw_tone(seconds: float, hz: float = 660) -> str:
    t = np.arange(int(seconds * 8000)) / 8000
    pcm = (9000 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()
    return base64.b64encode(ulaw_encode(pcm)).decode()


async def test_connected_start_and_continuous_media_field_for_field(party: Party, bot: TestBot) -> None:
    customer = await party("u1")
    connected = await bot.next_text()
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    await asyncio.sleep(0.3)
    assert bot.received.empty()  # chat only: no stream
    await start_audio(customer, 440)  # the call begins: the stream starts
    start = await bot.next_text()
    assert start["event"] == "start" and start["sequenceNumber"] == "1"
    body = start["start"]
    assert start["streamSid"] == body["streamSid"] and body["streamSid"].startswith("MZ")
    assert body["accountSid"].startswith("AC")
    assert body["callSid"] == "call-room"
    assert body["tracks"] == ["inbound"]
    assert body["customParameters"] == {"identity": "u1", "name": "u1"}
    assert body["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}

    # continuous audio: the tone is streamed, VAD or not
    media = [await next_event(bot, "media", timeout=8)]
    arrival = [time.monotonic()]
    while len(media) < 100:
        media.append(await next_event(bot, "media"))
        arrival.append(time.monotonic())
    sequence = [int(m["sequenceNumber"]) for m in media]
    assert sequence == list(range(sequence[0], sequence[0] + 100))
    assert all(isinstance(m["sequenceNumber"], str) for m in media)
    assert [m["media"]["chunk"] for m in media] == [str(int(media[0]["media"]["chunk"]) + i) for i in range(100)]
    stamps = [int(m["media"]["timestamp"]) for m in media]
    assert np.diff(stamps).tolist() == [20] * 99  # 20 ms of audio each
    assert all(m["media"]["track"] == "inbound" and m["streamSid"] == body["streamSid"] for m in media)
    payloads = [base64.b64decode(m["media"]["payload"]) for m in media]
    assert all(len(p) == 160 for p in payloads)  # 20 ms of 8 kHz μ-law
    assert abs(dominant_hz(ulaw_decode(b"".join(payloads[-25:]))) - 440) < 30
    # Real-time cadence: 100 messages of 20 ms arrive over about two seconds.
    assert 1.4 < arrival[-1] - arrival[0] < 2.6


async def test_media_from_the_bot_is_played_marks_echo_and_clear_returns_marks(party: Party, bot: TestBot) -> None:
    customer = await party("u1")
    await listen_only(customer)
    start = (await next_event(bot, "start"))["start"]
    sid = start["streamSid"]
    await bot.send({"event": "media", "streamSid": sid, "media": {"payload": ulaw_tone(0.6)}})
    await bot.send({"event": "mark", "streamSid": sid, "mark": {"name": "said-hello"}})
    await customer.hears_tone(660)
    echoed = await next_event(bot, "mark")
    assert echoed["mark"] == {"name": "said-hello"} and echoed["streamSid"] == sid
    assert isinstance(echoed["sequenceNumber"], str)

    await bot.send({"event": "media", "streamSid": sid, "media": {"payload": ulaw_tone(5.0)}})
    await bot.send({"event": "mark", "streamSid": sid, "mark": {"name": "long"}})
    await bot.send({"event": "clear", "streamSid": sid})
    cleared = await next_event(bot, "mark")
    assert cleared["mark"] == {"name": "long"}  # as Twilio does: a clear returns its marks


async def test_stop_when_the_customer_leaves(party: Party, bot: TestBot) -> None:
    customer = await party("u1")
    await listen_only(customer)
    start = (await next_event(bot, "start"))["start"]
    await customer.client.send({"type": "leave"})
    stop = await next_event(bot, "stop")
    assert stop["streamSid"] == start["streamSid"]
    assert stop["stop"] == {"accountSid": start["accountSid"], "callSid": "call-room"}
    assert int(stop["sequenceNumber"]) > 1


async def test_malformed_twilio_messages_do_not_break_the_call(party: Party, bot: TestBot) -> None:
    customer = await party("u1")
    await listen_only(customer)
    sid = (await next_event(bot, "start"))["start"]["streamSid"]
    for bad in (
        "nope",
        '{"event":"media","media":{}}',
        '{"event":"media","media":{"payload":"***"}}',
        '{"event":"dtmf"}',
    ):
        await bot.ws.send(bad)
    await bot.send({"event": "media", "streamSid": sid, "media": {"payload": ulaw_tone(1.0)}})
    await customer.hears_tone(660)


async def test_a_greeting_on_start_is_heard_by_a_customer_who_calls_later(party: Party, bot: TestBot) -> None:
    """As on Twilio, the stream starts with the call, not with the chat: a bot that greets
    on ``start`` is heard in full by a customer who calls three seconds after joining."""
    customer = await party("u1")
    await next_event(bot, "connected")
    await asyncio.sleep(3)  # chatting, not calling: no stream
    assert bot.received.empty()
    await listen_only(customer)
    sid = (await next_event(bot, "start"))["start"]["streamSid"]
    await bot.send({"event": "media", "streamSid": sid, "media": {"payload": ulaw_tone(0.6)}})
    await bot.send({"event": "mark", "streamSid": sid, "mark": {"name": "greeting"}})
    await customer.hears_tone(660)
    assert (await next_event(bot, "mark"))["mark"] == {"name": "greeting"}  # played to its end


async def test_each_call_is_a_stream_of_its_own(party: Party, bot: TestBot) -> None:
    customer = await party("u1")
    await listen_only(customer)
    first = await next_event(bot, "start")
    await customer.client.send({"type": "hangup"})
    stop = await next_event(bot, "stop")
    assert stop["streamSid"] == first["streamSid"]
    await customer.renew()
    await listen_only(customer)
    second = await next_event(bot, "start")
    assert second["streamSid"] != first["streamSid"] and second["sequenceNumber"] == "1"
    assert second["start"]["callSid"] == first["start"]["callSid"] == "call-room"


async def test_a_pacing_bot_that_never_clears_is_held_by_speech_and_goes_on_after_a_cough(
    party: Party, bot: TestBot, server: GatewayServer
) -> None:
    """A Twilio bot that sends its answer in real time and never sends ``clear`` (its own
    VAD is deaf): a cough over it holds it for a moment and it goes on; real speech
    interrupts it, its marks come back, and the rest it streams is not played."""
    word = speak("hello")
    cough = word[len(word) // 2 - 1200 : len(word) // 2 + 1200]  # 150 ms of voice
    sentence = speak("I need to change my appointment please")
    pcm = np.concatenate([np.zeros(24_000, np.int16), cough, np.zeros(40_000, np.int16), sentence])
    customer = await party("u1")
    track = SpeechTrack(np.concatenate([pcm, np.zeros(32_000, np.int16)]))
    customer.pc.addTrack(track)
    await customer.negotiate()
    sid = (await next_event(bot, "start"))["start"]["streamSid"]
    link = server.broker.bots.get("call-room")
    assert link is not None

    async def answer_in_real_time() -> None:
        await bot.send({"event": "mark", "streamSid": sid, "mark": {"name": "before"}})
        for _ in range(400):  # 8 s of one long answer, 20 ms at a time, never cleared
            await bot.send({"event": "media", "streamSid": sid, "media": {"payload": ulaw_tone(0.02)}})
            await bot.send({"event": "mark", "streamSid": sid, "mark": {"name": "paced"}}) if _ == 10 else None
            await asyncio.sleep(0.02)

    pacing = asyncio.create_task(answer_in_real_time())
    try:
        await customer.hears_tone(660)
        await until(lambda: link.false_interruptions, timeout=10)  # the cough held the bot, briefly
        assert link.interruptions == 0
        await customer.hears_tone(660)  # and it goes on
        await until(lambda: link.interruptions, timeout=10)  # the sentence interrupts it
        echoed = await next_event(bot, "mark")  # its pending mark comes back, as on a Twilio clear
        assert echoed["mark"]["name"] in ("before", "paced")
        await asyncio.sleep(0.5)
        received = next(r for r in customer.received if r.kind == "audio")
        assert received.energy < 200  # silent, though the bot keeps streaming its old answer
    finally:
        pacing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pacing
