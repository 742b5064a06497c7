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
from tests.bot.conftest import TestBot
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
