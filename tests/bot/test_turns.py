"""A gateway that hears with Silero and Smart Turn (``--vad silero --turn-detection smart``):
what a bot gets when a customer pauses in mid-sentence, then finishes.

The fixture is one the model decides with a wide margin (tests/media/test_turn.py says
why espeak-ng speech needs a hesitation to sound unfinished).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from typing import Any

import numpy as np
import pytest

from gateway.config import Config
from gateway.server import GatewayServer
from tests.bot_server import TestBot
from tests.conftest import Party
from tests.rtc_client import SpeechTrack
from tests.speech import RATE, speak

PAUSE_MS = 700


@pytest.fixture
def config(config: Config) -> Config:
    return dataclasses.replace(config, vad="silero", turn_detection="smart")


async def test_a_mid_sentence_pause_stays_in_the_turn_and_the_end_comes_before_the_hangover(
    party: Party, bot: TestBot, server: GatewayServer
) -> None:
    first, rest = speak("I would like to er,"), speak("book an appointment for tomorrow.")
    lead = np.zeros(RATE // 2, np.int16)
    pause = np.zeros(PAUSE_MS * RATE // 1000, np.int16)
    pcm = np.concatenate([lead, first, pause, rest, np.zeros(RATE, np.int16)])
    end_ms = (len(lead) + len(first) + len(pause) + len(rest)) * 1000 / RATE
    customer = await party("u1")
    await bot.wait_for("start")
    track = SpeechTrack(pcm)
    customer.pc.addTrack(track)
    await customer.negotiate()
    await bot.wait_for("speech.started", timeout=8)
    texts: list[dict[str, Any]] = []
    async with asyncio.timeout(8):
        while not texts or texts[-1]["type"] != "speech.stopped":
            item = await bot.received.get()
            if isinstance(item, dict):
                texts.append(item)
    stopped_at = time.monotonic()
    # One turn: paused in the middle (the hint), stopped only at the end.
    assert [m["type"] for m in texts].count("speech.stopped") == 1
    assert any(m["type"] == "speech.paused" and m["t"] < end_ms - len(rest) * 1000 / RATE for m in texts)
    assert abs(texts[-1]["t"] - end_ms) <= 80
    # Ended by the model: sooner after the last sample left the customer than the 500 ms
    # hangover (a 200 ms pause; the model, asked 80 ms before, decides meanwhile; the
    # track's clock is monotonic).
    last_sample_sent = await track.started() + end_ms / 1000
    assert stopped_at - last_sample_sent < 0.45, stopped_at - last_sample_sent
    print(f"end of speech → speech.stopped at the bot: {(stopped_at - last_sample_sent) * 1000:.0f} ms")
    count = re.search(r"talkgate_turn_decision_seconds_count (\S+)", server.metrics.render().decode())
    assert count is not None and float(count.group(1)) >= 2  # the pause and the end, at least
