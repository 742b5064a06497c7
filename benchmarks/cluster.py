"""Cluster benchmark: what a second node costs a chat, side by side in one run.

Starts a throwaway Redis and three gateway processes with ``--database none`` (the
records' cost is measured by signaling.py; here only the live state and the bus) and
``--reconnect-grace-seconds 0`` (the joins phase's closed clients leave at once, not
in a burst 5 s later, in the middle of the next phase):

- ``single``: one node, in-memory state (the embedded default), the reference;
- ``a`` and ``b``: two nodes on the Redis.

Phases, each repeated ``--rounds`` times in alternating order (a noisy neighbour hits
every shape alike); figures are medians over rounds:

  joins      N customers join N conversations, C at a time, through one node:
             joins per second and per gateway CPU second (single vs a node on Redis)
  chat       K conversations of a customer and an agent; each customer sends chats,
             paced so that R a second reach the gateway in all; send → delivery at the
             agent (median, p99), for three shapes: ``single`` (one in-memory node),
             ``same`` (both on node a, Redis-backed), ``cross`` (customer on a, agent on b:
             every chat crosses the bus); gateway CPU per 1000 deliveries (both nodes)

    python benchmarks/cluster.py                       # about a minute
    python benchmarks/cluster.py --rounds 1 --joins 20 --conversations 4 --rate 40 --seconds 1 --json   # smoke

``--capacity`` measures instead how many voice-bot sessions ``serve --workers 1`` and
``--workers 2`` hold (``capacity.py``'s search and criteria, ``loadtest.py``'s load:
customers speak, an echo bot answers), each on its own throwaway Redis with
``--database none``. The split of this 2-core machine: one worker is pinned to CPU 0
and the generator (customers and bot, one process) to CPU 1; two workers may use both
CPUs, so they share CPU 1 with the generator. Each step holds when *every* worker
holds (its own loop lag, from its own ``/metrics``).

    python benchmarks/cluster.py --capacity                    # ~10 min
    python benchmarks/cluster.py --capacity --steps 4 --duration 2 --refine 0 --json   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop
from websockets.asyncio.client import ClientConnection

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks import capacity, loadtest
from benchmarks.signaling import SECRET, join, join_rate, pct
from media import ice
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer

SHAPES = ("single", "same", "cross")


def start(*extra: str) -> GatewayProcess:
    return GatewayProcess(
        "serve", "--port", "0", "--database", "none", "--rate", "100000", "--burst", "100000",
        "--reconnect-grace-seconds", "0", *extra,
        env={"TALKGATE_SECRET": SECRET, "TALKGATE_LOG_LEVEL": "INFO"}, drain=True,
    )  # fmt: skip


async def chat(
    customer_gw: GatewayProcess, agent_gw: GatewayProcess, k: int, rate: float, seconds: float, tag: str
) -> dict[str, Any]:
    """K pairs; customers send at ``rate`` in all; latency measured at the agents."""
    pairs = []
    for i in range(k):
        customer, _, _ = await join(customer_gw.ws_url, f"{tag}-u{i}", f"{tag}-r{i}")
        agent, _, _ = await join(agent_gw.ws_url, f"{tag}-a{i}", f"{tag}-r{i}", role="agent")
        pairs.append((customer, agent))
    await asyncio.sleep(0.3)  # the joins' own messages drained
    sent: dict[str, float] = {}
    latencies: list[float] = []
    per_pair = max(1, round(rate * seconds / k))
    interval = k / rate

    async def send(i: int, customer: ClientConnection) -> None:
        await asyncio.sleep(interval * i / k)  # phases spread
        for n in range(per_pair):
            text = f"{tag}-{i}-{n}"
            sent[text] = time.perf_counter()
            await customer.send(json.dumps({"type": "chat", "text": text}))
            await asyncio.sleep(interval)

    async def receive(agent: ClientConnection) -> None:
        got = 0
        while got < per_pair:
            message = json.loads(await agent.recv())
            if message["type"] == "chat" and message["text"] in sent:
                latencies.append(time.perf_counter() - sent[message["text"]])
                got += 1

    errors: list[str] = []

    async def drain(customer: ClientConnection) -> None:
        async for data in customer:  # echoes, or what went wrong
            message = json.loads(data)
            if message["type"] == "error":
                errors.append(f"{message['code']}: {message['message']}")

    gateways = [customer_gw] if customer_gw is agent_gw else [customer_gw, agent_gw]
    cpu0 = sum(g.cpu_seconds() for g in gateways)
    echoes = [asyncio.create_task(drain(c)) for c, _ in pairs]
    try:
        async with asyncio.timeout(seconds * 4 + 10):
            await asyncio.gather(*(send(i, c) for i, (c, _) in enumerate(pairs)), *(receive(a) for _, a in pairs))
    except TimeoutError:
        raise RuntimeError(
            f"{tag}: {len(latencies)} of {per_pair * k} chats reached their agents; errors: {errors[:3]}"
        ) from None
    cpu = sum(g.cpu_seconds() for g in gateways) - cpu0
    for task in echoes:
        task.cancel()
    for customer, agent in pairs:
        await customer.close()
        await agent.close()
    deliveries = 2 * len(latencies)  # the agent's and the sender's echo
    return {
        "messages": len(latencies),
        "median_ms": statistics.median(latencies) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "cpu_ms_per_1000_deliveries": cpu * 1000 / deliveries * 1000,
    }


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return round(statistics.median(values), 3) if values else None


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with RedisServer.start() as redis:
        single = start()
        a = start("--redis", redis.url(), "--node-id", "a")
        b = start("--redis", redis.url(), "--node-id", "b")
        try:
            join_runs: dict[str, list[dict[str, Any]]] = {"single": [], "redis": []}
            chat_runs: dict[str, list[dict[str, Any]]] = {shape: [] for shape in SHAPES}
            for r in range(args.rounds):
                order = ["single", "redis"] if r % 2 == 0 else ["redis", "single"]
                for name in order:
                    gw = single if name == "single" else a
                    join_runs[name].append(await join_rate(gw, args.joins, args.concurrency, prefix=f"j{r}{name}"))
                shapes = SHAPES if r % 2 == 0 else SHAPES[::-1]
                for shape in shapes:
                    pair = {"single": (single, single), "same": (a, a), "cross": (a, b)}[shape]
                    chat_runs[shape].append(
                        await chat(*pair, args.conversations, args.rate, args.seconds, f"c{r}{shape}")
                    )
        finally:
            for gw in (single, a, b):
                gw.stop()
    return {
        "rounds": args.rounds,
        "joins": {
            name: {key: median_of(runs, key) for key in ("joins_per_s", "joins_per_cpu_s")}
            for name, runs in join_runs.items()
        },
        "chat": {
            shape: {
                "messages": sum(r["messages"] for r in runs),
                **{key: median_of(runs, key) for key in ("median_ms", "p99_ms", "cpu_ms_per_1000_deliveries")},
            }
            for shape, runs in chat_runs.items()
        },
        "settings": vars(args),
    }


async def capacities(args: argparse.Namespace) -> dict[str, Any]:
    """``--workers 1`` and ``--workers 2``: the most sessions each holds."""
    ice.use_host_addresses(["127.0.0.1"])
    recording = loadtest.Recording.build()
    steps = [int(n) for n in args.steps.split(",")]
    results = [
        await capacity.find_capacity(kind, steps, args.duration, args.refine, recording)
        for kind in ("talkgate-w1", "talkgate-w2")
    ]
    out: dict[str, Any] = {"results": results}
    one, two = (r["capacity"] for r in results)
    if one:
        out["ratio"] = round(two / one, 2)
    return out


def print_capacity(out: dict[str, Any]) -> None:
    print(
        f"{'target':>12} {'N':>4} {'holds':>5} {'CPU %':>6} {'%/sess':>7} {'lag p99':>8} {'loss %':>7}"
        f" {'gen CPU':>8}  workers: peers / CPU % / lag p99 ms"
    )
    for result in out["results"]:
        for r in sorted(result["runs"], key=lambda r: r["sessions"]):
            lag = (r["loop_lag"] or {}).get("p99_ms", "-")
            split = "  ".join(
                f"{w['peer_connections']} / {w['cpu_percent']} / {(w['loop_lag'] or {}).get('p99_ms', '-')}"
                for w in r.get("workers", [])
            )
            print(
                f"{r['target']:>12} {r['sessions']:>4} {'yes' if r['holds'] else 'no':>5} {r['cpu_percent']:>6}"
                f" {r['cpu_percent_per_session']:>7} {lag!s:>8} {r['loss_percent']!s:>7}"
                f" {r['generator_cpu_percent']:>8}  {split}"
            )
    for result in out["results"]:
        print(f"capacity {result['target']}: {result['capacity']} sessions")
    if "ratio" in out:
        print(f"ratio --workers 2 / --workers 1: {out['ratio']}")


def print_table(result: dict[str, Any]) -> None:
    print(f"medians over {result['rounds']} rounds, alternating order")
    print(f"{'joins':<10} {'per s':>8} {'per CPU s':>10}")
    for name, row in result["joins"].items():
        print(f"{name:<10} {row['joins_per_s']:>8.0f} {row['joins_per_cpu_s'] or 0:>10.0f}")
    print(f"{'chat':<10} {'msgs':>6} {'median ms':>10} {'p99 ms':>8} {'CPU ms/1000 deliveries':>24}")
    for shape, row in result["chat"].items():
        print(
            f"{shape:<10} {row['messages']:>6} {row['median_ms']:>10.2f} {row['p99_ms']:>8.2f} "
            f"{row['cpu_ms_per_1000_deliveries']:>24.1f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--joins", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--rate", type=float, default=200.0, help="Chats a second from all customers together.")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--capacity", action="store_true", help="Voice-bot sessions: --workers 1 vs 2 (see above).")
    parser.add_argument("--steps", default="50,100,150,200,250", help="--capacity: the sessions to step through.")
    parser.add_argument("--duration", type=float, default=10.0, help="--capacity: measured seconds per step.")
    parser.add_argument("--refine", type=int, default=2, help="--capacity: halvings between hold and failure.")
    arguments = parser.parse_args()
    if arguments.capacity:
        loadtest.pin_generator()
        outcome = uvloop.run(capacities(arguments))
    else:
        outcome = uvloop.run(main(arguments))
    if arguments.json:
        print(json.dumps(outcome))
    elif arguments.capacity:
        print_capacity(outcome)
    else:
        print_table(outcome)
