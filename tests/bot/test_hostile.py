"""Misbehaving bots: one that stops reading, one that transfers twice, broken audio."""

from __future__ import annotations

import dataclasses
import socket

from gateway.config import Config
from gateway.server import GatewayServer
from tests.bot_server import TestBot
from tests.client import Client
from tests.conftest import make_token
from tests.rtc_client import RtcClient, ToneTrack


async def test_a_bot_that_stops_reading_is_dropped_and_the_conversation_goes_to_the_queue(
    bot: TestBot, config: Config
) -> None:
    async with GatewayServer(dataclasses.replace(config, bot_max_backlog_seconds=0.5)) as server:
        agent = await Client.open(server.ws_url)
        customer = RtcClient(await Client.open(server.ws_url))
        try:
            await agent.send({"type": "join", "token": make_token("a1", "agent")})
            await agent.expect("joined")
            await agent.expect("queue", waiting=[])
            await customer.client.send({"type": "join", "token": make_token("u1", "customer", "r1")})
            await customer.wait_for("joined")
            await bot.wait_for("start")
            # The bot stops reading: its socket's buffers fill, then the gateway's backlog.
            bot.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            bot.ws.transport.pause_reading()
            customer.pc.addTrack(ToneTrack(440))  # a tone is speech to the VAD: 32 KB/s toward the bot
            await customer.negotiate()
            queue = await agent.wait_for("queue", timeout=30)
            assert [(e["conversation"], e["reason"]) for e in queue["waiting"]] == [("r1", "bot_not_reading")]
            await customer.wait_for("participant.left", identity="bot")
            await customer.wait_for("queued", reason="bot_not_reading")
            assert server.broker.bots.get("r1") is None
            metrics = (await server.render_metrics()).decode()
            assert "talkgate_bot_not_reading_total 1.0" in metrics
            assert "talkgate_bots 0.0" in metrics
            # The customer's own session is untouched: chat still flows, to the agent too.
            await agent.send({"type": "accept", "conversation": "r1"})
            await agent.wait_for("joined", conversation="r1")
            await customer.client.send({"type": "chat", "text": "are you there?"})
            await agent.wait_for("chat", text="are you there?")
        finally:
            await agent.close()
            await customer.close()
        bot.ws.transport.abort()


async def test_a_second_transfer_changes_nothing(bot: TestBot, server: GatewayServer) -> None:
    agent = await Client.open(server.ws_url)
    customer = await Client.open(server.ws_url)
    try:
        await agent.send({"type": "join", "token": make_token("a1", "agent")})
        await agent.expect("joined")
        await agent.expect("queue", waiting=[])
        await customer.send({"type": "join", "token": make_token("u1", "customer", "r1")})
        await customer.expect("joined")
        await bot.wait_for("start")
        await bot.send({"type": "transfer", "reason": "wants_human"})
        await bot.send({"type": "transfer", "reason": "again"})
        await bot.send({"type": "chat", "text": "after the transfers"})
        await customer.wait_for("chat", text="after the transfers")
        notices = [m for m in customer.skipped if m["type"] == "chat" and m["from"]["role"] == "system"]
        assert len(notices) == 1
        assert [m["reason"] for m in customer.skipped if m["type"] == "queued"] == ["wants_human"]
        queue = await agent.wait_for("queue")
        assert [(e["conversation"], e["reason"]) for e in queue["waiting"]] == [("r1", "wants_human")]
        await agent.quiet()  # one queue update, not two
    finally:
        await agent.close()
        await customer.close()


async def test_broken_audio_from_the_bot_is_answered_and_the_link_goes_on(bot: TestBot, server: GatewayServer) -> None:
    customer = await Client.open(server.ws_url)
    try:
        await customer.send({"type": "join", "token": make_token("u1", "customer", "r1")})
        await customer.expect("joined")
        await bot.wait_for("start")
        # Before any audio.format: binary is PCM16 at the start's rate; half a sample is an error.
        await bot.send(b"\x01")
        assert (await bot.wait_for("error"))["code"] == "bad_request"
        await bot.send(b"\x00" * 641)
        error = await bot.wait_for("error")
        assert error["code"] == "bad_request" and "even" in error["message"]
        await bot.send(b"")  # nothing to play, nothing to say
        await bot.send({"type": "chat", "text": "still talking"})
        await customer.wait_for("chat", text="still talking")
        link = server.broker.bots.get("r1")
        assert link is not None and link.bad_messages == 2
    finally:
        await customer.close()
