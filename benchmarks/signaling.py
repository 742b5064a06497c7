"""Signaling benchmark: join latency and throughput, chat fan-out.

Starts ``talkgate serve`` in its own process (uvloop) and drives it from this
one (also uvloop) over loopback websockets. Gateway CPU is read from
/proc/<pid>/stat around each phase, so per-core rates are measured, not guessed.

    python benchmarks/signaling.py                 # full run: 1000 joins, 50-way fan-out
    python benchmarks/signaling.py --joins 50 --fanout 10 --messages 20 --json   # smoke

Phases:
  join-latency   N sequential clients: websocket open, then join → joined (median, p95)
  join-rate      N clients joining C at a time: joins per second, per gateway CPU second
  fanout         P participants in one conversation; one sends M chats; time from send
                 to each delivery (median, p95) and deliveries per gateway CPU second
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
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository's tests/ helpers

from gateway import tokens
from tests.gateway_process import GatewayProcess

SECRET = "bench-secret-0123456789abcdef-0123456789"


def start_gateway(rate: float, burst: int, extra: list[str] | None = None) -> GatewayProcess:
    """talkgate serve on a free port; INFO logging, because its first line names the URL."""
    return GatewayProcess(
        "serve",
        "--port",
        "0",
        "--rate",
        str(rate),
        "--burst",
        str(burst),
        *(extra or []),
        env={"TALKGATE_SECRET": SECRET, "TALKGATE_LOG_LEVEL": "INFO"},
    )


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values) * 1000, 3), "p95_ms": round(pct(values, 0.95) * 1000, 3)}


async def join(url: str, identity: str, room: str, role: str = "customer") -> tuple[ClientConnection, float, float]:
    """Open and join; returns the connection, open time and join→joined time (seconds)."""
    token = tokens.issue(SECRET, identity=identity, role=role, room=room)
    t0 = time.perf_counter()
    ws = await connect(url, compression=None, max_queue=None)
    t1 = time.perf_counter()
    await ws.send(json.dumps({"type": "join", "token": token}))
    while True:
        message = json.loads(await ws.recv())
        if message["type"] == "joined":
            return ws, t1 - t0, time.perf_counter() - t1


async def join_latency(gw: GatewayProcess, n: int) -> dict[str, Any]:
    opens, joins = [], []
    for i in range(n):
        ws, opened, joined = await join(gw.ws_url, f"lat-{i}", f"lat-room-{i}")
        opens.append(opened)
        joins.append(joined)
        await ws.close()
    return {"joins": n, "open": summary_ms(opens), "join_to_joined": summary_ms(joins)}


async def join_rate(gw: GatewayProcess, n: int, concurrency: int) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(concurrency)
    sockets: list[ClientConnection] = []

    async def one(i: int) -> None:
        async with semaphore:
            ws, _, _ = await join(gw.ws_url, f"rate-{i}", f"rate-room-{i}")
            sockets.append(ws)

    cpu0, t0 = gw.cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall, cpu = time.perf_counter() - t0, gw.cpu_seconds() - cpu0
    await asyncio.gather(*(ws.close() for ws in sockets))
    return {
        "joins": n,
        "concurrency": concurrency,
        "joins_per_s": round(n / wall, 1),
        "gateway_cpu_s": round(cpu, 3),
        "joins_per_cpu_s": round(n / cpu, 1) if cpu else None,
    }


async def fanout(gw: GatewayProcess, participants: int, messages: int) -> dict[str, Any]:
    room = "fanout-room"
    clients = [(await join(gw.ws_url, f"fan-{i}", room))[0] for i in range(participants)]
    # Drain the participant.joined announcements before measuring.
    await asyncio.sleep(0.5)
    for ws in clients:
        while True:
            try:
                await asyncio.wait_for(ws.recv(), 0.01)
            except TimeoutError:
                break
    sender = clients[0]
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    expected = participants * messages

    async def reader(ws: ClientConnection) -> None:
        while len(latencies) < expected:
            message = json.loads(await ws.recv())
            if message["type"] == "chat":
                latencies.append(time.perf_counter() - sent_at[message["text"]])
        done.set()

    readers = [asyncio.create_task(reader(ws)) for ws in clients]
    cpu0, t0 = gw.cpu_seconds(), time.perf_counter()
    for i in range(messages):
        text = f"m{i}"
        sent_at[text] = time.perf_counter()
        await sender.send(json.dumps({"type": "chat", "text": text}))
        await asyncio.sleep(0.002)  # a busy but humanly possible conversation rate per sender
    await asyncio.wait_for(done.wait(), 60)
    wall, cpu = time.perf_counter() - t0, gw.cpu_seconds() - cpu0
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await asyncio.gather(*(ws.close() for ws in clients))
    deliveries = len(latencies)
    return {
        "participants": participants,
        "messages": messages,
        "deliveries": deliveries,
        "delivery": summary_ms(latencies),
        "deliveries_per_s": round(deliveries / wall, 1),
        "gateway_cpu_s": round(cpu, 3),
        "deliveries_per_cpu_s": round(deliveries / cpu, 1) if cpu else None,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    # Rate limiting is per connection and this benchmark's sender is one connection; the
    # fan-out conversation holds more than the default --max-participants; clients close
    # without leaving, and their places must not be held for a reconnect (the join phases
    # open --joins conversations each, one after the other).
    extra = ["--max-participants", str(max(8, args.fanout)), "--reconnect-grace-seconds", "0"]
    if args.database == "memory":
        extra += ["--database", "none"]
    elif args.database != "sqlite":  # sqlite: a fresh file from GatewayProcess
        extra += ["--database", args.database]
    gw = start_gateway(rate=100_000, burst=100_000, extra=extra)
    try:
        return {
            "benchmark": "signaling",
            "database": args.database,
            "join_latency": await join_latency(gw, args.joins),
            "join_rate": await join_rate(gw, args.joins, args.concurrency),
            "fanout": await fanout(gw, args.fanout, args.messages),
        }
    finally:
        gw.stop()


def print_table(r: dict[str, Any]) -> None:
    jl, jr, fo = r["join_latency"], r["join_rate"], r["fanout"]
    print(
        f"join latency ({jl['joins']} sequential):"
        f" open median {jl['open']['median_ms']} ms p95 {jl['open']['p95_ms']} ms;"
        f" join→joined median {jl['join_to_joined']['median_ms']} ms p95 {jl['join_to_joined']['p95_ms']} ms"
    )
    print(
        f"join rate ({jr['joins']} clients, {jr['concurrency']} at a time): {jr['joins_per_s']} joins/s wall,"
        f" {jr['joins_per_cpu_s']} joins per gateway CPU-second"
    )
    print(
        f"fan-out ({fo['participants']} participants x {fo['messages']} messages = {fo['deliveries']} deliveries):"
        f" delivery median {fo['delivery']['median_ms']} ms p95 {fo['delivery']['p95_ms']} ms;"
        f" {fo['deliveries_per_cpu_s']} deliveries per gateway CPU-second"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--joins", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--fanout", type=int, default=50, help="participants in the fan-out conversation")
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument(
        "--database",
        default="sqlite",
        help="the gateway's records: memory (--database none), sqlite (a fresh file), or a database URL",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    arguments = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(main(arguments))
    if arguments.json:
        print(json.dumps(result))
    else:
        print_table(result)
