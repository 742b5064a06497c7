"""The talkgate command, run as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import tokens
from tests.client import Client
from tests.gateway_process import GatewayProcess

SECRET = "cli-secret-0123456789abcdef-0123456789"
TALKGATE = [sys.executable, "-m", "gateway"]
README = Path(__file__).parents[2] / "README.md"


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


def lag_observations_over(url: str, seconds: str) -> float:
    """How often the gateway's event loop was busy for longer than ``seconds`` (its lag histogram)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    count = re.search(r"^talkgate_event_loop_lag_seconds_count (\S+)$", text, re.M)
    within = re.search(rf'^talkgate_event_loop_lag_seconds_bucket{{le="{seconds}"}} (\S+)$', text, re.M)
    assert count is not None and within is not None, text[:2000]
    return float(count.group(1)) - float(within.group(1))


def test_the_demo_assistant_is_ready_before_the_first_customer() -> None:
    """Bug: the demo's booking assistant loaded its speech model (≈0.7 s of CPU, seconds from a
    cold disk) when a conversation dialled it, on the event loop it shares with the gateway:
    the gateway stalled, and the first dial could time out ("bot unreachable")."""
    gateway = GatewayProcess("demo")  # the booking assistant, in-process
    try:

        async def customers() -> None:
            for n in range(3):
                client = await Client.open(gateway.ws_url)
                await client.send({"type": "join", "room": f"early-{n}", "identity": f"early-{n}"})
                await client.expect("joined")
                chat = await client.wait_for("chat", timeout=10)
                # Straight to the greeting: no "Connecting you…" (a failed first dial).
                assert chat["from"]["role"] == "bot" and "booking assistant" in chat["text"], chat
                await client.close()

        asyncio.run(customers())
        assert lag_observations_over(gateway.url, "0.25") == 0  # loading took 0.3-2 s
    finally:
        rest = gateway.stop()
    assert "unreachable" not in rest


def readme_blocks() -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.S | re.M)


def test_readme_runs_talkgate_from_the_venv_it_installs() -> None:
    """Bug: the README installs talkgate into .venv, but its "Using it from your app" block ran
    bare `talkgate`, which is not on the PATH after that install."""
    blocks = readme_blocks()
    assert any(".venv/bin/pip install" in block for block in blocks)
    code = [re.sub(r"(^|\s)#.*$", "", block, flags=re.M) for block in blocks]  # comments may say talkgate
    commands = [m.group(1) for block in code for m in re.finditer(r"(?:^|[\s;&|(])(\S*talkgate) ", block, re.M)]
    assert commands and set(commands) == {".venv/bin/talkgate"}, commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_readme_app_commands_work_as_written(tmp_path: Path) -> None:
    """Bug: the README's "Using it from your app" commands failed as written (`talkgate: command
    not found` after the README's own install into .venv). Runs that block with bash in a
    directory whose .venv is the one running these tests, with no venv on the PATH (port 8080
    becomes a free one), then opens the printed pages' conversations."""
    (block,) = [b for b in readme_blocks() if "talkgate serve" in b and "talkgate token" in b]
    port = free_port()
    (tmp_path / ".venv").symlink_to(sys.prefix)
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALKGATE_") and k != "VIRTUAL_ENV"}
    script = block.replace("8080", str(port)) + 'echo "serve_pid=$!"\n'
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as stdout, err.open("w") as stderr:  # files: the server outlives bash
        result = subprocess.run(
            ["bash", "-e", "-c", script], cwd=tmp_path, env={**env, "PATH": path}, stdout=stdout, stderr=stderr
        )
    printed = out.read_text()
    pid = re.search(r"serve_pid=(\d+)", printed)
    try:
        assert result.returncode == 0, err.read_text()
        urls = re.findall(r"^(http://\S+\?token=\S+)$", printed, re.M)
        assert [u.split("?")[0] for u in urls] == [f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/agent"]
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.2)

        async def join(url: str) -> dict[str, object]:
            client = await Client.open(f"ws://127.0.0.1:{port}/ws")
            await client.send({"type": "join", "token": url.split("token=")[1]})
            joined = await client.expect("joined")
            await client.close()
            return joined

        customer, agent = (asyncio.run(join(url)) for url in urls)
        assert (customer["name"], customer["conversation"]) == ("Ann Smith", "case-1001")
        assert (agent["name"], agent["role"]) == ("Sam Lee", "agent")
    finally:
        if pid is not None:
            os.kill(int(pid.group(1)), signal.SIGTERM)


def json_values(text: str) -> list[Any]:
    """The JSON values in ``text``, one after another (``curl -s`` ends none with a newline)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


def test_readme_api_commands_work_as_written(tmp_path: Path) -> None:
    """The README's "Using it from your app" shows the server API first: its two blocks run
    as written with bash (ports 8080 and 8081 become free ones): tokens minted, the customer
    joins with its page's token, then the app writes to her, reads the timeline, escalates."""
    start, *_ = [b for b in readme_blocks() if "talkgate serve" in b and "--api-port" in b]
    (app,) = [b for b in readme_blocks() if "/messages" in b]
    port, api_port = free_port(), free_port()
    (tmp_path / ".venv").symlink_to(sys.prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALKGATE_") and k != "VIRTUAL_ENV"}
    script = start.replace("8080", str(port)).replace("8081", str(api_port))
    script += 'echo "serve_pid=$!"\necho "key=$TALKGATE_API_KEYS"\n'
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as stdout, err.open("w") as stderr:  # files: the server outlives bash
        result = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
    printed = out.read_text()
    pid = re.search(r"serve_pid=(\d+)", printed)
    try:
        assert result.returncode == 0, err.read_text()
        key = re.search(r"^key=(\S+)$", printed, re.M)
        assert key is not None
        minted = json_values(printed.split("serve_pid=")[0])
        urls = [m["url"] for m in minted]
        assert [u.split("?")[0] for u in urls] == [f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/agent"]
        api = f"http://127.0.0.1:{api_port}/api/v1"

        async def customer_hears_the_app() -> tuple[dict[str, object], str]:
            client = await Client.open(f"ws://127.0.0.1:{port}/ws")
            await client.send({"type": "join", "token": urls[0].split("token=")[1]})
            joined = await client.expect("joined")
            assert (joined["name"], joined["conversation"]) == ("Ann Smith", "case-1001")
            bash = await asyncio.to_thread(
                subprocess.run,
                ["bash", "-e", "-c", app],
                env={**env, "API": api, "AUTH": f"Authorization: Bearer {key.group(1)}"},
                capture_output=True,
                text=True,
                timeout=30,
            )
            chat = await client.wait_for("chat", text="Your router ships today.")
            await client.close()
            return chat, bash.stdout

        chat, answers = asyncio.run(customer_hears_the_app())
        message, timeline, escalated = json_values(answers)
        assert message["id"] == chat["id"] and message["from"]["role"] == "system"
        assert "Your router ships today." in [e.get("text") for e in timeline["events"]]
        assert escalated == {"conversation": "case-1001", "status": "queued"}
    finally:
        if pid is not None:
            os.kill(int(pid.group(1)), signal.SIGTERM)


@pytest.mark.parametrize("option", [["--vad", "silero"], ["--turn-detection", "smart"]])
def test_a_missing_model_stops_the_start_and_says_what_to_install(tmp_path: Path, option: list[str]) -> None:
    """Without the 'ears' extra's model files, serve refuses at once (not at the first call).
    Here a pipecat package without its data files stands first on the path."""
    (tmp_path / "pipecat").mkdir()
    (tmp_path / "pipecat" / "__init__.py").write_text("")
    env = {**os.environ, "TALKGATE_SECRET": SECRET, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([*TALKGATE, "serve", "--port", "0", *option], capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr
    assert " ".join(option) in result.stderr and "pip install 'talkgate[ears]'" in result.stderr


def test_serve_hears_with_silero_and_smart_turns() -> None:
    gateway = GatewayProcess(
        "serve", "--port", "0", "--vad", "silero", "--turn-detection", "smart", env={"TALKGATE_SECRET": SECRET}
    )
    try:
        with urllib.request.urlopen(gateway.url + "/metrics", timeout=5) as response:
            assert b"talkgate_turn_decision_seconds_count 0.0" in response.read()
    finally:
        gateway.stop()
