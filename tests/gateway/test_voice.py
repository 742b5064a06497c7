"""The voice pipeline inside the gateway: a customer's real speech → speaking events; bot playback."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from gateway.messages import Participant
from gateway.server import GatewayServer
from media.playback import PlaybackTrack
from tests.conftest import Party, start_audio, two_way_call
from tests.rtc_client import SpeechTrack
from tests.speech import utterances


async def test_customer_speech_makes_speaking_events_for_everyone(party: Party) -> None:
    fixture = utterances(["I would like to book an appointment"], lead_s=1.0, tail_s=1.0)
    (onset, end) = fixture.truth[0]
    customer = await party("u1")
    agent = await party("a1", "agent")
    customer.pc.addTrack(SpeechTrack(fixture.pcm))
    await customer.negotiate()
    sent_at = time.monotonic()
    started = await agent.wait_for("speaking", timeout=5, speaking=True)
    started_after = (time.monotonic() - sent_at) * 1000
    assert started["identity"] == "u1"
    stopped = await agent.wait_for("speaking", timeout=5, speaking=False)
    stopped_after = (time.monotonic() - sent_at) * 1000
    assert stopped["identity"] == "u1"
    # Loose wall-clock bounds (the exact ones are tested on the segmenter): start after the
    # onset, stop after the end plus the hangover, and not much later.
    assert onset < started_after < onset + 1000, started_after
    assert end + 400 < stopped_after < end + 500 + 1500, stopped_after
    await customer.wait_for("speaking", speaking=True)  # the customer's own page sees it too


async def test_agents_audio_is_not_segmented(party: Party, server: GatewayServer) -> None:
    customer, _ = await two_way_call(party)
    await customer.hears("audio")
    agent_peer = server.broker.calls.get("call-room", "a1")
    assert agent_peer is not None and agent_peer.pipeline is None


async def test_bot_playback_reaches_the_customer(party: Party, server: GatewayServer) -> None:
    customer = await party("u1")
    await start_audio(customer, 440)  # the customer's audio section has a free outbound slot
    await customer.wait_for("media", identity="u1", audio=True)
    playback = PlaybackTrack()
    bot = Participant("bot", "bot", "Booking bot")
    server.broker.router.add_virtual_source("call-room", bot, playback)
    t = np.arange(16_000 * 3) / 16_000
    playback.enqueue((9000 * np.sin(2 * np.pi * 660 * t)).astype(np.int16).tobytes(), 16_000)
    heard = await customer.hears_tone(660)
    assert heard.energy > 1000
    await server.broker.router.remove_virtual_source("call-room", "bot")
    playback.stop()
    await asyncio.sleep(0)


async def test_bot_and_agent_are_both_heard_through_a_second_transceiver(party: Party, server: GatewayServer) -> None:
    customer, _ = await two_way_call(party)
    await customer.hears_tone(880)  # the agent, on the customer's audio slot
    playback = PlaybackTrack()
    server.broker.router.add_virtual_source("call-room", Participant("bot", "bot", "Booking bot"), playback)
    t = np.arange(16_000 * 4) / 16_000
    playback.enqueue((9000 * np.sin(2 * np.pi * 660 * t)).astype(np.int16).tobytes(), 16_000)
    # No free slot: the gateway adds a transceiver and offers; the client answers.
    bot_track = await customer.hears_tone(660)
    agent_track = await customer.hears_tone(880)
    assert bot_track is not agent_track
    await server.broker.router.remove_virtual_source("call-room", "bot")
    playback.stop()
