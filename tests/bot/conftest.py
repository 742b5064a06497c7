"""The scriptable test bot (tests/bot_server.py) and a gateway configured to dial it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from gateway.config import Config
from gateway.server import GatewayServer
from tests.bot_server import TestBot, running_bot


@pytest.fixture
async def bot() -> AsyncIterator[TestBot]:
    async with running_bot() as test_bot:
        yield test_bot


@pytest.fixture
def config(config: Config, bot: TestBot) -> Config:
    return dataclasses.replace(config, bot_url=bot.url, bot_connect_seconds=1.0)


@pytest.fixture
async def server(config: Config) -> AsyncIterator[GatewayServer]:
    async with GatewayServer(config) as srv:
        yield srv
