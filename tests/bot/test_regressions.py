"""Regression tests for the bot-side bugs the core review found (issue 13), against a real
gateway dialling a real (scriptable) bot. Each docstring names the bug."""

from __future__ import annotations

import asyncio

from gateway.config import Config
from gateway.server import GatewayServer
from tests.bot_server import TestBot
from tests.client import Client
from tests.conftest import Party, listen_only, make_token


async def test_bug2_a_flooding_bot_gets_errors_and_never_gets_its_customer_disconnected(
    party: Party, bot: TestBot, server: GatewayServer
) -> None:
    """Bug 2: bot messages were not rate-limited: 600 ``transcript`` messages overflowed
    the customer's 512-message outbox and the customer was closed with 1013."""
    customer = await party("u1")
    await bot.wait_for("start")
    for i in range(600):
        await bot.send({"type": "transcript", "text": f"word {i}", "final": False})
    error = await bot.wait_for("error")
    assert error["code"] == "rate_limited"
    link = server.broker.bots.get("call-room")
    assert link is not None
    async with asyncio.timeout(5):
        while link.rate_limited < 500:  # noqa: ASYNC110 (the gateway works through the flood)
            await asyncio.sleep(0.05)
    # The customer is still connected and served; it got at most the burst of transcripts
    # (and what the bucket refilled meanwhile).
    await customer.client.send({"type": "chat", "text": "still here?"})
    await customer.wait_for("chat", text="still here?")
    assert server.broker.sessions  # not dropped as a slow consumer
    metrics = (await server.render_metrics()).decode()
    assert "talkgate_slow_consumer_disconnects_total 0.0" in metrics
    refused = next(line for line in metrics.splitlines() if line.startswith("talkgate_bot_rate_limited_total"))
    assert float(refused.split()[1]) == link.rate_limited
    assert link.bad_messages == 0 and link.state.value == "active"  # the link goes on


async def test_bug4_drain_stops_stuck_bots_together_within_its_time(bot: TestBot, config: Config) -> None:
    """Bug 4: drain stopped bots one after another, each for up to 1 s: N stuck bots
    overran ``--drain-seconds`` by about N seconds."""
    async with GatewayServer(config) as server:
        customers = []
        for i in range(5):
            client = await Client.open(server.ws_url)
            await client.send({"type": "join", "token": make_token(f"u{i}", "customer", f"r{i}")})
            await client.expect("joined")
            customers.append(client)
        async with asyncio.timeout(5):
            while len(bot.connections) < 5 or len(server.broker.bots) < 5:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        for ws in bot.connections:
            ws.transport.pause_reading()  # stuck: reads neither stop nor the close
        loop = asyncio.get_running_loop()
        started = loop.time()
        await server.drain(1.5)
        assert loop.time() - started < 1.5 + 0.5  # not 5 x 1 s
        for client in customers:
            await client.close()
        for ws in bot.connections:
            ws.transport.abort()


async def test_bug7_accepting_does_not_wait_for_the_bot_to_stop(
    party: Party, bot: TestBot, server: GatewayServer
) -> None:
    """Bug 7: ``accept`` awaited the bot's stop, so the agent's next message waited up to
    1 s for a bot that did not answer its ``stop``."""
    customer = await party("u1")
    await bot.wait_for("start")
    await bot.send({"type": "transfer", "reason": "wants_human"})
    await customer.wait_for("queued")
    bot.ws.transport.pause_reading()  # a stuck bot
    agent = await Client.open(server.ws_url)
    try:
        await agent.send({"type": "join", "token": make_token("a1", "agent")})
        await agent.expect("joined")
        await agent.wait_for("queue")
        await agent.send({"type": "accept", "conversation": "call-room"})
        await agent.send({"type": "chat", "text": "Hello, I am Bob."})
        await agent.wait_for("joined", conversation="call-room")
        # The agent's chat is served before the bot has gone: nothing waited for it.
        await agent.wait_for("chat", text="Hello, I am Bob.")
        assert not any(m["type"] == "participant.left" and m.get("identity") == "bot" for m in agent.skipped), (
            agent.skipped
        )
        await customer.wait_for("participant.left", identity="bot", timeout=5)
    finally:
        await agent.close()
        bot.ws.transport.abort()


async def test_bug6_a_bot_dialled_again_leaves_no_listener_or_tap_behind(
    party: Party, bot: TestBot, server: GatewayServer, config: Config
) -> None:
    """Bug 6: a listener and a tap were added to the customer's voice pipeline at every bot
    (re)start and never removed."""
    customer = await party("u1")
    await bot.wait_for("start")
    customer.pc.addTransceiver("audio", direction="recvonly")
    await customer.negotiate()
    media = server.broker.calls.get("call-room", "u1")
    assert media is not None and media.pipeline is not None
    listeners = len(media.pipeline.listeners)
    for attempt in range(3):
        await bot.ws.close()
        await bot.wait_for("start", timeout=5)
        assert len(bot.connections) == attempt + 2
    assert len(media.pipeline.listeners) == listeners
    assert len(media.taps) <= 1


async def test_bug6_marks_are_bounded(party: Party, bot: TestBot, server: GatewayServer) -> None:
    """Bug 6: playback marks grew without bound (the bot decides how many: 100 000 marks
    grew the gateway by 79 MB)."""
    customer = await party("u1")
    await bot.wait_for("start")
    await listen_only(customer)
    await bot.wait_for("call.started")
    await bot.send(bytes(16_000 * 2 * 30))  # 30 s of audio queued: marks wait for it
    for i in range(3000):
        await bot.send({"type": "mark", "name": f"m{i}"})
    error = await bot.wait_for("error", timeout=10)
    assert error["code"] == "too_many_marks"
    link = server.broker.bots.get("call-room")
    assert link is not None
    async with asyncio.timeout(5):
        while link.playback.pending_marks > link.settings.max_marks:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert link.playback.pending_marks <= link.settings.max_marks
