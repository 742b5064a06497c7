"""The gateway's credential on the bot link (gateway/bot/link_token.py, --bot-secret):
a bot that verifies it takes the gateway's calls and refuses anyone else's."""

from __future__ import annotations

import dataclasses
import http
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from gateway.bot import link_token
from gateway.config import Config
from gateway.server import GatewayServer
from tests.client import Client
from tests.conftest import make_token, until

BOT_SECRET = "bot-secret-0123456789abcdef-0123456789"
URL = "ws://bot.example/voice"


def test_a_token_verifies_for_its_bot_only_and_not_for_long() -> None:
    token = link_token.issue(BOT_SECRET, url=URL, conversation="r1", customer="u1")
    claims = link_token.verify(BOT_SECRET, token, url=URL)
    assert (claims["iss"], claims["conversation"], claims["customer"]) == ("talkgate", "r1", "u1")
    assert claims["exp"] - claims["iat"] == link_token.TTL_SECONDS
    with pytest.raises(jwt.InvalidSignatureError):
        link_token.verify("another-secret-0123456789abcdef-0123", token, url=URL)
    with pytest.raises(jwt.InvalidAudienceError):
        link_token.verify(BOT_SECRET, token, url="ws://another.bot/voice")
    old = link_token.issue(BOT_SECRET, url=URL, conversation="r1", customer="u1", now=time.time() - 120)
    with pytest.raises(jwt.ExpiredSignatureError):
        link_token.verify(BOT_SECRET, old, url=URL)
    forged = jwt.encode({"iss": "talkgate", "aud": URL, "conversation": "r1", "customer": "u1"}, BOT_SECRET)
    with pytest.raises(jwt.MissingRequiredClaimError):
        link_token.verify(BOT_SECRET, forged, url=URL)  # no expiry: refused


class VerifyingBot:
    """A native bot that checks the gateway's token at the websocket upgrade (401 if bad)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.url = ""
        self.claims: list[dict[str, Any]] = []
        self.refused = 0
        self.starts: list[dict[str, Any]] = []

    def check(self, connection: ServerConnection, request: Request) -> Response | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            if scheme != "Bearer":
                raise jwt.InvalidTokenError("no bearer token")
            self.claims.append(link_token.verify(self.secret, token, url=self.url))
        except jwt.InvalidTokenError:
            self.refused += 1
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "not the gateway\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        async for data in ws:
            if isinstance(data, str) and (message := json.loads(data))["type"] == "start":
                self.starts.append(message)


@pytest.fixture
async def verifying_bot() -> AsyncIterator[VerifyingBot]:
    bot = VerifyingBot(BOT_SECRET)
    async with serve(bot.handler, "127.0.0.1", 0, process_request=bot.check) as server:
        bot.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/bot"
        yield bot


@pytest.mark.parametrize("secret", [BOT_SECRET, "", "a-forged-secret-0123456789abcdef-0123"])
async def test_the_bot_takes_only_the_gateways_calls(config: Config, verifying_bot: VerifyingBot, secret: str) -> None:
    settings = dataclasses.replace(config, bot_url=verifying_bot.url, bot_secret=secret, bot_connect_seconds=0.6)
    async with GatewayServer(settings) as server:
        customer = await Client.open(server.ws_url)
        try:
            await customer.send({"type": "join", "token": make_token("u1", "customer", "r-bot")})
            await customer.expect("joined")
            if secret == BOT_SECRET:
                await until(lambda: verifying_bot.starts, timeout=2)
                assert verifying_bot.starts[0]["conversation"] == "r-bot"
                assert [(c["conversation"], c["customer"]) for c in verifying_bot.claims] == [("r-bot", "u1")]
                assert verifying_bot.refused == 0
            else:  # no token, or one the bot cannot verify: refused, and the customer goes to agents
                await customer.wait_for("queued", reason="bot_unavailable", timeout=5)
                assert verifying_bot.claims == [] and verifying_bot.refused >= 1
        finally:
            await customer.close()
