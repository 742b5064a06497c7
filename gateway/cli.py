"""The ``talkgate`` command: serve, demo, token."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click
import uvloop

from . import __version__, tokens
from .config import Config
from .errors import ConfigError
from .redis_store import new_node_id
from .server import configure_logging, run
from .workers import Supervisor, reserve_port, worker_count

log = logging.getLogger("talkgate.cli")

#: Where ``serve`` keeps its records unless --database says otherwise (the current directory).
DEFAULT_DATABASE = "sqlite:///talkgate.db"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="talkgate")
def main() -> None:
    """talkgate: chat, voice, video and speech bots for customer conversations."""


def _default(name: str) -> object:
    return Config.__dataclass_fields__[name].default


#: (option, Config field, type, help) for every limit the CLI exposes.
_LIMITS: list[tuple[str, str, type, str]] = [
    ("--history-limit", "history_limit", int, "Chat messages kept per conversation."),
    ("--max-chat-chars", "max_chat_chars", int, "Longest chat message (characters); longer get too_large."),
    ("--history-retention-seconds", "history_retention_seconds", float, "How long chat outlives a conversation."),
    ("--max-message-bytes", "max_message_bytes", int, "Largest client message parsed; larger get too_large."),
    ("--rate", "rate_per_second", float, "Messages per second per connection (sustained)."),
    ("--burst", "rate_burst", int, "Messages a connection may send at once before --rate applies."),
    ("--join-timeout", "join_timeout", float, "Seconds a connection may stay without joining."),
    ("--drain-seconds", "drain_seconds", float, "On SIGTERM, seconds live conversations may go on."),
    ("--max-connections", "max_connections", int, "Websocket connections at once; more get HTTP 503."),
    ("--max-conversations", "max_conversations", int, "Conversations at once; joins opening more get unavailable."),
    ("--max-participants", "max_participants", int, "Participants in one conversation (bot included)."),
    ("--agent-capacity", "agent_capacity", int, "Conversations one agent connection may hold at once."),
    ("--reconnect-grace-seconds", "reconnect_grace_seconds", float, "How long a lost connection's place is kept."),
    ("--bot-rate", "bot_rate_per_second", float, "Messages per second a bot may send to a conversation."),
    ("--bot-burst", "bot_rate_burst", int, "Messages a bot may send at once before --bot-rate applies."),
    ("--max-peer-connections", "max_peer_connections", int, "WebRTC peer connections this process holds."),
    ("--ping-interval", "ping_interval", float, "Seconds between websocket keepalive pings."),
    ("--ping-timeout", "ping_timeout", float, "Seconds without a pong before a connection is closed."),
    ("--vad-aggressiveness", "vad_aggressiveness", int, "webrtcvad mode, 0 (lenient) to 3 (strict)."),
    ("--vad-frame-ms", "vad_frame_ms", int, "VAD frame: 10, 20 or 30 ms."),
    ("--vad-start-ms", "vad_start_ms", int, "Voiced audio needed to start a speech segment."),
    ("--vad-stop-ms", "vad_stop_ms", int, "Silence that ends a speech segment (hangover)."),
    ("--vad-pause-ms", "vad_pause_ms", int, "A pause that sends the bot speech.paused, a hint (0: never)."),
    ("--vad-preroll-ms", "vad_preroll_ms", int, "Audio from before the start carried by a segment."),
    ("--vad-threshold", "vad_threshold", float, "--vad silero: speech probability that counts as voiced."),
    (
        "--turn-max-silence-ms",
        "turn_max_silence_ms",
        int,
        "--turn-detection smart: silence that ends a turn the model called incomplete.",
    ),
    ("--turn-threshold", "turn_threshold", float, "--turn-detection smart: probability of a complete turn."),
    ("--bot-name", "bot_name", str, "The bot's display name in chat."),
    ("--bot-connect-seconds", "bot_connect_seconds", float, "How long to retry an unreachable bot."),
    ("--bot-max-buffer-seconds", "bot_max_buffer_seconds", float, "Bot audio queued toward a customer at most."),
    ("--bot-max-backlog-seconds", "bot_max_backlog_seconds", float, "Customer speech a bot may leave unread."),
    (
        "--bot-frame-ms",
        "bot_frame_ms",
        int,
        "Customer speech per binary message to a native bot, a multiple of --vad-frame-ms (fewer writes, later audio).",
    ),
    ("--opus-complexity", "opus_complexity", int, "Opus encoder complexity for the bot's voice (0-10)."),
]


def _envvar(option: str) -> str:
    return "TALKGATE_" + option.removeprefix("--").replace("-", "_").upper()


def _server_options(f: click.decorators.FC) -> click.decorators.FC:
    """Options shared by serve and demo; each also reads TALKGATE_<NAME>."""
    options = [
        click.option("--host", envvar="TALKGATE_HOST", default="127.0.0.1", show_envvar=True, help="Address to bind."),
        click.option(
            "--secret",
            envvar="TALKGATE_SECRET",
            default="",
            show_envvar=True,
            show_default=False,
            help="HS256 secret for join tokens (32+ bytes).",
        ),
        *(
            click.option(opt, field, envvar=_envvar(opt), type=kind, default=_default(field), show_envvar=True, help=h)
            for opt, field, kind, h in _LIMITS
        ),
        click.option(
            "--allowed-origin",
            "allowed_origins",
            envvar="TALKGATE_ALLOWED_ORIGIN",
            multiple=True,
            show_envvar=True,
            help="Origin whose pages may connect, e.g. https://app.example.com (repeatable; '*': any; "
            "default: the gateway's own origin only).",
        ),
        click.option(
            "--cert",
            "tls_cert",
            envvar="TALKGATE_CERT",
            default="",
            show_envvar=True,
            help="TLS certificate chain (PEM): serve https/wss instead of http/ws.",
        ),
        click.option(
            "--key", "tls_key", envvar="TALKGATE_KEY", default="", show_envvar=True, help="TLS private key (PEM)."
        ),
        click.option(
            "--stun",
            "stun_urls",
            envvar="TALKGATE_STUN",
            multiple=True,
            show_envvar=True,
            help="STUN server URL (repeatable; env: space-separated), e.g. stun:stun.example.com:3478.",
        ),
        click.option(
            "--turn",
            "turn_urls",
            envvar="TALKGATE_TURN",
            multiple=True,
            show_envvar=True,
            help="TURN server URL (repeatable), e.g. turn:turn.example.com:3478?transport=udp.",
        ),
        click.option("--turn-username", envvar="TALKGATE_TURN_USERNAME", default="", show_envvar=True),
        click.option(
            "--turn-password", envvar="TALKGATE_TURN_PASSWORD", default="", show_envvar=True, show_default=False
        ),
        click.option(
            "--rtc-address",
            "rtc_addresses",
            envvar="TALKGATE_RTC_ADDRESS",
            multiple=True,
            show_envvar=True,
            help="Local address to advertise for WebRTC media (repeatable; default: every interface).",
        ),
        click.option(
            "--rtc-allow-network",
            "rtc_allowed_networks",
            envvar="TALKGATE_RTC_ALLOW_NETWORK",
            multiple=True,
            show_envvar=True,
            help="Network (CIDR) that client ICE candidates may point into (repeatable; default: any).",
        ),
        click.option(
            "--record",
            "record_dir",
            envvar="TALKGATE_RECORD",
            default="",
            show_envvar=True,
            metavar="DIR",
            help="Record every call into DIR (one Ogg/Opus or WebM/VP8 file per participant's track; "
            "everyone in the conversation is told).",
        ),
        click.option(
            "--video",
            envvar="TALKGATE_VIDEO",
            type=click.Choice(["forward", "transcode"]),
            default="forward",
            show_envvar=True,
            help="Video between participants: forwarded as RTP (default), or decoded and re-encoded per receiver.",
        ),
        click.option(
            "--vad",
            envvar="TALKGATE_VAD",
            type=click.Choice(["webrtc", "silero"]),
            default="webrtc",
            show_envvar=True,
            help="Voice detector: webrtcvad, or Silero VAD (hears speech under noise and music; "
            "pip install 'talkgate[ears]').",
        ),
        click.option(
            "--turn-detection",
            envvar="TALKGATE_TURN_DETECTION",
            type=click.Choice(["silence", "smart"]),
            default="silence",
            show_envvar=True,
            help="When a turn ends: after --vad-stop-ms of silence, or when the Smart Turn model, asked at "
            "each --vad-pause-ms pause, calls it complete (pip install 'talkgate[ears]').",
        ),
        click.option(
            "--bot-url",
            envvar="TALKGATE_BOT_URL",
            default="",
            show_envvar=True,
            help="Speech bot websocket the gateway dials per conversation (ws:// or wss://).",
        ),
        click.option(
            "--bot-protocol",
            envvar="TALKGATE_BOT_PROTOCOL",
            type=click.Choice(["native", "twilio"]),
            default="native",
            show_envvar=True,
            help="How the bot is spoken to.",
        ),
        click.option(
            "--bot-secret",
            envvar="TALKGATE_BOT_SECRET",
            default="",
            show_envvar=True,
            show_default=False,
            help="Sign a short-lived token (HS256, 32+ bytes secret) sent as 'Authorization: Bearer' on every "
            "bot link, so the bot can tell the gateway from anyone else (docs/bot-protocol.md).",
        ),
        click.option(
            "--bot-barge-in/--no-bot-barge-in",
            "bot_barge_in",
            envvar="TALKGATE_BOT_BARGE_IN",
            default=True,
            show_envvar=True,
            help="Hold the bot's audio the moment the customer starts talking (any bot protocol).",
        ),
        click.option(
            "--barge-in-min-ms",
            "bot_barge_in_min_ms",
            envvar="TALKGATE_BARGE_IN_MIN_MS",
            type=click.IntRange(1, 5000),
            default=300,
            show_envvar=True,
            help="Speech over the bot voiced this long interrupts it; shorter (a cough) lets it go on.",
        ),
        click.option(
            "--barge-in-hold-ms",
            "bot_barge_in_hold_ms",
            envvar="TALKGATE_BARGE_IN_HOLD_MS",
            type=click.IntRange(0, 60_000),
            default=2000,
            show_envvar=True,
            help="After an interruption, drop the bot's audio until it sends clear (native: or a mark), "
            "at most this long.",
        ),
        click.option(
            "--database",
            envvar="TALKGATE_DATABASE",
            default=None,
            show_envvar=True,
            show_default=False,
            help="Durable records: sqlite:///PATH or postgresql://USER@HOST/DB; 'none' keeps them in memory "
            "only. Default: serve: sqlite:///talkgate.db; demo: a file in its data directory.",
        ),
        click.option(
            "--retention-days",
            envvar="TALKGATE_RETENTION_DAYS",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            show_envvar=True,
            help="Delete conversations closed more than this many days ago, with their events, and customers "
            "left with none and not seen for as long (at start, then hourly). Default: keep everything.",
        ),
        click.option(
            "--commit-interval-ms",
            "commit_interval_ms",
            envvar="TALKGATE_COMMIT_INTERVAL_MS",
            type=click.FloatRange(min=0, max=1000),
            default=2.0,
            show_default=True,
            show_envvar=True,
            help="SQLite: while commits are frequent, commit at most this often; what arrives meanwhile "
            "shares the commit (less CPU per chat, a later echo under load). 0: commit at once.",
        ),
        click.option(
            "--webhook-url",
            "webhook_urls",
            envvar="TALKGATE_WEBHOOK_URLS",
            multiple=True,
            show_envvar=True,
            help="Send signed webhooks (docs/api.md) to this URL (repeatable; env: space-separated). "
            "Needs --webhook-secret and a database.",
        ),
        click.option(
            "--webhook-secret",
            envvar="TALKGATE_WEBHOOK_SECRET",
            default="",
            show_envvar=True,
            show_default=False,
            help="Standard Webhooks signing secret: whsec_ and base64 of 24 to 64 random bytes.",
        ),
        click.option(
            "--webhook-retry-hours",
            envvar="TALKGATE_WEBHOOK_RETRY_HOURS",
            type=click.FloatRange(min=0, min_open=True),
            default=24.0,
            show_envvar=True,
            help="Retry a webhook delivery (exponential backoff with jitter) for this long, then mark it failed.",
        ),
        click.option(
            "--webhook-timeout",
            envvar="TALKGATE_WEBHOOK_TIMEOUT",
            type=click.FloatRange(min=0, min_open=True),
            default=10.0,
            show_envvar=True,
            help="Seconds one webhook try may take; slower counts as a failure (and is retried).",
        ),
        click.option(
            "--api-key",
            "api_keys",
            envvar="TALKGATE_API_KEYS",
            multiple=True,
            show_envvar=True,
            help="Turn on the server API (docs/api.md) with this key, at least 24 characters (repeatable, "
            "e.g. while rotating; env: space-separated). Apps send it as 'Authorization: Bearer KEY'.",
        ),
        click.option(
            "--api-host", envvar="TALKGATE_API_HOST", default="127.0.0.1", show_envvar=True, help="API address."
        ),
        click.option(
            "--api-port",
            envvar="TALKGATE_API_PORT",
            type=click.IntRange(0, 65535),
            default=8081,
            show_envvar=True,
            help="API port, apart from the signaling port; 0 picks a free one.",
        ),
        click.option(
            "--redis",
            envvar="TALKGATE_REDIS",
            default="",
            show_envvar=True,
            show_default=False,
            help="Keep the live state (conversations, participants, the agent queue) in this Redis, "
            "redis://HOST:PORT/DB, and register this node there: every node on it is one gateway "
            "(docs/cluster.md).",
        ),
        click.option(
            "--node-id",
            envvar="TALKGATE_NODE_ID",
            default="",
            show_envvar=True,
            show_default=False,
            help="This node's id in the cluster registry (default: the host name and a random suffix).",
        ),
        click.option(
            "--workers",
            envvar="TALKGATE_WORKERS",
            default="1",
            show_envvar=True,
            help="Gateway processes on this port (SO_REUSEPORT) under one supervisor; 'auto': one per core. "
            "More than 1 needs --redis and a database they can share (PostgreSQL, or none).",
        ),
        click.option(
            "--node-port",
            envvar="TALKGATE_NODE_PORT",
            type=click.IntRange(0, 65535),
            default=None,
            show_envvar=True,
            show_default=False,
            help="With --workers: worker i serves its own /healthz and /metrics on this port + i - 1 "
            "(default: a free port each; the registry lists them: talkgate cluster status --json).",
        ),
        click.option("--reuse-port", is_flag=True, hidden=True, help="(set by --workers for its workers)"),
        click.option("--log-level", envvar="TALKGATE_LOG_LEVEL", default="INFO", show_envvar=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _serve(log_level: str, workers: str, demo_bot: str | None = None, **settings: Any) -> None:
    configure_logging(log_level.upper())
    settings["rtc_addresses"] = settings["rtc_addresses"] or None  # none given: every interface
    database = settings.get("database") or DEFAULT_DATABASE
    settings["database"] = "" if database == "none" else database
    try:
        config = Config(**settings)
        count = worker_count(workers)
        if count > 1:
            _check_shared(config, count, demo_bot)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if count > 1:
        sys.exit(_supervise(config, count))
    try:
        run(config, demo_bot=demo_bot)
    except OSError as exc:  # e.g. the port is taken
        log.error("cannot serve on %s:%s: %s", config.host, config.port, exc)
        sys.exit(1)
    except ConfigError as exc:  # found at start: Redis unreachable, another node live on it
        log.error("cannot start: %s", exc)
        sys.exit(2)


def _check_shared(config: Config, count: int, demo_bot: str | None) -> None:
    """Several workers are one gateway only on state they all share: say what is missing."""
    missing = []
    if demo_bot is not None:
        missing.append("the demo runs one process (use talkgate serve)")
    if not config.redis:
        missing.append("--redis redis://HOST:PORT/DB (the live state they share)")
    if config.database.startswith("sqlite"):
        missing.append("--database postgresql://… or none (a SQLite file is one process's)")
    if missing:
        raise ConfigError(f"--workers {count} needs " + "; ".join(missing))


def _supervise(config: Config, count: int) -> int:
    """Reserve the ports, then run ``count`` workers (``workers.Supervisor``)."""
    try:
        reserved = [reserve_port(config.host, config.port)]
        if config.api_keys:
            reserved.append(reserve_port(config.api_host, config.api_port))
    except OSError as exc:
        log.error("cannot serve on %s:%s: %s", config.host, config.port, exc)
        return 1
    port = reserved[0].getsockname()[1]
    args = [*sys.argv[1:], "--port", str(port)]
    if config.api_keys:
        args += ["--api-port", str(reserved[1].getsockname()[1])]
    host = config.host if ":" not in config.host else f"[{config.host}]"
    url = f"{'https' if config.tls_cert else 'http'}://{host}:{port}"
    supervisor = Supervisor(count, args, config.node_id or new_node_id(), url, node_port=config.node_port)
    try:
        return asyncio.run(supervisor.run())
    finally:
        for sock in reserved:
            sock.close()


@main.command()
@click.option("--port", envvar="TALKGATE_PORT", default=8080, show_envvar=True, help="Port; 0 picks a free one.")
@click.option(
    "--dev", envvar="TALKGATE_DEV", is_flag=True, show_envvar=True, help="INSECURE: allow joins without tokens."
)
@_server_options
def serve(**settings: Any) -> None:
    """Run the gateway. The first log line is the URL it listens on."""
    _serve(**settings)


@main.group()
def cluster() -> None:
    """The gateway nodes sharing a Redis (docs/cluster.md)."""


@cluster.command()
@click.option("--redis", envvar="TALKGATE_REDIS", required=True, show_envvar=True, help="redis://HOST:PORT/DB")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per node instead of the table.")
def status(redis: str, as_json: bool) -> None:
    """Print the live nodes: id, URL, load, whether draining, when last seen."""
    from .cluster import read_status, redacted
    from .redis_store import PREFIX

    try:
        nodes = asyncio.run(read_status(redis, PREFIX))
    except Exception as exc:  # unreachable, refused, a bad URL: say so, no traceback
        raise click.ClickException(f"could not read the registry at {redacted(redis)}: {exc}") from None
    if as_json:
        for node in nodes:
            click.echo(json.dumps(dataclasses.asdict(node)))
        return
    now = time.time() * 1000
    click.echo(f"{'node':28} {'url':30} {'conv':>6} {'sessions':>8} {'peers':>6} {'state':9} seen")
    for node in nodes:
        state = "draining" if node.draining else "serving"
        seen = f"{(now - node.seen) / 1000:.1f} s ago"
        click.echo(
            f"{node.id[:28]:28} {node.url[:30]:30} {node.conversations:>6} {node.sessions:>8} "
            f"{node.peer_connections:>6} {state:9} {seen}"
        )
    click.echo(f"{len(nodes)} live node(s)")


@main.command()
@click.option("--port", envvar="TALKGATE_PORT", default=0, show_envvar=True, help="Port; 0 picks a free one.")
@click.option(
    "--demo-bot",
    type=click.Choice(["assistant", "echo", "none"]),
    default="assistant",
    help="The bot customers talk to (assistant falls back to echo without talkgate[assistant]).",
)
@_server_options
def demo(demo_bot: str, **settings: Any) -> None:
    """Run a self-contained demo (dev mode on localhost, with a bot); open the printed URL."""
    if settings.get("bot_url"):
        demo_bot = "none"  # a bot of your own was given
    if not settings.get("database"):
        data = demo_data_dir()
        data.mkdir(parents=True, exist_ok=True)
        settings["database"] = f"sqlite:///{data / 'demo.db'}"  # named in the start-up lines
    _serve(dev=True, demo_bot=None if demo_bot == "none" else demo_bot, **settings)


def demo_data_dir() -> Path:
    """The demo's data directory: $TALKGATE_DATA, else $XDG_DATA_HOME/talkgate (~/.local/share)."""
    if os.environ.get("TALKGATE_DATA"):
        return Path(os.environ["TALKGATE_DATA"])
    return Path(os.environ.get("XDG_DATA_HOME") or Path("~/.local/share").expanduser()) / "talkgate"


@main.group()
def db() -> None:
    """The records database."""


@db.command()
@click.option("--database", envvar="TALKGATE_DATABASE", default=DEFAULT_DATABASE, show_envvar=True)
def upgrade(database: str) -> None:
    """Create the records database or migrate it to the current schema (serve does it too)."""
    from .records import create_engine, database_url, migrate

    async def run_upgrade() -> None:
        engine = create_engine(database_url(database))
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    configure_logging("INFO")
    try:
        asyncio.run(run_upgrade())
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"{database}: at the current schema")


@main.group()
def customer() -> None:
    """Customers in the records."""


@customer.command()
@click.argument("identity")
@click.option(
    "--database",
    envvar="TALKGATE_DATABASE",
    default=DEFAULT_DATABASE,
    show_envvar=True,
    help="The records, as serve takes them: sqlite:///PATH or postgresql://USER@HOST/DB.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Erase even while a conversation of theirs is open (a crash left it open; see docs/records.md).",
)
@click.option(
    "--record",
    "record_dir",
    envvar="TALKGATE_RECORD",
    default="",
    show_envvar=True,
    metavar="DIR",
    help="The gateway's --record directory: their call recordings there are deleted too.",
)
def erase(identity: str, database: str, force: bool, record_dir: str) -> None:
    """Erase a customer from the records (privacy requests).

    Deletes their profile, their conversations with every event in them, and the events they
    authored in other conversations, and prints how many of each. Safe while a gateway serves
    the same database; refused while the customer has an open conversation (erasing is for
    customers who are not connected)."""
    import sqlalchemy as sa

    from .records import OpenConversation, Removed, SqlRecords, create_engine, customers

    try:
        records = SqlRecords(database, recordings=Path(record_dir) if record_dir else None)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    where = records.describe()
    path = sa.engine.make_url(records.url).database
    if records.dialect == "sqlite" and not (path and Path(path).is_file()):  # not a new, empty file
        raise click.ClickException(f"no such SQLite file: {path or '(in memory)'}")

    async def run_erase() -> Removed:
        records.engine = create_engine(records.url)
        try:
            async with records.engine.connect() as conn:
                if not await conn.run_sync(lambda sync: sa.inspect(sync).has_table(customers.name)):
                    raise click.ClickException(f"no talkgate records in {where} (talkgate db upgrade creates them)")
            return await records.erase_customer(identity, force=force)
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            problem = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise click.ClickException(f"cannot use the records in {where}: {problem}") from exc
        finally:
            await records.close()

    configure_logging("WARNING")
    try:
        removed = asyncio.run(run_erase())
    except OpenConversation as exc:
        raise click.ClickException(
            f"{exc}. Erasing is for customers who are not connected: try again once they have left, or pass "
            "--force if no gateway is serving it (a crashed gateway leaves its conversations open)"
        ) from exc
    if not removed:
        click.echo(f"{identity}: nothing to erase: no profile, conversation or event of theirs in {where}")
        return
    click.echo(
        f"{identity}: erased profile {removed.customers}, conversations {removed.conversations} "
        f"(events {removed.events}), events in other conversations {removed.events_elsewhere}, "
        f"call recordings {len(removed.recordings)}"
    )


@main.command()
@click.option("--identity", required=True, help="The participant's stable id (JWT sub).")
@click.option("--role", type=click.Choice(["customer", "agent"]), required=True)
@click.option("--room", default=None, help="Conversation id; required for customers.")
@click.option("--name", default=None, help="Display name (defaults to the identity).")
@click.option("--ttl", default=3600, type=click.IntRange(min=1), help="Seconds the token stays valid.")
@click.option("--secret", envvar="TALKGATE_SECRET", required=True, show_envvar=True, help="The server's secret.")
@click.option("--url", default=None, help="Print a page URL with the token instead, e.g. http://127.0.0.1:8080")
def token(identity: str, role: str, room: str | None, name: str | None, ttl: int, secret: str, url: str | None) -> None:
    """Print a join token (what an app's backend would mint for its users)."""
    try:
        jwt = tokens.issue(secret, identity=identity, role=role, room=room, name=name, ttl=ttl)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if url:
        page = "/agent" if role == "agent" else "/"
        click.echo(f"{url.rstrip('/')}{page}?token={jwt}")
    else:
        click.echo(jwt)


def _run_bot(serving: Coroutine[Any, Any, None], log_level: str) -> None:
    """Run a reference bot on uvloop until Ctrl-C."""
    configure_logging(log_level.upper())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serving)


@main.group()
def bot() -> None:
    """Reference speech bots (they speak the native bot protocol)."""


@bot.command()
@click.option("--host", default="127.0.0.1", help="Address to bind.")
@click.option("--port", default=8765, help="Port; 0 picks a free one.")
@click.option("--opus", is_flag=True, help="Answer in Opus packets (audio.format opus), as a bot with an Opus TTS.")
@click.option("--log-level", default="INFO")
def echo(host: str, port: int, opus: bool, log_level: str) -> None:
    """Repeat every speech segment back as audio, and chat back "You said: …"."""
    from .bot import echo as echo_bot

    _run_bot(echo_bot.run(host, port, opus=opus), log_level)


@bot.command()
@click.option("--host", default="127.0.0.1", help="Address to bind.")
@click.option("--port", default=8766, help="Port; 0 picks a free one.")
@click.option("--log-level", default="INFO")
def assistant(host: str, port: int, log_level: str) -> None:
    """An offline booking assistant (pocketsphinx + espeak-ng); needs talkgate[assistant]."""
    from .bot import assistant as assistant_bot

    _run_bot(assistant_bot.run(host, port), log_level)
