"""A bot's side of the webhooks: its final transcripts and its hand-over to an agent
(``queue.entered`` and ``bot.transferred``), through a real gateway to a real receiver."""

from __future__ import annotations

from gateway.config import Config
from gateway.server import GatewayServer
from tests.bot_server import TestBot
from tests.client import Client
from tests.conftest import make_token
from tests.gateway.test_webhooks import Receiver, hooked


async def test_a_bot_hand_over_is_bot_transferred(bot: TestBot, config: Config, database_url: str) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        async with GatewayServer(hooked(config, database_url, receiver.url)) as server:
            customer = await Client.open(server.ws_url)
            await customer.send({"type": "join", "token": make_token("u1", "customer", "r1", name="Ann")})
            await customer.expect("joined")
            await bot.wait_for("start")
            await bot.send({"type": "transcript", "text": "a table for two", "final": True})
            await bot.send({"type": "transcript", "text": "a tab", "final": False})
            await bot.send({"type": "transfer", "reason": "wants_human"})
            await customer.wait_for("queued", reason="wants_human")
            got = await receiver.until(5)
            await customer.close()
    finally:
        await receiver.stop()
    kinds = [p["type"] for p in got]
    assert kinds == [
        "conversation.opened",
        "transcript.final",
        "message.created",  # the hand-over notice
        "queue.entered",
        "bot.transferred",
    ], kinds
    transcript = got[1]["data"]
    assert transcript["text"] == "a table for two" and transcript["speaker"]["identity"] == "u1"
    assert got[3]["data"]["reason"] == got[4]["data"]["reason"] == "wants_human"
    assert got[2]["data"]["from"]["role"] == "system"
