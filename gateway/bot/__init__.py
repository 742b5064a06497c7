"""Speech bots: the gateway dials a bot per conversation over a websocket.

The reference bots (``echo``, ``assistant``) are websocket servers; ``serve_bot`` and
``run_bot`` are how the CLI and the demo serve them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from websockets.asyncio.server import Server, ServerConnection, serve

log = logging.getLogger("talkgate.bot")

BotHandler = Callable[[ServerConnection], Awaitable[None]]


def serve_bot(handler: BotHandler, host: str, port: int) -> Server:
    """A websocket server for a bot (``async with``); frames up to 4 MiB, no compression."""
    return serve(handler, host, port, max_size=2**22, compression=None)


async def run_bot(handler: BotHandler, host: str, port: int, name: str) -> None:
    """Serve a bot until cancelled; logs the URL it listens on."""
    async with serve_bot(handler, host, port) as server:
        bound = server.sockets[0].getsockname()
        log.info("%s listening on ws://%s:%s", name, bound[0], bound[1])
        await asyncio.get_running_loop().create_future()
