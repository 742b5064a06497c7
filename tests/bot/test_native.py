"""The native bot protocol against a real gateway, a test bot server and aiortc customers."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from gateway.config import Config
from gateway.server import GatewayServer
from tests.bot_server import TestBot, opus_tone, send_audio, tone
from tests.client import Client
from tests.conftest import Party, listen_only, make_token, until
from tests.rtc_client import RtcClient, SpeechTrack
from tests.speech import utterances


async def segment_at(bot: TestBot) -> tuple[list[bytes], list[int], dict[str, Any]]:
    """What the bot gets of one speech segment after its ``speech.started``: the binary
    messages, the ``speech.paused`` times, then ``speech.stopped``."""
    audio: list[bytes] = []
    paused: list[int] = []
    async with asyncio.timeout(8):
        while True:
            item = await bot.received.get()
            if isinstance(item, bytes):
                audio.append(item)
            elif item["type"] == "speech.paused":
                paused.append(item["t"])
            elif item["type"] == "speech.stopped":
                return audio, paused, item


async def test_start_first_then_chat_both_ways(party: Party, bot: TestBot) -> None:
    customer = await party("u1")
    start = await bot.next_text()
    assert start == {
        "type": "start",
        "conversation": "call-room",
        # No records here (a --database none gateway): no profile, no earlier conversations.
        "customer": {"identity": "u1", "name": "u1", "profile": None, "previous": []},
        "audio": {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1, "frame_ms": 20},
    }
    await customer.client.send({"type": "chat", "text": "what are your opening hours?"})
    chat = await bot.wait_for("chat")
    assert chat["text"] == "what are your opening hours?" and chat["from"]["identity"] == "u1"
    await bot.send({"type": "chat", "text": "We are open 8 to 18."})
    reply = await customer.wait_for("chat", text="We are open 8 to 18.")
    assert reply["from"] == {"identity": "bot", "role": "bot", "name": "Assistant"}
    await bot.send({"type": "transcript", "text": "what are your", "final": False})
    caption = await customer.wait_for("transcript")
    assert caption["text"] == "what are your" and caption["final"] is False
    assert caption["speaker"] == {"identity": "u1", "role": "customer", "name": "u1"}  # what the bot heard
    await bot.send({"type": "transcript", "text": "We are open", "final": False, "speaker": "bot"})
    spoken = await customer.wait_for("transcript", text="We are open")
    assert spoken["speaker"]["identity"] == "bot"


async def test_speech_reaches_the_bot_as_frames_between_started_and_stopped(
    party: Party, bot: TestBot, server: GatewayServer
) -> None:
    fixture = utterances(["I would like to book an appointment"], lead_s=1.0, tail_s=1.0)
    customer = await party("u1")
    await bot.wait_for("start")
    customer.pc.addTrack(SpeechTrack(fixture.pcm))
    await customer.negotiate()
    started = await bot.wait_for("speech.started", timeout=8)
    frames, paused, stopped = await segment_at(bot)
    assert paused and paused[-1] == stopped["t"]  # the hint came first, where the voice stopped
    assert all(len(f) == 640 for f in frames)  # 20 ms of 16 kHz PCM16
    onset, end = fixture.truth[0]
    assert abs(started["t"] - onset) <= 150
    duration = stopped["duration_ms"]
    assert abs(duration - (end - onset)) <= 250
    # The segment: preroll + speech + hangover, one frame each 20 ms.
    expected = (duration + 200 + 500) / 20
    assert abs(len(frames) - expected) <= 1, (len(frames), expected)
    # The audio path was timed: every packet into the pipeline, every live frame to the bot.
    m = server.metrics
    assert m.rtp_to_pipeline.count >= (end + 500) / 20 - 5
    live = m.rtp_to_bot.count
    assert len(frames) - 15 <= live <= len(frames)  # all but the preroll (≤ 14 frames) are live
    assert m.pipeline_to_bot.count == live and 0 < m.rtp_to_bot.sum / live < 0.05
    text = m.render().decode()
    assert f"talkgate_audio_rtp_to_bot_seconds_count {float(live)}" in text
    assert 'talkgate_event_loop_lag_seconds_bucket{le="0.02"}' in text


async def test_speech_in_bigger_messages_when_asked(bot: TestBot, config: Config) -> None:
    """``bot_frame_ms=60``: the start says so, each binary message holds three 20 ms
    frames but the last of a segment (it goes out before ``speech.stopped``), and nothing
    is lost or reordered against the control messages."""
    fixture = utterances(["I would like to book an appointment"], lead_s=1.0, tail_s=1.0)
    async with GatewayServer(dataclasses.replace(config, bot_frame_ms=60)) as server:
        customer = await Client.open(server.ws_url)
        await customer.send({"type": "join", "token": make_token("u1", "customer", "call-room")})
        await customer.expect("joined")
        start = await bot.wait_for("start")
        assert start["audio"]["frame_ms"] == 60
        rtc = RtcClient(customer)
        rtc.pc.addTrack(SpeechTrack(fixture.pcm))
        await rtc.negotiate()
        await bot.wait_for("speech.started", timeout=8)
        messages, _, stopped = await segment_at(bot)
        await rtc.close()  # and its websocket
    assert all(len(m) == 3 * 640 for m in messages[:-1]) and 0 < len(messages[-1]) <= 3 * 640
    frames = sum(len(m) for m in messages) // 640
    assert abs(frames - (stopped["duration_ms"] + 200 + 500) / 20) <= 1, frames  # every frame


@pytest.mark.parametrize("encoding", ["pcm_s16le", "opus"])
async def test_bot_audio_reaches_the_customer_and_marks_come_back_after_playback(
    party: Party, bot: TestBot, server: GatewayServer, encoding: str
) -> None:
    customer = await party("u1")
    await bot.wait_for("start")
    await listen_only(customer)
    await bot.wait_for("call.started")  # bot audio plays only during a call
    await bot.send({"type": "audio.format", "encoding": encoding})
    sent = time.monotonic()
    await send_audio(bot, 0.6, encoding)  # faster than real time
    await bot.send({"type": "mark", "name": "greeting"})
    await customer.hears_tone(660)  # a 660 Hz peak in real samples: the bot's voice arrived
    mark = await bot.wait_for("mark")
    assert mark == {"type": "mark", "name": "greeting"}
    assert time.monotonic() - sent >= 0.5  # only once the audio has been played
    link = server.broker.bots.get("call-room")
    assert link is not None and link.playback.passthrough is (encoding == "opus") and link.bad_messages == 0


async def test_opus_from_the_bot_is_checked_and_the_encoding_changes_only_when_nothing_is_queued(
    party: Party, bot: TestBot, server: GatewayServer
) -> None:
    customer = await party("u1")
    await bot.wait_for("start")
    await listen_only(customer)
    await bot.wait_for("call.started")
    await bot.send({"type": "audio.format", "encoding": "opus", "sample_rate": 16000})
    assert "48000" in (await bot.wait_for("error"))["message"]  # Opus's clock is 48 kHz
    await bot.send({"type": "audio.format", "encoding": "opus"})
    for bad, why in ((b"\x03", "not an Opus packet"), (bytes([30 << 3, 0xFF, 0xFE]), "10 ms")):
        await bot.send(bad)
        error = await bot.wait_for("error")
        assert error["code"] == "bad_request" and why in error["message"], error
    await send_audio(bot, 3.0, "opus")
    await customer.hears_tone(660)
    await bot.send({"type": "audio.format", "encoding": "pcm_s16le"})  # mid-answer: refused
    error = await bot.wait_for("error")
    assert error["code"] == "bad_request" and "only while nothing is queued" in error["message"]
    await bot.send({"type": "clear"})
    await bot.send({"type": "audio.format", "encoding": "pcm_s16le", "sample_rate": 24000})
    await bot.send(tone(0.6, rate=24_000))
    await bot.send({"type": "mark", "name": "pcm-again"})
    assert (await bot.wait_for("mark"))["name"] == "pcm-again"
    link = server.broker.bots.get("call-room")
    assert link is not None and not link.playback.passthrough and link.playback.rate == 24_000
    await bot.send(tone(3.0, rate=24_000))
    await bot.send({"type": "audio.format", "encoding": "opus"})  # the other way, mid-answer: refused too
    assert "still pcm_s16le" in (await bot.wait_for("error"))["message"]
    await bot.send(tone(0.2, rate=24_000))  # and PCM goes on at its rate
    await bot.send({"type": "mark", "name": "still-pcm"})
    assert (await bot.wait_for("mark", timeout=8))["name"] == "still-pcm"
    assert not link.playback.passthrough and link.playback.rate == 24_000 and link.bad_messages == 5


async def test_clear_silences_the_bot_at_once(party: Party, bot: TestBot) -> None:
    customer = await party("u1")
    await bot.wait_for("start")
    await listen_only(customer)
    await bot.wait_for("call.started")  # bot audio plays only during a call
    await bot.send(tone(5.0))
    received = await customer.hears_tone(660)
    await bot.send({"type": "clear"})
    await asyncio.sleep(0.4)  # network, jitter buffer, the frames already in flight
    frames_before = received.frames
    await asyncio.sleep(0.4)
    assert received.frames > frames_before  # the track goes on …
    assert received.energy < 200  # … with silence


@pytest.mark.parametrize("encoding", ["pcm_s16le", "opus"])
async def test_barge_in_clears_bot_audio_and_tells_the_bot(party: Party, bot: TestBot, encoding: str) -> None:
    customer = await party("u1")
    await bot.wait_for("start")
    fixture = utterances(["Sorry, I need to change that"], lead_s=1.0, tail_s=1.0)
    speech = SpeechTrack(fixture.pcm)
    customer.pc.addTrack(speech)
    await customer.negotiate()
    await bot.wait_for("call.started")
    await bot.send({"type": "audio.format", "encoding": encoding})
    await send_audio(bot, 8.0, encoding)
    await bot.send({"type": "mark", "name": "long-answer"})
    received = await customer.hears_tone(660)
    started = await bot.wait_for("speech.started", timeout=8)
    interrupted = await bot.next_text()  # once the speech has lasted --barge-in-min-ms
    assert interrupted["type"] == "interrupted" and interrupted["marks"] == ["long-answer"]
    assert 0 < interrupted["heard_ms"] < 8000 and started["t"] > 0
    await asyncio.sleep(0.5)
    assert received.energy < 200  # the bot's voice stopped at the customer


async def test_transfer_queues_and_the_bot_is_stopped_when_an_agent_accepts(
    party: Party, bot: TestBot, server: GatewayServer
) -> None:
    customer = await party("u1")
    await bot.wait_for("start")
    agent = await Client.open(server.ws_url)
    try:
        await agent.send({"type": "join", "token": make_token("a1", "agent")})
        await agent.expect("joined")
        await agent.expect("queue", waiting=[])
        await bot.send({"type": "chat", "text": "Let me get you a person."})
        await bot.send({"type": "transfer", "reason": "wants_human"})
        queue = await agent.wait_for("queue")
        [entry] = queue["waiting"]
        assert entry["conversation"] == "call-room" and entry["reason"] == "wants_human"
        notice = await customer.wait_for("chat", text="Connecting you with a person. An agent will join shortly.")
        assert notice["from"]["role"] == "system"
        await customer.wait_for("queued", reason="wants_human")
        await agent.send({"type": "accept", "conversation": "call-room"})
        joined = await agent.wait_for("joined", conversation="call-room")
        texts = [m["text"] for m in joined["history"]]
        assert "Let me get you a person." in texts  # the agent sees what the bot said
        stop = await bot.wait_for("stop")
        assert stop == {"type": "stop", "reason": "transferred"}
    finally:
        await agent.close()


async def test_customer_leaving_stops_the_bot(party: Party, bot: TestBot) -> None:
    customer = await party("u1")
    await bot.wait_for("start")
    await customer.client.send({"type": "leave"})
    assert await bot.wait_for("stop") == {"type": "stop", "reason": "customer_left"}


async def test_malformed_bot_messages_are_answered_and_counted(
    party: Party, bot: TestBot, server: GatewayServer
) -> None:
    customer = await party("u1")
    await bot.wait_for("start")
    for bad in ("{not json", '{"type": "dance"}', '{"type": "audio.format", "sample_rate": 44100}', '{"type":"chat"}'):
        await bot.ws.send(bad)
        error = await bot.wait_for("error")
        assert error["code"] == "bad_request"
    await bot.send({"type": "chat", "text": "still here"})
    await customer.wait_for("chat", text="still here")
    link = server.broker.bots.get("call-room")
    assert link is not None and link.bad_messages == 4
    metrics = (await server.render_metrics()).decode()
    assert "talkgate_bot_bad_messages_total 4.0" in metrics
    assert "talkgate_bots 1.0" in metrics


async def test_audio_over_the_buffer_limit_is_refused(party: Party, bot: TestBot, config: Config) -> None:
    async with GatewayServer(dataclasses.replace(config, bot_max_buffer_seconds=1.0)) as small:
        client = await Client.open(small.ws_url)
        try:
            await client.send({"type": "join", "token": make_token("u9", "customer", "small-room")})
            await client.expect("joined")
            await bot.wait_for("start")
            await bot.send(tone(0.2))  # no call yet: refused, not played into nothing
            assert (await bot.wait_for("error"))["code"] == "no_call"
            await listen_only(RtcClient(client))
            await bot.wait_for("call.started")
            await bot.send(tone(1.5))
            error = await bot.wait_for("error")
            assert error["code"] == "buffer_full" and "1 s" in error["message"]
        finally:
            await client.close()


async def test_unreachable_bot_sends_the_customer_to_the_queue(party: Party, config: Config) -> None:
    dead = dataclasses.replace(config, bot_url="ws://127.0.0.1:9/nobody", bot_connect_seconds=0.6)
    async with GatewayServer(dead) as srv:
        agent = await Client.open(srv.ws_url)
        customer = await Client.open(srv.ws_url)
        try:
            await agent.send({"type": "join", "token": make_token("a1", "agent")})
            await agent.expect("joined")
            await agent.expect("queue", waiting=[])
            await customer.send({"type": "join", "token": make_token("u1", "customer", "r-dead")})
            await customer.expect("joined")
            await customer.send({"type": "chat", "text": "hello?"})
            assert (await customer.wait_for("chat", text="Connecting you…"))["from"]["role"] == "system"
            queue = await agent.wait_for("queue", timeout=5)
            assert [(e["conversation"], e["reason"]) for e in queue["waiting"]] == [("r-dead", "bot_unavailable")]
            await customer.wait_for("queued", reason="bot_unavailable")
            await agent.send({"type": "accept", "conversation": "r-dead"})
            joined = await agent.wait_for("joined", conversation="r-dead")
            assert "hello?" in [m["text"] for m in joined["history"]]  # nothing typed was lost
            assert "talkgate_bot_unavailable_total 1.0" in (await srv.render_metrics()).decode()
        finally:
            await agent.close()
            await customer.close()


async def test_a_bot_that_drops_is_dialled_again(party: Party, bot: TestBot) -> None:
    await party("u1")
    await bot.wait_for("start")
    await bot.ws.close()
    again = await bot.wait_for("start", timeout=5)
    assert again["conversation"] == "call-room"
    assert len(bot.connections) == 2


async def test_the_bot_is_a_participant_that_answers_upgrades(
    party: Party, bot: TestBot, server: GatewayServer
) -> None:
    customer = await party("u1")
    joined = await customer.wait_for("participant.joined", identity="bot")
    assert joined["role"] == "bot" and joined["name"] == "Assistant"
    await bot.wait_for("start")
    await customer.client.send({"type": "upgrade", "media": "audio"})
    reply = await customer.wait_for("upgrade.reply")
    assert reply["accept"] is True and reply["from"]["identity"] == "bot"  # it talks
    await customer.client.send({"type": "upgrade", "media": "video"})
    reply = await customer.wait_for("upgrade.reply", media="video")
    assert reply["accept"] is False  # it cannot see
    await customer.client.send({"type": "leave"})
    await bot.wait_for("stop")
    await customer.wait_for("left")
    assert (await server.health())["conversations"] == 0  # the bot did not keep it alive


async def test_a_draining_gateway_stops_the_bot_with_reason_shutdown(
    party: Party, bot: TestBot, server: GatewayServer
) -> None:
    customer = await party("u1")
    await bot.wait_for("start")
    drain = asyncio.create_task(server.drain(0.5))
    assert await bot.wait_for("stop") == {"type": "stop", "reason": "shutdown"}
    await customer.wait_for("shutdown", retry_after_ms=2000)
    assert await drain is False  # the customer stayed until the deadline


async def test_the_bot_hears_when_calls_begin_and_end(party: Party, bot: TestBot) -> None:
    """``start`` opens the link (chat bots work without a call); ``call.started`` and
    ``call.ended`` frame each voice call; audio outside a call is refused, not lost silently."""
    customer = await party("u1")
    await bot.wait_for("start")
    await bot.send(tone(0.2))
    no_call = await bot.wait_for("error")
    assert no_call["code"] == "no_call"
    await listen_only(customer)
    await bot.wait_for("call.started")
    await customer.client.send({"type": "hangup"})
    assert (await bot.wait_for("call.ended")) == {"type": "call.ended", "reason": "hangup"}
    await customer.renew()
    await listen_only(customer)
    await bot.wait_for("call.started")  # the next call


async def test_a_burst_from_the_bot_does_not_hold_the_loop(party: Party, bot: TestBot, server: GatewayServer) -> None:
    """A TTS answer sent at once, an Opus packet per message: hundreds of messages arrive in
    one socket read, and reading never yields while data is buffered. The reader now lets
    the loop run other work every ``READ_BURST`` messages (it used to take them all: a
    burst of 500 packets held the loop of every session on the process)."""
    from gateway.bot.connector import READ_BURST

    customer = await party("u1")
    await bot.wait_for("start")
    await listen_only(customer)
    await bot.wait_for("call.started")
    await bot.send({"type": "audio.format", "encoding": "opus"})
    link = server.broker.bots.get("call-room")
    assert link is not None
    await until(lambda: link.playback.passthrough)
    packets = opus_tone(10.0)
    steps: list[int] = []

    async def watch() -> None:  # one turn per loop iteration, as any other session's work
        last = link.playback._written
        while len(steps) < 10_000:
            await asyncio.sleep(0)
            written = link.playback._written
            if written != last:
                steps.append((written - last) // 960)
                last = written
            if written == len(packets) * 960:
                return

    watcher = asyncio.create_task(watch())
    for packet in packets:
        await bot.send(packet)
    await asyncio.wait_for(watcher, 10)
    assert sum(steps) == len(packets) == 500
    assert max(steps) <= READ_BURST, steps
