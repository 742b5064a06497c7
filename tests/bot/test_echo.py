"""The reference echo bot (``talkgate bot echo [--opus]``) behind a real gateway and an aiortc customer."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.bot import echo, serve_bot
from gateway.config import Config
from gateway.server import GatewayServer
from tests.client import Client
from tests.conftest import make_token, until
from tests.rtc_client import RtcClient, SpeechTrack
from tests.speech import utterances


@pytest.mark.parametrize("opus", [False, True], ids=["pcm", "opus"])
async def test_the_echo_bot_repeats_what_the_customer_said(config: Config, opus: bool) -> None:
    fixture = utterances(["I would like to book an appointment"], lead_s=0.5, tail_s=4.0)
    async with serve_bot(echo.handler(opus=opus), "127.0.0.1", 0) as bot_server:
        url = f"ws://127.0.0.1:{bot_server.sockets[0].getsockname()[1]}/"
        async with GatewayServer(dataclasses.replace(config, bot_url=url)) as server:
            client = await Client.open(server.ws_url)
            await client.send({"type": "join", "token": make_token("u1", "customer", "echo-room")})
            await client.expect("joined")
            customer = RtcClient(client)
            try:
                customer.pc.addTrack(SpeechTrack(fixture.pcm))
                await customer.negotiate()
                link = server.broker.bots.get("echo-room")
                assert link is not None
                # The sentence ends, the segment closes, the bot answers: its voice arrives,
                # the whole sentence (~2 s), not a keep-alive now and then.
                await until(lambda: any(r.loud_onsets for r in customer.received if r.kind == "audio"), timeout=15)
                await until(lambda: link.playback.packets > 75)
                assert link.playback.passthrough is opus and link.bad_messages == 0
            finally:
                await customer.close()
