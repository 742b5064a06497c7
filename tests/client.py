"""A real websockets client for tests: JSON in and out, with strict expectations."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.request
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 3.0


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        #: Messages that wait_for() skipped, in order, for assertions about what else arrived.
        self.skipped: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Client:
        return cls(await connect(url, open_timeout=TIMEOUT, **kwargs))

    async def send(self, message: dict[str, Any] | list[Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        message = json.loads(data)
        assert isinstance(message, dict), message
        return message

    async def expect(self, mtype: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        """The very next message must be of this type (and have these field values)."""
        message = await self.recv(timeout)
        assert message.get("type") == mtype, f"expected {mtype}, got {message}"
        for key, value in fields.items():
            assert message.get(key) == value, f"{key}: expected {value!r} in {message}"
        return message

    async def wait_for(self, mtype: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        """Skip other messages until one of this type (and these field values) arrives."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.recv(timeout)
                if message.get("type") == mtype and all(message.get(k) == v for k, v in fields.items()):
                    return message
                self.skipped.append(message)

    async def error(self, code: str) -> dict[str, Any]:
        message = await self.expect("error")
        assert message["code"] == code, message
        assert isinstance(message["message"], str) and message["message"], message
        return message

    async def quiet(self, seconds: float = 0.2) -> None:
        """Assert nothing arrives for a while."""
        try:
            data = await asyncio.wait_for(self.ws.recv(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message: {data!r}")

    async def closed(self, timeout: float = TIMEOUT) -> int | None:
        """Wait for the server to close; return the close code. Messages before it are skipped."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self.skipped.append(json.loads(await self.ws.recv()))
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None

    async def ping(self) -> None:
        await self.send({"type": "ping"})
        await self.expect("pong")

    async def close(self) -> None:
        await self.ws.close()


def get_json(url: str, context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """GET a JSON object (``/healthz``); blocking: call it with ``asyncio.to_thread``."""
    with urllib.request.urlopen(url, timeout=5, context=context) as reply:
        result = json.loads(reply.read())
    assert isinstance(result, dict)
    return result
