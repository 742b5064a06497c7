"""Graceful shutdown: no new connections, everyone told, conversations drained, then closed."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from gateway.server import RETRY_AFTER_MS, GatewayServer
from tests.client import Client
from tests.conftest import SECRET, Join, make_token
from tests.gateway_process import GatewayProcess


async def test_drain_tells_everyone_refuses_newcomers_and_ends_when_the_conversations_do(
    server: GatewayServer, join: Join
) -> None:
    customer, _ = await join("c1", room="r1")
    agent, _ = await join("a1", role="agent")
    drain = asyncio.create_task(server.drain(10))
    for client in (customer, agent):
        assert await client.wait_for("shutdown") == {"type": "shutdown", "retry_after_ms": RETRY_AFTER_MS}
    with pytest.raises(ConnectionRefusedError):
        await Client.open(server.ws_url)  # no longer listening
    await customer.ping()  # the live conversation goes on meanwhile
    await asyncio.sleep(0.3)
    assert not drain.done()
    started = time.monotonic()
    await customer.send({"type": "leave"})
    assert await asyncio.wait_for(drain, 5) is True
    assert time.monotonic() - started < 2  # ended with the conversation, not at the deadline
    await server.close()
    assert await agent.closed() == 1001  # the lobby agent, closed at the end


async def test_drain_gives_up_at_its_deadline_and_close_ends_the_rest(server: GatewayServer, join: Join) -> None:
    customer, _ = await join("c1", room="r1")
    started = time.monotonic()
    assert await server.drain(0.5) is False
    assert 0.5 <= time.monotonic() - started < 3
    await server.close()
    assert await customer.closed() == 1001
    assert customer.skipped[0] == {"type": "shutdown", "retry_after_ms": RETRY_AFTER_MS}


def test_sigterm_drains_and_the_process_exits_0_once_the_call_ends() -> None:
    gateway = GatewayProcess("serve", "--port", "0", "--drain-seconds", "20", "--secret", SECRET)

    async def scenario() -> float:
        client = await Client.open(gateway.ws_url)
        await client.send({"type": "join", "token": make_token("c1", room="r1")})
        await client.expect("joined")
        gateway.proc.send_signal(signal.SIGTERM)
        await client.expect("shutdown", retry_after_ms=RETRY_AFTER_MS)
        sent = time.monotonic()
        await client.send({"type": "leave"})
        await client.closed()
        return sent

    try:
        left = asyncio.run(scenario())
        code = gateway.proc.wait(timeout=10)
        exited = time.monotonic()
    finally:
        if gateway.proc.poll() is None:
            gateway.proc.kill()
    assert gateway.proc.stderr is not None
    log = gateway.proc.stderr.read()
    assert code == 0, log
    assert exited - left < 5  # not the 20 s drain limit
    assert "draining: 1 conversations" in log and "drained in" in log
