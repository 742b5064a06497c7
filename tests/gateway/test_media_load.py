"""Many simultaneous calls on one gateway (a subprocess, so it has a core of its own)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import pytest

from tests.client import Client
from tests.conftest import SECRET, make_token
from tests.gateway_process import RTC_LOOPBACK_ARGS, GatewayProcess
from tests.rtc_client import RtcClient, ToneTrack

CONVERSATIONS = int(os.environ.get("TALKGATE_LOAD_CONVERSATIONS", "20"))


@pytest.fixture
def gateway_url() -> Iterator[str]:
    gateway = GatewayProcess(
        "serve",
        "--port",
        "0",
        *RTC_LOOPBACK_ARGS,
        "--rate",
        "1000",
        "--burst",
        "1000",
        env={"TALKGATE_SECRET": SECRET},
    )
    yield gateway.ws_url
    gateway.stop()


async def call(url: str, index: int) -> tuple[RtcClient, RtcClient]:
    room = f"load-{index}"
    parties = []
    for identity, role, frequency in ((f"u{index}", "customer", 440), (f"a{index}", "agent", 880)):
        client = await Client.open(url)
        await client.send({"type": "join", "token": make_token(identity, role, room)})
        await client.wait_for("joined")
        rtc = RtcClient(client)
        rtc.pc.addTrack(ToneTrack(frequency))
        await rtc.negotiate()
        parties.append(rtc)
    return parties[0], parties[1]


async def test_twenty_concurrent_audio_conversations_all_carry_audio(gateway_url: str) -> None:
    started = time.monotonic()
    calls = await asyncio.gather(*(call(gateway_url, i) for i in range(CONVERSATIONS)))
    try:
        # Every customer hears its agent's 880 Hz and every agent its customer's 440 Hz.
        heard = await asyncio.gather(*(rtc.hears("audio", frames=50, timeout=20) for pair in calls for rtc in pair))
        for i in range(CONVERSATIONS):
            by_customer, by_agent = heard[2 * i], heard[2 * i + 1]
            assert abs(by_customer.dominant_hz() - 880) < 30, f"customer {i}"
            assert abs(by_agent.dominant_hz() - 440) < 30, f"agent {i}"
            assert by_customer.energy > 1000 and by_agent.energy > 1000
        print(f"{CONVERSATIONS} calls set up and carrying audio after {time.monotonic() - started:.1f} s")
    finally:
        await asyncio.gather(*(rtc.close() for pair in calls for rtc in pair))
