"""Server configuration: one frozen dataclass, filled by the CLI or by tests."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import secrets
import ssl
from typing import Any

from media import models
from media.vad import VadSettings

from .errors import ConfigError
from .tokens import MAX_FIELD_CHARS
from .webhooks import signer

#: What a node id may hold: it names Redis keys and channels, and is one word in replies.
_NODE_ID = re.compile(r"[A-Za-z0-9._-]+")

MIN_SECRET_BYTES = 32
#: The outbox's ``endpoint`` column holds a webhook URL.
MAX_WEBHOOK_URL_CHARS = 2000
#: An API key is a bearer secret: long enough not to be guessed.
MIN_API_KEY_CHARS = 24


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    #: 0 picks a free port; the server logs the URL it got.
    port: int = 8080
    #: HS256 secret for join tokens. Required unless ``dev``.
    secret: str = ""
    #: Insecure development mode: joins may name room/identity/role themselves.
    dev: bool = False
    #: The durable records (customers, conversations, timeline): a SQLAlchemy URL,
    #: ``sqlite:///PATH`` or ``postgresql://…``; "" keeps everything in memory only.
    database: str = ""
    #: Closed conversations are deleted from the records (with their events) this many
    #: days after they closed, and customers with no conversation left once not seen for
    #: as long; None keeps everything. Not ``history_retention_seconds``, which is how
    #: long a just-closed room can be resumed.
    retention_days: float | None = None
    #: SQLite records: the least time between two commits while they are frequent (what
    #: arrives meanwhile shares the commit); 0 commits every loop iteration that has
    #: something to write. Trades the echo's latency under load for CPU (docs/records.md).
    commit_interval_ms: float = 2.0
    #: Webhooks (docs/api.md): endpoints that hear about every conversation's events,
    #: from the records' outbox (so they need a database), signed with the Standard
    #: Webhooks secret ``whsec_<base64>``; retried for ``webhook_retry_hours``, each try
    #: given ``webhook_timeout`` seconds.
    webhook_urls: tuple[str, ...] = ()
    webhook_secret: str = ""
    webhook_retry_hours: float = 24.0
    webhook_timeout: float = 10.0
    #: The live state (who is in which conversation, the queue) in this Redis
    #: (``redis://HOST:PORT/DB``) instead of this process's memory, with this node
    #: registered there (docs/cluster.md); "" keeps it in memory.
    redis: str = ""
    #: This node's id in the registry ("" makes one: the host name and a random suffix).
    node_id: str = ""
    #: Bind the ports with SO_REUSEPORT: one of ``--workers N`` processes sharing them.
    reuse_port: bool = False
    #: A port of this node's own for ``/healthz`` and ``/metrics`` (0: a free one; None:
    #: none). ``--workers`` gives each worker one: the main port is shared by all of them,
    #: so a scrape there reaches whichever worker the kernel picks.
    node_port: int | None = None
    #: Chat messages kept per conversation and sent in ``joined``.
    history_limit: int = 100
    #: How long a conversation's chat history outlives its last participant (a customer
    #: whose browser restarts finds it again); 0 forgets it at once. In memory only.
    history_retention_seconds: float = 600.0
    max_chat_chars: int = 4096
    #: Frames larger than this are answered with ``too_large`` before parsing.
    max_message_bytes: int = 64 * 1024
    #: Token bucket per connection: sustained messages per second and burst.
    rate_per_second: float = 20.0
    rate_burst: int = 60
    #: A socket that has not joined after this many seconds is closed.
    join_timeout: float = 10.0
    #: On SIGTERM/SIGINT, how long live conversations may go on before everything is
    #: closed (new connections are refused at once).
    drain_seconds: float = 30.0
    #: Messages waiting to be written to one client; a client that falls this
    #: far behind is disconnected (it can reconnect and get the history).
    outbox_limit: int = 512
    #: Capacity limits of one gateway process (docs/security.md says what each protects).
    #: Websocket connections: more get HTTP 503 at the handshake.
    max_connections: int = 5000
    #: Conversations in the store: a join that would open one more gets ``unavailable``.
    max_conversations: int = 1000
    #: Participants in one conversation (customer, agents, bot).
    max_participants: int = 8
    #: Conversations one agent connection may hold at once (the agent desk raises it).
    agent_capacity: int = 1
    #: A participant whose connection is lost (not one that leaves) stays in its
    #: conversations this long, so a reload or a network switch resumes them unseen;
    #: 0 leaves at once.
    reconnect_grace_seconds: float = 5.0
    #: Messages per second a bot may send that reach the conversation (chat, transcript,
    #: transfer, upgrade), and the burst; more get an error back, never reach the customer.
    bot_rate_per_second: float = 20.0
    bot_rate_burst: int = 60
    #: WebRTC peer connections held by this process: an offer over it gets ``unavailable``.
    max_peer_connections: int = 500
    #: Origins whose pages may open the websocket. Empty: only the gateway's own
    #: origin; "*": any. Clients that send no Origin (not browsers) are not affected.
    allowed_origins: tuple[str, ...] = ()
    #: Websocket keepalive: a ping every interval; no pong within the timeout closes (1011).
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    #: TLS: PEM certificate chain and key; both set = serve https/wss (browsers need a
    #: secure origin for microphones anywhere but localhost).
    tls_cert: str = ""
    tls_key: str = ""
    #: STUN/TURN servers: sent to clients in ``joined`` and used by the gateway itself.
    stun_urls: tuple[str, ...] = ()
    turn_urls: tuple[str, ...] = ()
    turn_username: str = ""
    turn_password: str = ""
    #: Local addresses the gateway's WebRTC advertises (None: every interface but loopback).
    rtc_addresses: tuple[str, ...] | None = None
    #: Networks that remote ICE candidates may point into (empty: anywhere).
    rtc_allowed_networks: tuple[str, ...] = ()
    #: Video between participants: "forward" (RTP payloads passed on untouched, as an
    #: SFU) or "transcode" (decoded and encoded again per receiver: the old way, about
    #: 15 times the CPU, kept to compare against and for codecs forwarding cannot serve).
    video: str = "forward"
    #: Record every call into this directory (empty: no recording): each participant's
    #: track as received, Ogg/Opus and WebM/VP8, announced to everyone in the conversation.
    record_dir: str = ""
    #: Voice activity detection on customers' audio (docs/media.md explains the defaults).
    vad_aggressiveness: int = 3
    vad_frame_ms: int = 20
    vad_start_ms: int = 60
    vad_stop_ms: int = 500
    #: A pause this long inside speech sends the bot ``speech.paused`` (a hint); 0: never.
    vad_pause_ms: int = 200
    vad_preroll_ms: int = 200
    #: The voice detector: "webrtc" (webrtcvad) or "silero" (Silero VAD on onnxruntime: hears
    #: speech under noise and music; needs the ``ears`` extra), and Silero's threshold.
    vad: str = "webrtc"
    vad_threshold: float = 0.5
    #: When a customer's turn ends: "silence" (after ``vad_stop_ms``) or "smart" (at each
    #: pause of ``vad_pause_ms`` the Smart Turn model decides; an incomplete turn waits up
    #: to ``turn_max_silence_ms``; needs the ``ears`` extra). docs/media.md has the figures.
    turn_detection: str = "silence"
    turn_max_silence_ms: int = 2000
    turn_threshold: float = 0.5
    #: The speech bot the gateway dials per conversation ("" = no bot).
    bot_url: str = ""
    #: "native" (docs/bot-protocol.md) or "twilio" (Twilio Media Streams, bidirectional).
    bot_protocol: str = "native"
    #: Signs the token the gateway sends on each bot link (docs/bot-protocol.md); "": none.
    bot_secret: str = ""
    bot_name: str = "Assistant"
    bot_connect_seconds: float = 8.0
    bot_barge_in: bool = True
    #: Speech over the bot voiced for this long interrupts it; shorter (a cough) resumes it.
    bot_barge_in_min_ms: int = 300
    #: After an interruption, the bot's audio is dropped until it sends ``clear`` (or a
    #: native ``mark``), at most this long.
    bot_barge_in_hold_ms: int = 2000
    bot_max_buffer_seconds: float = 60.0
    #: Customer speech waiting in the gateway for a bot that does not read it; a bot
    #: that falls further behind is dropped and the conversation goes to the agent queue.
    bot_max_backlog_seconds: float = 10.0
    #: Customer speech per binary message to a native bot (a multiple of ``vad_frame_ms``):
    #: 40 or 60 ms halve or third the writes, each frame then reaching the bot up to
    #: 20 or 40 ms later (``speech.stopped`` is not later: what waits goes out before it).
    bot_frame_ms: int = 20
    #: Opus encoder complexity for audio the gateway encodes (a bot's voice): 0-10,
    #: CPU against quality; 5 costs about half of 10 (docs/media.md).
    opus_complexity: int = 5
    #: The server API (gateway/api.py, docs/api.md): off unless a key is given. Its own
    #: address, apart from the signaling port (which stays untouched; the API can stay private).
    api_keys: tuple[str, ...] = ()
    api_host: str = "127.0.0.1"
    #: 0 picks a free port; the server logs the URL it got.
    api_port: int = 8081

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, not {self.port}")
        if self.node_port is not None and not 0 <= self.node_port <= 65535:
            raise ConfigError(f"node_port must be 0..65535, not {self.node_port}")
        if not 0 <= self.api_port <= 65535:
            raise ConfigError(f"api_port must be 0..65535, not {self.api_port}")
        for key in self.api_keys:
            if len(key) < MIN_API_KEY_CHARS:
                raise ConfigError(f"an API key must be at least {MIN_API_KEY_CHARS} characters")
        if not self.secret and not self.dev:
            raise ConfigError("a token secret is required: pass --secret or set TALKGATE_SECRET (or use --dev)")
        if self.secret and len(self.secret.encode()) < MIN_SECRET_BYTES:
            # RFC 7518 3.2: an HS256 key must be at least as long as the hash.
            raise ConfigError(f"the token secret must be at least {MIN_SECRET_BYTES} bytes")
        for name in (
            "history_limit",
            "max_chat_chars",
            "max_message_bytes",
            "rate_burst",
            "outbox_limit",
            "max_connections",
            "max_conversations",
            "max_participants",
            "agent_capacity",
            "bot_rate_per_second",
            "bot_rate_burst",
            "max_peer_connections",
            "ping_interval",
            "ping_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.rate_per_second <= 0 or self.join_timeout <= 0:
            raise ConfigError("rate_per_second and join_timeout must be positive")
        if self.drain_seconds < 0 or self.history_retention_seconds < 0 or self.reconnect_grace_seconds < 0:
            raise ConfigError("drain_seconds, history_retention_seconds and reconnect_grace_seconds must be >= 0")
        if self.retention_days is not None:
            if not self.retention_days * 86400 > self.history_retention_seconds:
                raise ConfigError("retention_days must be positive and longer than history_retention_seconds")
            if not self.database:
                raise ConfigError("retention_days needs a database (--database): without one nothing is kept")
        self._check_webhooks()
        if self.redis and not self.redis.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"the Redis URL starts with redis://, rediss:// or unix://, not {self.redis[:100]!r}")
        if len(self.node_id) > MAX_FIELD_CHARS or not _NODE_ID.fullmatch(self.node_id or "x"):
            raise ConfigError(f"a node id is 1 to {MAX_FIELD_CHARS} letters, digits, '.', '_' or '-'")
        for origin in self.allowed_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ConfigError(f"an allowed origin is '*' or starts with http:// or https://, not {origin!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both --cert and --key")
        for url in self.stun_urls:
            if not url.startswith(("stun:", "stuns:")):
                raise ConfigError(f"a STUN URL starts with stun: or stuns:, not {url!r}")
        for url in self.turn_urls:
            if not url.startswith(("turn:", "turns:")):
                raise ConfigError(f"a TURN URL starts with turn: or turns:, not {url!r}")
        if self.turn_urls and not (self.turn_username and self.turn_password):
            raise ConfigError("TURN needs --turn-username and --turn-password")
        try:
            for address in self.rtc_addresses or ():
                ipaddress.ip_address(address)
            for network in self.rtc_allowed_networks:
                ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            raise ConfigError(f"bad RTC address or network: {exc}") from exc
        if self.bot_url and not self.bot_url.startswith(("ws://", "wss://")):
            raise ConfigError(f"the bot URL must start with ws:// or wss://, not {self.bot_url!r}")
        if not 0 < self.bot_barge_in_min_ms <= 5000 or not 0 <= self.bot_barge_in_hold_ms <= 60_000:
            raise ConfigError("bot_barge_in_min_ms is 1 to 5000, bot_barge_in_hold_ms 0 to 60000")
        if self.bot_secret and len(self.bot_secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"the bot secret must be at least {MIN_SECRET_BYTES} bytes")
        if self.bot_protocol not in ("native", "twilio"):
            raise ConfigError("bot_protocol must be native or twilio")
        if self.video not in ("forward", "transcode"):
            raise ConfigError("video must be forward or transcode")
        if not 0 < len(self.bot_name) <= MAX_FIELD_CHARS:
            # Like every participant's name (the records keep it, as the conversation's bot).
            raise ConfigError(f"the bot's name must be 1 to {MAX_FIELD_CHARS} characters")
        if self.bot_connect_seconds < 0 or self.bot_max_buffer_seconds <= 0 or self.bot_max_backlog_seconds <= 0:
            raise ConfigError(
                "bot_connect_seconds must be >= 0, bot_max_buffer_seconds and bot_max_backlog_seconds > 0"
            )
        if not (self.vad_frame_ms <= self.bot_frame_ms <= 200 and self.bot_frame_ms % max(1, self.vad_frame_ms) == 0):
            raise ConfigError("bot_frame_ms is a multiple of vad_frame_ms, at most 200")
        if not 0 <= self.opus_complexity <= 10:
            raise ConfigError("opus_complexity is 0 (cheapest) to 10 (best)")
        try:
            vad = self.vad_settings()
        except ValueError as exc:
            raise ConfigError(f"bad VAD setting: {exc}") from exc
        try:  # a missing model must stop the start, not the first call
            if vad.detector == "silero":
                models.require(models.SILERO_VAD)
            if vad.smart:
                models.require(models.SMART_TURN)
        except models.ModelUnavailable as exc:
            option = "--vad silero" if vad.detector == "silero" else "--turn-detection smart"
            raise ConfigError(f"{option} needs its model: {exc}") from exc

    def _check_webhooks(self) -> None:
        for url in self.webhook_urls:
            if not url.startswith(("http://", "https://")) or len(url) > MAX_WEBHOOK_URL_CHARS:
                raise ConfigError(f"a webhook URL starts with http:// or https://, not {url[:100]!r}")
        if len(set(self.webhook_urls)) != len(self.webhook_urls):
            raise ConfigError("a webhook URL is given twice")
        if self.webhook_urls and not self.database:
            raise ConfigError("webhooks need a database (--database): they are sent from its outbox")
        if self.webhook_urls and not self.webhook_secret:
            raise ConfigError("webhooks need --webhook-secret (TALKGATE_WEBHOOK_SECRET): whsec_ and base64")
        if self.webhook_secret:
            signer(self.webhook_secret)  # ConfigError if it is not whsec_ and base64
        if not self.webhook_retry_hours > 0 or not self.webhook_timeout > 0:
            raise ConfigError("webhook_retry_hours and webhook_timeout must be positive")

    def vad_settings(self) -> VadSettings:
        return VadSettings(
            aggressiveness=self.vad_aggressiveness,
            frame_ms=self.vad_frame_ms,
            start_ms=self.vad_start_ms,
            stop_ms=self.vad_stop_ms,
            pause_ms=self.vad_pause_ms,
            preroll_ms=self.vad_preroll_ms,
            detector=self.vad,
            silero_threshold=self.vad_threshold,
            turn_detection=self.turn_detection,
            turn_max_silence_ms=self.turn_max_silence_ms,
            turn_threshold=self.turn_threshold,
        )

    def ice_servers(self) -> list[dict[str, Any]]:
        """The ICE servers as browsers' RTCConfiguration.iceServers wants them."""
        servers: list[dict[str, Any]] = []
        if self.stun_urls:
            servers.append({"urls": list(self.stun_urls)})
        if self.turn_urls:
            servers.append(
                {"urls": list(self.turn_urls), "username": self.turn_username, "credential": self.turn_password}
            )
        return servers

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context, or None for plain http/ws."""
        if not self.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate or key: {exc}") from exc
        return context

    @property
    def token_secret(self) -> str:
        """The secret in force: dev mode without one gets a random per-process secret."""
        return self.secret or _DEV_SECRET


_DEV_SECRET = secrets.token_urlsafe(32)
