"""Webhook delivery: how fast the outbox drains, and how late a receiver hears of a chat.

A gateway subprocess (``talkgate serve --webhook-url … --webhook-secret …``, SQLite records
in a fresh file unless ``--database`` says otherwise) and, in this process, a receiver
(aiohttp.web on a free loopback port) that verifies every signature with the
``standardwebhooks`` library, as a real receiver would, and answers 204. Clients in
``--conversations`` rooms send ``--messages`` chats in all, as fast as their echoes come
back; every chat makes one ``message.created`` webhook (plus the conversations'
``conversation.opened``).

Reported: deliveries per second while the chats flow and until the outbox is empty,
chat echo → webhook received (median, p95), and the gateway's CPU per delivery.

    python benchmarks/webhooks.py                          # 2000 chats over 20 conversations
    python benchmarks/webhooks.py --messages 100 --json    # quick
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web
from standardwebhooks import Webhook

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository's tests/ helpers

from benchmarks.signaling import SECRET, pct
from gateway import tokens
from tests.client import Client
from tests.databases import PostgresCluster
from tests.gateway_process import GatewayProcess

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"bench-webhook-secret-0123456789").decode()


class Receiver:
    """Verifies each delivery's signature and notes when each chat's webhook arrived."""

    def __init__(self) -> None:
        self.verifier = Webhook(WEBHOOK_SECRET)
        self.arrived: dict[str, float] = {}  # chat text -> when its message.created came
        self.deliveries = 0
        self.bad_signatures = 0
        self.ids: set[str] = set()
        #: set once ``expected`` chats' webhooks have arrived
        self.expected = 0
        self.all_in = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload = self.verifier.verify(body, dict(request.headers))
        except Exception:
            self.bad_signatures += 1
            return web.Response(status=400)
        self.deliveries += 1
        self.ids.add(request.headers["webhook-id"])
        if payload["type"] == "message.created":
            self.arrived.setdefault(payload["data"]["text"], time.perf_counter())
            if self.expected and len(self.arrived) >= self.expected:
                self.all_in.set()
        return web.Response(status=204)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.database != "postgresql":
        return await run(args, args.database)
    cluster = PostgresCluster.start(durable=True)  # throwaway, durable (fsync on) as a real one
    try:
        return {**await run(args, cluster.url(cluster.create_database("bench"))), "database": "postgresql"}
    finally:
        cluster.stop()


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    extra = ["--database", url] if url else []
    gateway = GatewayProcess(
        "serve",
        *("--port", "0", "--rate", "100000", "--burst", "100000", "--reconnect-grace-seconds", "0"),
        *("--webhook-url", f"http://127.0.0.1:{port}/hook", "--webhook-secret", WEBHOOK_SECRET),
        *extra,
        env={"TALKGATE_SECRET": SECRET},
        drain=True,
    )
    echoed: dict[str, float] = {}
    try:
        clients = []
        for i in range(args.conversations):
            client = await Client.open(gateway.ws_url)
            await client.send(
                {"type": "join", "token": tokens.issue(SECRET, identity=f"w{i}", role="customer", room=f"hook-{i}")}
            )
            await client.expect("joined")
            clients.append(client)
        per_client = args.messages // args.conversations

        async def chatter(i: int, client: Client) -> None:
            for n in range(per_client):
                text = f"c{i}m{n}"
                await client.send({"type": "chat", "text": text})
                await client.wait_for("chat", text=text)
                echoed[text] = time.perf_counter()

        expected = receiver.expected = per_client * args.conversations
        cpu0, t0 = gateway.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(chatter(i, c) for i, c in enumerate(clients)))
        chats_done = time.perf_counter()
        if len(receiver.arrived) >= expected:
            receiver.all_in.set()
        await asyncio.wait_for(receiver.all_in.wait(), args.timeout)
        drained, delivered = time.perf_counter(), receiver.deliveries
        cpu = gateway.cpu_seconds() - cpu0
        for client in clients:
            await client.close()
    finally:
        gateway.stop()
        await runner.cleanup()
    lags = [receiver.arrived[text] - echoed[text] for text in echoed if text in receiver.arrived]
    return {
        "benchmark": "webhooks",
        "database": url or "sqlite",
        "chats": expected,
        "deliveries": delivered,  # until the outbox was drained (the closes come after)
        "unique_webhook_ids": len(receiver.ids),
        "bad_signatures": receiver.bad_signatures,
        "chats_per_s": round(expected / (chats_done - t0), 1),
        "deliveries_per_s_until_drained": round(delivered / (drained - t0), 1),
        "echo_to_webhook": {
            "median_ms": round(statistics.median(lags) * 1000, 2),
            "p95_ms": round(pct(lags, 0.95) * 1000, 2),
        },
        "gateway_cpu_ms_per_delivery": round(cpu * 1000 / max(1, delivered), 3),
    }


def print_table(r: dict[str, Any]) -> None:
    print(
        f"{r['chats']} chats ({r['chats_per_s']}/s) -> {r['deliveries']} signed deliveries "
        f"({r['bad_signatures']} bad signatures): {r['deliveries_per_s_until_drained']} deliveries/s until the "
        f"outbox was empty; chat echo -> webhook median {r['echo_to_webhook']['median_ms']} ms, "
        f"p95 {r['echo_to_webhook']['p95_ms']} ms; gateway CPU {r['gateway_cpu_ms_per_delivery']} ms per delivery"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument(
        "--database",
        default="",
        help="a database URL or postgresql (a throwaway cluster); default: a fresh SQLite file",
    )
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the outbox to drain")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the line")
    arguments = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(main(arguments))
    if arguments.json:
        print(json.dumps(result))
    else:
        print_table(result)
