"""Server API latency on loopback: ``POST /tokens``, ``POST .../messages`` and ``GET .../events``.

A gateway subprocess (``talkgate serve --api-key … --api-port 0``, SQLite records in a fresh
file unless ``--database`` says otherwise) and one aiohttp client in this process that
sends its requests one after the other on a kept-alive connection (what an app backend's
pooled client does). A customer stays joined to the conversation so that the app's
messages are delivered live as well as recorded; the timeline then holds ``--messages``
chats (plus the join), and ``GET .../events?limit=100`` pages it from the start.

    python benchmarks/api.py                      # 1000 requests per endpoint
    python benchmarks/api.py --requests 50 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository's tests/ helpers

from benchmarks.signaling import SECRET, pct
from gateway import tokens
from tests.client import Client
from tests.gateway_process import GatewayProcess

KEY = "bench-api-key-0123456789abcdef"


def summary(seconds: list[float]) -> dict[str, float]:
    return {
        "requests": len(seconds),
        "p50_ms": round(pct(seconds, 0.50) * 1000, 3),
        "p99_ms": round(pct(seconds, 0.99) * 1000, 3),
    }


async def timed(session: aiohttp.ClientSession, method: str, url: str, body: Any, expect: int) -> float:
    started = time.perf_counter()
    async with session.request(method, url, json=body) as response:
        await response.read()
    elapsed = time.perf_counter() - started
    if response.status != expect:
        raise AssertionError(f"{method} {url}: {response.status}, not {expect}")
    return elapsed


async def main(args: argparse.Namespace) -> dict[str, Any]:
    extra = ["--database", args.database] if args.database else []
    gateway = GatewayProcess(
        "serve",
        *("--port", "0", "--api-port", "0", "--rate", "100000", "--burst", "100000"),
        *extra,
        env={"TALKGATE_SECRET": SECRET, "TALKGATE_API_KEYS": KEY, "TALKGATE_LOG_LEVEL": "INFO"},
        drain=False,
    )
    try:
        assert gateway.proc.stderr is not None
        line = gateway.proc.stderr.readline()
        match = re.search(r"api listening on (http://\S+)", line)
        if match is None:
            raise AssertionError(f"the second log line should name the API's URL: {line!r}")
        base = match.group(1)
        customer = await Client.open(gateway.ws_url)
        await customer.send({"type": "join", "token": tokens.issue(SECRET, identity="c1", role="customer", room="r1")})
        await customer.expect("joined")
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            for _ in range(20):  # warm-up: connection, statement caches
                await timed(session, "POST", f"{base}/tokens", {"role": "agent", "identity": "warm"}, 201)
            minted = []
            for n in range(args.requests):
                body = {"role": "customer", "identity": f"u{n}", "room": f"room{n}", "profile": {"plan": "pro"}}
                minted.append(await timed(session, "POST", f"{base}/tokens", body, 201))
            posted = []
            for n in range(args.messages):
                url = f"{base}/conversations/r1/messages"
                posted.append(await timed(session, "POST", url, {"text": f"update {n}", "meta": {"n": n}}, 201))
            read = []
            for _ in range(args.requests if args.database != "none" else 0):  # no records, no timeline
                read.append(await timed(session, "GET", f"{base}/conversations/r1/events?limit=100", None, 200))
        await customer.close()
    finally:
        gateway.stop()
    return {
        "database": args.database or "sqlite",
        "tokens": summary(minted),
        "messages": summary(posted),
        "events_page_of_100": summary(read) if read else None,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"server API on loopback, records: {result['database']}")
    print(f"{'endpoint':<36}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name, label in (
        ("tokens", "POST /tokens"),
        ("messages", "POST /conversations/{id}/messages"),
        ("events_page_of_100", "GET /conversations/{id}/events"),
    ):
        row = result[name]
        if row is None:
            continue
        print(f"{label:<36}{row['requests']:>10}{row['p50_ms']:>10.3f}{row['p99_ms']:>10.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests to each of tokens and events")
    parser.add_argument("--messages", type=int, default=300, help="app messages posted (the timeline read)")
    parser.add_argument("--database", default="", help="'none', a database URL, or '' (a fresh SQLite file)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    arguments = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        outcome = runner.run(main(arguments))
    if arguments.json:
        print(json.dumps(outcome))
    else:
        print_table(outcome)
