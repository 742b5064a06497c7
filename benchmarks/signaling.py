"""Signaling benchmark: join latency and throughput, chat fan-out, steady chat load,
with each kind of records side by side in one run.

Starts ``talkgate serve`` in its own process (uvloop) once per database and drives it
from this one (also uvloop) over loopback websockets. Gateway CPU is read from
/proc/<pid>/stat around each phase, so per-core rates are measured, not guessed.

    python benchmarks/signaling.py                 # memory, SQLite, PostgreSQL (if installed)
    python benchmarks/signaling.py --database memory,sqlite --rounds 3
    python benchmarks/signaling.py --database memory,sqlite --rounds 8 --phases load   # the ratio, tighter
    python benchmarks/signaling.py --joins 50 --fanout 10 --messages 20 --load-seconds 2 --json   # smoke

Databases: ``memory`` (no records, ``--database none``), ``sqlite`` (a fresh file),
``postgresql`` (a throwaway cluster started here, durable settings: fsync and
synchronous commit on, as a deployment runs it), or a database URL; ``NAME@MS`` runs that
one with ``--commit-interval-ms MS`` (``sqlite@3``). ``--rounds`` repeats
the databases in turn (memory, sqlite, … memory, sqlite, …) so a noisy neighbour hits
them alike; figures are the medians over rounds.

Phases:
  join-latency   N sequential clients: websocket open, then join → joined (median, p95)
  join-rate      N clients joining C at a time: joins per second, per gateway CPU second
  fanout         P participants in one conversation; one sends M chats; time from send
                 to each delivery (median, p95) and deliveries per gateway CPU second
  load           K conversations of two participants; one of each sends chats so that
                 R messages a second reach the gateway in all (each conversation evenly
                 paced, phases spread); send → echo latency at the sender (median, p95)
                 and deliveries per gateway CPU second
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
from tests.databases import PostgresCluster, PostgresUnavailable
from tests.gateway_process import CLK_TCK, GatewayProcess

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


async def join_rate(gw: GatewayProcess, n: int, concurrency: int, prefix: str = "rate") -> dict[str, Any]:
    """N customers join N conversations, ``concurrency`` at a time (``prefix`` names them:
    a run that repeats this on one gateway gives each round its own)."""
    semaphore = asyncio.Semaphore(concurrency)
    sockets: list[ClientConnection] = []

    async def one(i: int) -> None:
        async with semaphore:
            ws, _, _ = await join(gw.ws_url, f"{prefix}-{i}", f"{prefix}-room-{i}")
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


async def load(gw: GatewayProcess, conversations: int, rate: float, seconds: float) -> dict[str, Any]:
    """Steady chat: ``conversations`` rooms of two, ``rate`` messages a second in all."""
    pairs = []
    for i in range(conversations):
        room = f"load-room-{i}"
        sender = (await join(gw.ws_url, f"load-s{i}", room))[0]
        listener = (await join(gw.ws_url, f"load-l{i}", room))[0]
        pairs.append((sender, listener))
    await asyncio.sleep(0.5)
    for pair in pairs:  # drain the participant.joined announcements
        for ws in pair:
            while True:
                try:
                    await asyncio.wait_for(ws.recv(), 0.001)
                except TimeoutError:
                    break
    interval = conversations / rate  # each conversation's pace
    per_conversation = max(1, round(seconds / interval))
    sent_at: dict[str, float] = {}
    echoes: list[float] = []
    delivered = 0

    async def receive(ws: ClientConnection, sender: bool) -> None:
        nonlocal delivered
        for _ in range(per_conversation):
            while True:
                message = json.loads(await ws.recv())
                if message["type"] == "chat":
                    break
            delivered += 1
            if sender:
                echoes.append(time.perf_counter() - sent_at[message["text"]])

    async def send(i: int, ws: ClientConnection, start: float) -> None:
        for n in range(per_conversation):
            due = start + (i / conversations + n) * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            text = f"c{i}m{n}"
            sent_at[text] = time.perf_counter()
            await ws.send(json.dumps({"type": "chat", "text": text}))

    start = time.perf_counter() + 0.05
    split0 = cpu_split(gw)
    cpu0, t0 = gw.cpu_seconds(), time.perf_counter()
    tasks = [send(i, s, start) for i, (s, _) in enumerate(pairs)]
    tasks += [receive(ws, j == 0) for s, lst in pairs for j, ws in enumerate((s, lst))]
    await asyncio.wait_for(asyncio.gather(*tasks), seconds * 3 + 30)
    wall, cpu = time.perf_counter() - t0, gw.cpu_seconds() - cpu0
    user, system = (b - a for a, b in zip(split0, cpu_split(gw), strict=True))
    await asyncio.gather(*(ws.close() for pair in pairs for ws in pair))
    messages = per_conversation * conversations
    return {
        "conversations": conversations,
        "messages": messages,
        "messages_per_s": round(messages / wall, 1),
        "deliveries": delivered,
        "echo": summary_ms(echoes),
        "gateway_cpu_s": round(cpu, 3),
        "gateway_cpu_share": round(cpu / wall, 3),
        "gateway_user_s": round(user, 3),
        "gateway_system_s": round(system, 3),
        "deliveries_per_cpu_s": round(delivered / cpu, 1) if cpu else None,
    }


#: A target named ``NAME+api`` runs NAME with the server API on (its own port).
API_SUFFIX = "+api"
#: The API key of a ``+api`` target when ``--api-key`` gives none.
DEFAULT_API_KEY = "benchmark-api-key-0123456789abcdef"


def commit_interval(database: str) -> str | None:
    """The MS of a ``NAME@MS`` database name (not the user of a URL's ``user@host``)."""
    _, at, suffix = database.removesuffix(API_SUFFIX).rpartition("@")
    return suffix if at and suffix.replace(".", "", 1).isdigit() else None


def cpu_split(gw: GatewayProcess) -> tuple[float, float]:
    """The gateway's user and system CPU seconds so far (system: mostly socket and file writes)."""
    with open(f"/proc/{gw.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


async def run_one(args: argparse.Namespace, database: str, url: str) -> dict[str, Any]:
    # Rate limiting is per connection and this benchmark's senders send fast; the fan-out
    # conversation holds more than the default --max-participants; clients close without
    # leaving, and their places must not be held for a reconnect (the join phases open
    # --joins conversations each, one after the other).
    extra = ["--max-participants", str(max(8, args.fanout)), "--reconnect-grace-seconds", "0"]
    extra += ["--max-conversations", str(max(10_000, 2 * args.joins + args.load_conversations + 10))]
    extra += ["--database", url] if url else []  # "": a fresh SQLite file from GatewayProcess
    # The server API on (its own port, a free one): to check it costs signaling nothing.
    api = bool(args.api_key) or database.endswith(API_SUFFIX)
    extra += ["--api-key", args.api_key or DEFAULT_API_KEY, "--api-port", "0"] if api else []
    interval = commit_interval(database)
    if interval is not None:  # sqlite@3: --commit-interval-ms 3
        extra += ["--commit-interval-ms", interval]
    gw = start_gateway(rate=100_000, burst=100_000, extra=extra)
    try:
        result: dict[str, Any] = {"database": database, "api": api}
        if "joins" in args.phases:
            result["join_latency"] = await join_latency(gw, args.joins)
            result["join_rate"] = await join_rate(gw, args.joins, args.concurrency)
        if "fanout" in args.phases:
            result["fanout"] = await fanout(gw, args.fanout, args.messages)
        if "load" in args.phases:
            result["load"] = await load(gw, args.load_conversations, args.load_rate, args.load_seconds)
        return result
    finally:
        gw.stop()


#: Figures compared across databases: (name, path into a run's result, higher is better).
FIGURES: list[tuple[str, tuple[str, ...]]] = [
    ("join→joined median ms", ("join_latency", "join_to_joined", "median_ms")),
    ("join→joined p95 ms", ("join_latency", "join_to_joined", "p95_ms")),
    ("joins per CPU-s", ("join_rate", "joins_per_cpu_s")),
    ("fan-out delivery median ms", ("fanout", "delivery", "median_ms")),
    ("fan-out delivery p95 ms", ("fanout", "delivery", "p95_ms")),
    ("fan-out deliveries per CPU-s", ("fanout", "deliveries_per_cpu_s")),
    ("load echo median ms", ("load", "echo", "median_ms")),
    ("load echo p95 ms", ("load", "echo", "p95_ms")),
    ("load deliveries per CPU-s", ("load", "deliveries_per_cpu_s")),
    ("load gateway CPU share", ("load", "gateway_cpu_share")),
    ("load gateway user CPU-s", ("load", "gateway_user_s")),
    ("load gateway system CPU-s", ("load", "gateway_system_s")),
]


def _get(result: dict[str, Any], path: tuple[str, ...]) -> float:
    value: Any = result
    for key in path:
        if key not in value:
            return float("nan")  # a phase not run
        value = value[key]
    return float("nan") if value is None else float(value)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    names = [d.strip() for d in args.database.split(",") if d.strip()]
    cluster = None
    urls: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name in names:
        kind = name.removesuffix(API_SUFFIX)
        kind = kind.rpartition("@")[0] if commit_interval(name) is not None else kind
        if kind == "memory":
            urls[name] = "none"
        elif kind == "sqlite":
            urls[name] = ""
        elif kind == "postgresql":
            try:
                cluster = cluster or PostgresCluster.start(durable=True)
                urls[name] = cluster.url()
            except PostgresUnavailable as exc:
                skipped[name] = str(exc).splitlines()[0]
        else:
            urls[name] = name
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    try:
        for n in range(args.rounds):
            # Every other round in reverse order: going first or second is no one's advantage.
            for name, url in list(urls.items())[:: -1 if n % 2 else 1]:
                if name.startswith("postgresql") and cluster is not None:
                    cluster.drop_database("bench")  # the same empty start as a fresh SQLite file
                    url = cluster.url(cluster.create_database("bench"))
                rounds[name].append(await run_one(args, name, url))
    finally:
        if cluster is not None:
            cluster.stop()
    medians = {
        name: {label: round(statistics.median(_get(r, path) for r in runs), 3) for label, path in FIGURES}
        for name, runs in rounds.items()
    }
    # Each database against memory in the same round (neighbours in time), then the median.
    paired: dict[str, dict[str, float]] = {}
    if "memory" in rounds:
        for name, runs in rounds.items():
            paired[name] = {}
            for label, path in FIGURES:
                if "per CPU-s" in label:
                    each = [_get(r, path) / _get(m, path) for r, m in zip(runs, rounds["memory"], strict=True)]
                    paired[name][label] = round(statistics.median(each), 3)
    return {
        "benchmark": "signaling",
        "paired_ratios": paired,
        "rounds": args.rounds,
        "load_rate": args.load_rate,
        "runs": rounds,
        "medians": medians,
        "skipped": skipped,
    }


def print_table(r: dict[str, Any]) -> None:
    names = list(r["medians"])
    print(f"signaling benchmark, medians over {r['rounds']} round(s); load at {r['load_rate']} messages/s")
    width = max(len(label) for label, _ in FIGURES) + 2
    print("".ljust(width) + "".join(n[:14].rjust(16) for n in names))
    for label, _ in FIGURES:
        row = [r["medians"][n][label] for n in names]
        print(label.ljust(width) + "".join(f"{v:16}" for v in row))
    if "memory" in names:
        base = r["medians"]["memory"]
        for n in names:
            if n == "memory":
                continue
            ratios = [
                f"{label}: {r['medians'][n][label] / base[label]:.2f}"
                for label in ("joins per CPU-s", "fan-out deliveries per CPU-s", "load deliveries per CPU-s")
                if base[label]
            ]
            print(f"{n} / memory: " + ", ".join(ratios))
    for n, ratios in r["paired_ratios"].items():
        if n != "memory":
            each = ", ".join(f"{label}: {value:.2f}" for label, value in ratios.items())
            print(f"{n} / memory, median of per-round ratios: {each}")
    for name, why in r["skipped"].items():
        print(f"{name}: skipped ({why})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--joins", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--fanout", type=int, default=50, help="participants in the fan-out conversation")
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--load-conversations", type=int, default=100)
    parser.add_argument("--load-rate", type=float, default=1000, help="messages a second over all conversations")
    parser.add_argument("--load-seconds", type=float, default=10)
    parser.add_argument(
        "--database",
        default="memory,sqlite,postgresql",
        help="comma-separated: memory (--database none), sqlite (a fresh file), postgresql (a throwaway "
        "cluster), or database URLs; NAME@MS adds --commit-interval-ms MS (sqlite@3); NAME+api runs it "
        "with the server API on (memory+api)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat every database this many times, in turn")
    parser.add_argument(
        "--phases",
        type=lambda text: set(text.split(",")),
        default={"joins", "fanout", "load"},
        help="comma-separated, of joins, fanout, load (default: all)",
    )
    parser.add_argument(
        "--api-key",
        default="",
        help="run every target with the server API on (this key, on a free port of its own); NAME+api: one",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    arguments = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(main(arguments))
    if arguments.json:
        print(json.dumps(result))
    else:
        print_table(result)
