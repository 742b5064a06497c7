"""The bot and the records: the bot's ``start`` knows the customer, and what was said
aloud (final transcripts) is in the timeline. Real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from gateway.config import Config
from gateway.records import SqlRecords
from gateway.server import GatewayServer
from tests.bot_server import TestBot
from tests.client import Client
from tests.conftest import make_token


@pytest.fixture
async def server(config: Config, database_url: str) -> AsyncIterator[GatewayServer]:
    async with GatewayServer(dataclasses.replace(config, database=database_url, history_retention_seconds=0)) as srv:
        yield srv


async def test_the_bot_start_carries_the_customer_and_transcripts_are_recorded(
    bot: TestBot, server: GatewayServer
) -> None:
    records = server.records
    assert isinstance(records, SqlRecords)
    ann = await Client.open(server.ws_url)
    await ann.send({"type": "join", "token": make_token("u1", "customer", "first", name="Ann", profile={"vip": True})})
    await ann.expect("joined")
    start = await bot.wait_for("start")
    assert start["customer"] == {"identity": "u1", "name": "Ann", "profile": {"vip": True}, "previous": []}
    await bot.send({"type": "transcript", "text": "what are your", "final": False})
    await bot.send({"type": "transcript", "text": "what are your opening hours", "final": True})
    await bot.send({"type": "chat", "text": "We open at nine."})
    await ann.wait_for("chat", text="We open at nine.")
    await ann.send({"type": "leave"})
    await ann.wait_for("left")
    await bot.wait_for("stop")

    async with asyncio.timeout(5):
        while True:  # the writer commits the last leave after the client saw it
            found = await records.conversations_of("first")
            if found and found[-1]["closed"] is not None:
                break
            await asyncio.sleep(0.02)
    [conversation] = found
    assert conversation["bot"] == "Assistant"
    timeline = await records.timeline(conversation["id"])
    spoken = [(e["type"], e["actor"], e["body"]["text"]) for e in timeline if e["type"] in ("transcript", "chat")]
    assert spoken == [
        ("transcript", "u1", "what are your opening hours"),  # final ones only; the customer's words
        ("chat", "bot", "We open at nine."),
    ]

    # Back another day: the bot can greet a returning customer.
    await ann.send({"type": "join", "token": make_token("u1", "customer", "second", name="Ann")})
    await ann.expect("joined")
    again = await bot.wait_for("start")
    [earlier] = again["customer"]["previous"]
    assert earlier["room"] == "first" and earlier["last_message"] == "We open at nine."
    assert again["customer"]["profile"] == {"vip": True}
    await ann.close()


async def test_an_agent_who_takes_over_sees_what_was_said_aloud(bot: TestBot, server: GatewayServer) -> None:
    """Bug: the agent who took over from the bot saw the bot's answers and nothing of what
    the customer had said on the call. Final transcripts are in ``joined.history`` now, as
    chat from whoever spoke marked ``spoken`` (clients that know no better show them as chat)."""
    ann = await Client.open(server.ws_url)
    await ann.send({"type": "join", "token": make_token("u1", "customer", "spoken", name="Ann")})
    await ann.expect("joined")
    await bot.wait_for("start")
    await ann.send({"type": "chat", "text": "hi"})
    await bot.wait_for("chat")
    await bot.send({"type": "transcript", "text": "my router", "final": False})
    await bot.send({"type": "transcript", "text": "my router blinks red"})
    await bot.send({"type": "transcript", "text": "Have you restarted it?", "speaker": "bot"})
    await bot.send({"type": "chat", "text": "Let me get a person."})
    await bot.send({"type": "transfer", "reason": "router"})
    await ann.wait_for("queued")
    agent = await Client.open(server.ws_url)
    await agent.send({"type": "join", "token": make_token("a1", "agent", None, name="Bob")})
    await agent.expect("joined")
    await agent.send({"type": "accept", "conversation": "spoken"})
    history = (await agent.wait_for("joined", conversation="spoken"))["history"]
    said = [
        (m["from"]["identity"], m["text"], m.get("spoken", False)) for m in history if m["from"]["role"] != "system"
    ]
    assert said == [
        ("u1", "hi", False),
        ("u1", "my router blinks red", True),  # the customer's words, final only
        ("bot", "Have you restarted it?", True),
        ("bot", "Let me get a person.", False),
    ]
    spoken = [m for m in history if m.get("spoken")]
    assert all(m["type"] == "chat" and m["conversation"] == "spoken" and m["id"] and m["ts"] for m in spoken)
    assert spoken[0]["from"] == {"identity": "u1", "role": "customer", "name": "Ann"}
    assert spoken[1]["from"]["role"] == "bot"
    await agent.close()
    await ann.close()
