"""The talkgate command, run as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from gateway import tokens
from tests.client import Client
from tests.gateway_process import GatewayProcess

SECRET = "cli-secret-0123456789abcdef-0123456789"
TALKGATE = [sys.executable, "-m", "gateway"]


@pytest.fixture
def served() -> Iterator[str]:
    gateway = GatewayProcess("serve", "--port", "0", env={"TALKGATE_SECRET": SECRET})
    try:
        yield gateway.url
    finally:
        gateway.stop()


def test_token_command_prints_a_verifiable_token() -> None:
    out = subprocess.run(
        [
            *TALKGATE,
            "token",
            "--identity",
            "u1",
            "--role",
            "customer",
            "--room",
            "r1",
            "--name",
            "Ann",
            "--secret",
            SECRET,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    grant = tokens.verify(SECRET, out)
    assert (grant.identity, grant.room, grant.name) == ("u1", "r1", "Ann")


def test_token_command_can_print_a_page_url() -> None:
    out = subprocess.run(
        [*TALKGATE, "token", "--identity", "a1", "--role", "agent", "--url", "http://h:1/"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TALKGATE_SECRET": SECRET},
    ).stdout.strip()
    assert out.startswith("http://h:1/agent?token=")
    assert tokens.verify(SECRET, out.split("token=")[1]).role == "agent"


def test_customer_token_without_room_is_a_usage_error() -> None:
    result = subprocess.run(
        [*TALKGATE, "token", "--identity", "u1", "--role", "customer", "--secret", SECRET],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "room" in result.stderr


def test_serve_refuses_to_start_without_a_secret() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TALKGATE_SECRET"}
    result = subprocess.run([*TALKGATE, "serve", "--port", "0"], capture_output=True, text=True, env=env, timeout=10)
    assert result.returncode == 2 and "secret" in result.stderr


def test_serve_reads_its_settings_from_env_and_serves(served: str) -> None:
    with urllib.request.urlopen(served + "/healthz", timeout=5) as response:
        assert json.load(response)["status"] == "ok"

    async def chat() -> None:
        client = await Client.open(served.replace("http", "ws") + "/ws")
        token = tokens.issue(SECRET, identity="u1", role="customer", room="r1")
        await client.send({"type": "join", "token": token})
        await client.expect("joined")
        await client.send({"type": "chat", "text": "hello from a subprocess test"})
        await client.expect("chat")
        await client.close()

    asyncio.run(chat())


def test_demo_runs_in_dev_mode_and_says_where_to_go() -> None:
    gateway = GatewayProcess("demo")
    url = gateway.url
    try:

        async def dev_join() -> None:
            client = await Client.open(url.replace("http", "ws") + "/ws")
            await client.send({"type": "join", "room": "demo-room", "identity": "visitor", "name": "Visitor"})
            await client.expect("joined", conversation="demo-room")
            await client.close()

        asyncio.run(dev_join())
    finally:
        rest = gateway.stop()
    assert "INSECURE" in rest
    assert f"{url}/agent" in rest
