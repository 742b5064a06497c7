"""The gateway server: websockets (HTTP + signaling) on one port, run on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import http
import logging
import signal
import time
from pathlib import Path
from types import TracebackType

import uvloop
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from media import audiolevel, ice, inbound
from media.tasks import cancel_and_wait

from . import __version__, messages
from .api import Api
from .bot import BotHandler, echo, serve_bot
from .broker import Broker
from .bus import Bus, Envelope, Kind
from .cluster import NodeInfo, Registry, claim_id, live_nodes
from .config import Config
from .errors import Unavailable
from .http import WS_PATH, Routes, origin_allowed, response
from .metrics import Metrics, watch_loop_lag
from .records import Records, SqlRecords
from .redis_store import COMMAND_SECONDS, RedisStore
from .session import Session
from .store import InMemoryStore, Store
from .webhook_delivery import WebhookDelivery

log = logging.getLogger("talkgate.server")

#: What a shutdown tells clients to wait before reconnecting: long enough for a
#: restarted process to listen again, short enough that nobody notices much.
RETRY_AFTER_MS = 2000
#: How long stopping the bots may take at shutdown (they are stopped concurrently).
BOT_STOP_SECONDS = 1.0
#: How often a drain checks whether the last conversation has ended.
DRAIN_POLL_SECONDS = 0.1

#: Call signaling from other nodes waiting to be applied here, at most.
CALLS_IN_LIMIT = 1000

#: Frames over ``max_message_bytes`` get a ``too_large`` error and the connection
#: lives on; only frames over this multiple of it make websockets close (1009).
TRANSPORT_LIMIT_FACTOR = 16


class GatewayServer:
    """One gateway process's server. ``async with GatewayServer(config) as s:`` serves on ``s.url``."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        #: A store passed in is its giver's to close.
        self._owns_store = store is None
        if store is None and config.redis:
            store = RedisStore(
                config.redis,
                node=config.node_id,
                history_limit=config.history_limit,
                retention_seconds=config.history_retention_seconds,
                retained_limit=config.max_conversations,
            )
        self.store: Store = (
            store
            if store is not None
            else InMemoryStore(
                config.history_limit, config.history_retention_seconds, retained_limit=config.max_conversations
            )
        )
        #: On a shared store, this node's entry in the registry and its channel to the
        #: other nodes (docs/cluster.md).
        self.registry: Registry | None = None
        self.bus: Bus | None = None
        if isinstance(self.store, RedisStore):
            self.registry = Registry(
                self.store.redis, self.store.prefix, self._describe, self._reap, on_lost=self._rebuild
            )
            self.bus = Bus(
                self.store.redis, self.store.prefix, self.store.node, self._heard, dropped=self.metrics.bus_dropped
            )
            self.store.on_placement = self.bus.placement.learned
        #: The webhook delivery worker (None: no ``--webhook-url``); the records' writer wakes it.
        self.webhooks = WebhookDelivery(config, self.metrics) if config.webhook_urls else None
        #: The durable records (None: in memory only, ``--database none``).
        self.records: Records | None = (
            SqlRecords(
                config.database,
                retention_seconds=config.history_retention_seconds,
                on_dropped=self.metrics.records_dropped.inc,
                retention_days=config.retention_days,
                on_expired=self.metrics.expired,
                commit_interval=config.commit_interval_ms / 1000,
                webhook_endpoints=config.webhook_urls,
                on_outbox=None if self.webhooks is None else self.webhooks.committed,
                recordings=Path(config.record_dir) if config.record_dir else None,
            )
            if config.database
            else None
        )
        self.broker = Broker(config, self.store, self.metrics, records=self.records, remote=self.bus)
        self.routes = Routes(self.health, self.render_metrics, self.admit)
        #: The server API on its own port (None: no ``--api-key``, it is off).
        self.api: Api | None = (
            Api(
                config,
                self.broker,
                self.records,
                self.metrics,
                page_url=lambda: self.url,
                wake_webhooks=None if self.webhooks is None else self.webhooks.wake,
            )
            if config.api_keys
            else None
        )
        self._ssl = config.ssl_context()
        #: Websocket connections being served (what max_connections bounds).
        self.connections = 0
        self._server: Server | None = None
        #: ``/healthz`` and ``/metrics`` on this node's own port (``Config.node_port``).
        self._node_server: Server | None = None
        self._lag_task: asyncio.Task[None] | None = None
        #: Other nodes' call signaling for this home node (``_calling``), bounded.
        self._calls_in: asyncio.Queue[Envelope] = asyncio.Queue(CALLS_IN_LIMIT)
        self._calls_task: asyncio.Task[None] | None = None
        self.port = config.port
        self._started = int(time.time() * 1000)
        #: ``drain`` began: the registry says so (no new conversation homes here).
        self._draining = False

    async def start(self) -> None:
        if self.records is not None:
            await self.records.start()  # migrated before the first client can join
        if self.registry is not None:
            await self._claim_id()
        if self.webhooks is not None:
            assert isinstance(self.records, SqlRecords)  # Config: webhooks need a database
            await self.webhooks.start(self.records)  # resumes what a restart left pending
        ice.use_host_addresses(self.config.rtc_addresses)
        audiolevel.install()
        inbound.install_demux()
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self.routes,
            server_header=f"talkgate/{__version__}",
            # Signaling messages are small; per-connection zlib state costs more than it saves.
            compression=None,
            max_size=self.config.max_message_bytes * TRANSPORT_LIMIT_FACTOR,
            ping_interval=self.config.ping_interval,
            ping_timeout=self.config.ping_timeout,
            ssl=self._ssl,
            close_timeout=5,
            reuse_port=self.config.reuse_port or None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.config.node_port is not None:
            self._node_server = await serve(
                _no_websocket,
                self.config.host,
                self.config.node_port,
                process_request=Routes(self.health, self.render_metrics, _not_here, assets={}),
                server_header=f"talkgate/{__version__}",
                ssl=self._ssl,
            )
        if self.bus is not None:
            self._calls_task = asyncio.create_task(self._calling(), name="talkgate-calls-in")
            await self.bus.start()
        if self.registry is not None:
            await self.registry.start()  # registers, and reaps the nodes that died meanwhile
        if self.api is not None:
            await self.api.start()
        self._lag_task = asyncio.create_task(watch_loop_lag(self.metrics.loop_lag), name="talkgate-loop-lag")

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"{'https' if self._ssl else 'http'}://{host}:{self.port}"

    @property
    def node_url(self) -> str | None:
        """This node's own ``/healthz`` and ``/metrics``; None without ``node_port``."""
        if self._node_server is None:
            return None
        return self.url.rsplit(":", 1)[0] + f":{self._node_server.sockets[0].getsockname()[1]}"

    @property
    def api_url(self) -> str | None:
        """The server API's base URL (``…/api/v1``); None while it is off."""
        return self.api.url if self.api is not None else None

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http") + WS_PATH

    def admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """Before a websocket handshake: refuse other sites' pages (403) and connections
        over ``max_connections`` (503 with Retry-After); None lets it through.

        Checking and counting are one step: an admitted connection counts from here until
        its TCP connection is lost, whether or not its handshake then completes."""
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, request.headers.get("Host"), self.config.allowed_origins):
            self.metrics.refused_connections.labels("origin").inc()
            log.info("refused a websocket from origin %r (not allowed: see --allowed-origin)", origin[:200])
            return response(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n", "text/plain; charset=utf-8")
        if self.connections >= self.config.max_connections:
            self.metrics.refused_connections.labels("full").inc()
            return response(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                b"too many connections; try again later\n",
                "text/plain; charset=utf-8",
                [("Retry-After", str(RETRY_AFTER_MS // 1000))],
            )
        self.connections += 1
        connection.connection_lost_waiter.add_done_callback(self._release)
        return None

    def _release(self, _: object) -> None:
        self.connections -= 1

    async def drain(self, seconds: float) -> bool:
        """Graceful shutdown, before ``close``: stop accepting connections, tell every
        client (``shutdown``) and bot (``stop``, reason ``shutdown``), then wait up to
        ``seconds`` for the conversations to end. True if they all ended in time."""
        self._draining = True
        if self.registry is not None:
            try:  # other nodes see it at once: no new homes here
                await self.registry.refresh()
            except Exception:
                log.warning("could not tell the registry this node drains", exc_info=True)
        if self._server is not None:
            # Stop listening; live connections stay. (Not Server.close(close_connections=False):
            # it is idempotent, so close() could not close the connections afterwards.)
            self._server.server.close()
        started = asyncio.get_running_loop().time()
        notice = messages.encode(messages.shutdown(RETRY_AFTER_MS))
        for peer in list(self.broker.sessions):
            peer.deliver(notice, "shutdown")
        # Every bot is stopped at once, within the drain's time (a bot that does not say
        # goodbye costs at most BOT_STOP_SECONDS, however many there are).
        await self.broker.bots.close(min(BOT_STOP_SECONDS, seconds))
        remaining = self.broker.local_conversations
        log.info("draining: %d conversations, up to %g s", remaining, seconds)
        deadline = started + seconds
        while remaining and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
            remaining = self.broker.local_conversations
        elapsed = asyncio.get_running_loop().time() - started
        if remaining:
            log.info("drain time is up after %.1f s: closing %d conversations", elapsed, remaining)
        else:
            log.info("drained in %.1f s", elapsed)
        return not remaining

    async def close(self) -> None:
        """Stop accepting, close every connection (1001 going away), wait for their handlers,
        then for the tasks the broker still owns."""
        if self.api is not None:
            await self.api.close()  # first: no app request starts changing a conversation from here on
        await self.broker.bots.close(BOT_STOP_SECONDS)
        await cancel_and_wait([self._lag_task, self._calls_task], log, "loop lag, calls from other nodes")
        for server in (self._server, self._node_server):
            if server is not None:
                server.close()
                await server.wait_closed()
        await self.broker.close(BOT_STOP_SECONDS)
        if self.webhooks is not None:
            await self.webhooks.close()  # rows being sent stay pending for the next start
        if self.records is not None:
            await self.records.close()  # after the broker: what the shutdown wrote is committed
        if self.registry is not None:
            await self.registry.close()
        if self.bus is not None:
            await self.bus.close()
        if self._owns_store:
            await self.store.close()

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _handle(self, ws: ServerConnection) -> None:
        await Session(ws, self.broker, self.config, self.metrics).run()

    async def _claim_id(self) -> None:
        """Refuse an id a live node has; reap what this id's previous run held (killed)."""
        assert isinstance(self.store, RedisStore)
        if await claim_id(self.store.redis, self.store.prefix, self.store.node, self.store.url):
            log.warning("node %s was killed before: reaping what it held", self.store.node)
            await self._reap(self.store.node)

    def _heard(self, envelope: Envelope) -> None:
        """Another node's message (``bus.Bus``)."""
        match envelope.kind:
            case Kind.ROOM if envelope.conversation:
                self.broker.heard(envelope.conversation, envelope.data, envelope.mtype, envelope.skip, envelope.event)
            case Kind.ROOM:
                self.broker.delivery.queue_to_agents(envelope.data, envelope.version)
            case Kind.TO:
                self.broker.deliver_to(envelope.conversation, envelope.to, envelope.data, envelope.mtype)
            case Kind.REPLACED:
                self.broker.replaced(envelope.conversation, envelope.to, envelope.version)
            case Kind.CALL:
                try:
                    self._calls_in.put_nowait(envelope)
                except asyncio.QueueFull:
                    log.warning("call signaling from node %s dropped: too much waiting", envelope.sender)

    async def _calling(self) -> None:
        """Other nodes' call signaling for this home node, in the order it came (an offer
        before its candidates)."""
        while True:
            envelope = await self._calls_in.get()
            try:
                await self.broker.call_request(envelope.sender, envelope.conversation, envelope.data)
            except Exception:
                log.exception("call signaling from node %s failed", envelope.sender)

    async def _describe(self) -> NodeInfo:
        assert isinstance(self.store, RedisStore)
        return NodeInfo(
            id=self.store.node,
            url=self.url,
            node_url=self.node_url or "",
            rtc=",".join(self.config.rtc_addresses or ()),
            version=__version__,
            started=self._started,
            conversations=self.broker.local_conversations,
            sessions=len(self.broker.sessions),
            peer_connections=len(self.broker.router),
            draining=self._draining,
        )

    async def _rebuild(self) -> None:
        if self.bus is not None:
            self.bus.placement.clear()
        held = await self.broker.rebuild()
        log.warning("put %d participants back in the shared state", held)

    async def _reap(self, node: str) -> None:
        assert isinstance(self.store, RedisStore)
        await self.broker.node_lost(node, await self.store.adopt(node))

    async def health(self) -> dict[str, object]:
        """What the gateway is doing; on a cluster, which node this is and whether Redis
        answers; with records, whether the database answers."""
        health = await self._health()
        if isinstance(self.store, RedisStore):
            health |= {"node": self.store.node, "redis": await self.store.ping()}
        if self.records is not None:
            health["database"] = await self.records.ping()
        return health

    async def _health(self) -> dict[str, object]:
        try:
            conversations: int | None = await self.store.conversation_count()
        except Unavailable:  # the shared state is unreachable: say so, do not fail
            conversations = None
        return {
            "status": "ok" if conversations is not None else "degraded",
            "conversations": conversations,
            "sessions": len(self.broker.sessions),
            "peer_connections": len(self.broker.router),
            "version": __version__,
            # The pages show the dev-mode join form only where it works.
            "dev": self.config.dev,
        }

    async def render_metrics(self) -> bytes:
        self.metrics.conversations.set(await self.store.conversation_count())
        self.metrics.queue_length.set(len(await self.store.waiting()))
        if isinstance(self.store, RedisStore):
            async with asyncio.timeout(COMMAND_SECONDS):
                nodes = await live_nodes(self.store.redis, self.store.prefix)
            self.metrics.cluster_nodes.set(len(nodes))
            self.metrics.cluster_conversations.clear()  # a node gone is no longer listed
            for node in nodes:
                self.metrics.cluster_conversations.labels(node.id).set(node.conversations)
        return self.metrics.render()


async def _no_websocket(ws: ServerConnection) -> None:  # pragma: no cover - _not_here refuses first
    await ws.close()


def _not_here(connection: ServerConnection, request: Request) -> Response:
    """The node port serves no websocket: clients use the shared port."""
    return response(http.HTTPStatus.NOT_FOUND, b"not found: websockets are on the main port\n", "text/plain")


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # websockets logs its own "server listening" line, alembic each migration step: ours,
    # with the URL, must come first.
    for name in ("websockets", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # WebRTC libraries log routine work at INFO (aioice: every ICE check of every call,
    # which drowned the demo's output): warnings only, unless DEBUG was asked for.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("aioice", "aiortc"):
            logging.getLogger(name).setLevel(logging.WARNING)


def freeze_startup_objects() -> None:
    """Take what startup built (modules, classes, the server: about 140,000 objects, nearly
    all of them alive until the process ends) out of the cyclic garbage collector's sight.

    A full collection walks every tracked object and stalls the event loop meanwhile: at
    100 voice sessions the longest took 120 ms with these included and 75 ms without
    (one run each, while the sessions were set up; benchmarks/README.md). What is frozen
    is still freed by reference counting; only a reference cycle among frozen objects
    would never be collected, and startup's objects do not die. Done once per serving
    process (in-process test servers are not frozen: their tests come and go)."""
    gc.collect()
    gc.freeze()


async def serve_until_signalled(config: Config, *, demo_bot: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM; ``demo_bot`` ("assistant" or "echo") also runs that bot in-process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        if demo_bot is not None:
            handler, name = await demo_bot_handler(demo_bot)
            bot_server = await stack.enter_async_context(serve_bot(handler, "127.0.0.1", 0))
            port = bot_server.sockets[0].getsockname()[1]
            config = dataclasses.replace(config, bot_url=f"ws://127.0.0.1:{port}/", bot_name=name)
        server = await stack.enter_async_context(GatewayServer(config))
        freeze_startup_objects()
        log.info("talkgate listening on %s", server.url)
        if server.api_url is not None:
            log.info("api listening on %s", server.api_url)
        if isinstance(server.store, RedisStore):
            log.info("live state: Redis %s, node %s", server.store.describe(), server.store.node)
        if server.node_url is not None:
            log.info("this node's /healthz and /metrics: %s", server.node_url)
        if server.records is not None:
            log.info("records: %s", server.records.describe())
        else:
            log.info("records: in memory only (--database none): a restart forgets every conversation")
        if config.dev:
            log.warning(
                "INSECURE --dev mode: clients may join any room as anyone without a token. "
                "Never expose this server to a network."
            )
            log.info("customer page: %s/   agent console: %s/agent", server.url, server.url)
        if demo_bot is not None:
            log.info("demo bot: %s; 'Talk to a human' hands over to an agent", config.bot_name)
        await stop.wait()
        log.info("shutting down (a second signal skips the drain)")
        stop.clear()
        drain = asyncio.create_task(server.drain(config.drain_seconds), name="talkgate-drain")
        second = asyncio.create_task(stop.wait(), name="talkgate-second-signal")
        await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
        await cancel_and_wait([drain, second], log, "shutdown")


async def demo_bot_handler(kind: str) -> tuple[BotHandler, str]:
    """The booking assistant (when its recogniser is installed) or the echo bot, ready: the
    assistant's model is loaded here, before the gateway listens (loaded on the first call,
    it stalled this event loop, the gateway's too, past the gateway's dial timeout: "bot
    unreachable")."""
    if kind == "assistant":
        try:
            import pocketsphinx  # noqa: F401
        except ImportError:
            log.info("pocketsphinx is not installed (pip install 'talkgate[assistant]'): using the echo bot")
        else:
            from .bot import assistant

            recognizers = assistant.Recognizers()
            await asyncio.to_thread(recognizers.preload)
            return assistant.handler(recognizers), "Booking assistant"
    return echo.handle, "Echo bot"


def run(config: Config, *, demo_bot: str | None = None) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_until_signalled(config, demo_bot=demo_bot))
