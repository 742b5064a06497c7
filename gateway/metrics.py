"""Prometheus metrics, one registry per server (tests run several servers per process)."""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from .errors import ErrorCode
from .messages import CLIENT_TYPES

if TYPE_CHECKING:
    from .records import Removed

#: Event-loop lag is sampled with a timer this often (~100 cheap wake-ups a second).
LAG_INTERVAL = 0.01
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Who owns a task whose failure is counted (``talkgate_task_failures_total{owner}``):
#: kinds of owner, not instances, so the series stay few.
TASK_OWNERS = ("broker", "session", "bot")
AUDIO_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1)


class FrameHistogram(Collector):
    """A histogram cheap enough to observe every 20 ms audio frame of every session.

    ``prometheus_client.Histogram.observe`` takes a lock and updates every bucket
    (~2 µs); this one is a bisect and one increment, for code that runs on the event
    loop thread only, and exposes the same cumulative buckets at scrape time.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        registry.register(self)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation)
        cumulative, buckets = 0, []
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric([], buckets, self.sum)
        yield family


async def watch_loop_lag(histogram: Histogram, interval: float = LAG_INTERVAL) -> None:
    """Observe how late a periodic timer fires, forever (the owner cancels it)."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        histogram.observe(max(0.0, loop.time() - due))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("talkgate_connections", "Open client websocket connections.", registry=r)
        self.sessions = Gauge("talkgate_sessions", "Connections that have joined.", registry=r)
        self.conversations = Gauge("talkgate_conversations", "Live conversations.", registry=r)
        self.queue_length = Gauge("talkgate_queue_length", "Conversations waiting for an agent.", registry=r)
        self.bus_dropped = Counter(
            "talkgate_bus_dropped",
            "Messages for other nodes not published (Redis unreachable, or the bus's queue full).",
            registry=r,
        )
        self.cluster_nodes = Gauge("talkgate_cluster_nodes", "Live gateway nodes on this node's Redis.", registry=r)
        self.cluster_conversations = Gauge(
            "talkgate_cluster_conversations",
            "Conversations with a participant connected to each live node, as it last reported.",
            ["node"],
            registry=r,
        )
        self.messages_in = Counter(
            "talkgate_messages_received", "Client messages received, by type.", ["type"], registry=r
        )
        self.messages_out = Counter(
            "talkgate_messages_sent", "Messages sent to clients, by type.", ["type"], registry=r
        )
        self.errors = Counter("talkgate_errors", "Errors sent to clients, by code.", ["code"], registry=r)
        self.handle_seconds = Histogram(
            "talkgate_handle_seconds",
            "Time to handle one client message, by type.",
            ["type"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
            registry=r,
        )
        # The server API: the route is its pattern (``/api/v1/conversations/{id}``), never a raw path.
        self.api_requests = Counter(
            "talkgate_api_requests", "Server API requests, by route and status.", ["route", "status"], registry=r
        )
        self.api_seconds = Histogram(
            "talkgate_api_seconds",
            "Time to answer one server API request, by route.",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.peer_connections = Gauge("talkgate_peer_connections", "Live WebRTC peer connections.", registry=r)
        self.offer_collisions = Counter(
            "talkgate_offer_collisions",
            "Client offers ignored because the gateway's own offer was pending.",
            registry=r,
        )
        self.bots = Gauge("talkgate_bots", "Live links to the speech bot (one per conversation).", registry=r)
        self.bot_bad_messages = Counter(
            "talkgate_bot_bad_messages", "Messages from bots that could not be used.", registry=r
        )
        self.bot_unavailable = Counter(
            "talkgate_bot_unavailable", "Conversations handed to agents because the bot was unreachable.", registry=r
        )
        self.bot_not_reading = Counter(
            "talkgate_bot_not_reading",
            "Bots dropped (conversation handed to agents) because they stopped reading the customer's speech.",
            registry=r,
        )
        self.bot_dropped_frames = Counter(
            "talkgate_bot_dropped_frames", "Speech frames dropped because a bot did not read them.", registry=r
        )
        self.loop_lag = Histogram(
            "talkgate_event_loop_lag_seconds",
            f"How late a {LAG_INTERVAL * 1000:g} ms timer fires: time the event loop was busy with other work.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.rtp_to_pipeline = FrameHistogram(
            "talkgate_audio_rtp_to_pipeline_seconds",
            "Customer audio: RTP packet in → its 16 kHz frame out of the voice pipeline (decode, VAD).",
            AUDIO_BUCKETS,
            r,
        )
        self.pipeline_to_bot = FrameHistogram(
            "talkgate_audio_pipeline_to_bot_seconds",
            "Customer speech: frame out of the voice pipeline → written to the bot's socket.",
            AUDIO_BUCKETS,
            r,
        )
        self.rtp_to_bot = FrameHistogram(
            "talkgate_audio_rtp_to_bot_seconds",
            "Customer speech: RTP packet in → its PCM written to the bot's socket (live frames, not preroll).",
            AUDIO_BUCKETS,
            r,
        )
        # Observed in the end-of-turn worker thread: prometheus_client's Histogram is thread-safe.
        self.turn_decision_seconds = Histogram(
            "talkgate_turn_decision_seconds",
            "End-of-turn model (--turn-detection smart): CPU time of one decision (features + model).",
            buckets=(0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5),
            registry=r,
        )
        self.turn_overloaded = Counter(
            "talkgate_turn_overloaded",
            "End-of-turn questions not asked because too many waited (that pause fell back to the hangover).",
            registry=r,
        )
        self.turn_failures = Counter(
            "talkgate_turn_failures",
            "End-of-turn decisions that raised (that pause fell back to the hangover).",
            registry=r,
        )
        self.refused_connections = Counter(
            "talkgate_refused_connections",
            "Websocket handshakes refused, by reason (origin, full).",
            ["reason"],
            registry=r,
        )
        self.slow_consumers = Counter(
            "talkgate_slow_consumer_disconnects", "Clients dropped for not reading their messages.", registry=r
        )
        self.bot_rate_limited = Counter(
            "talkgate_bot_rate_limited",
            "Bot messages refused (an error to the bot) for exceeding --bot-rate/--bot-burst.",
            registry=r,
        )
        # Webhooks (gateway/webhook_delivery.py): each try's result, and the outbox's backlog.
        self.webhook_deliveries = Counter(
            "talkgate_webhook_deliveries",
            "Webhook delivery tries, by result (delivered, retry, failed).",
            ["result"],
            registry=r,
        )
        self.webhook_outbox_depth = Gauge(
            "talkgate_webhook_outbox_depth", "Webhook deliveries pending in the outbox.", registry=r
        )
        self.webhook_oldest_pending_seconds = Gauge(
            "talkgate_webhook_oldest_pending_seconds",
            "Age of the oldest pending webhook delivery (0: none pending).",
            registry=r,
        )
        self.records_dropped = Counter(
            "talkgate_records_dropped",
            "Events not recorded because the records writer was too far behind.",
            registry=r,
        )
        self.records_expired = Counter(
            "talkgate_records_expired",
            "Rows deleted by --retention-days, by kind (conversations, events, customers).",
            ["kind"],
            registry=r,
        )
        for kind in ("conversations", "events", "customers"):
            self.records_expired.labels(kind)  # every series from the first scrape
        self.events = Counter("talkgate_events", "Domain events (docs/architecture.md), by type.", ["type"], registry=r)
        self._events_by_type: dict[type, Counter] = {}
        # Failures that were survived: logged by their owner (media.tasks), counted here.
        self.task_failures = Counter(
            "talkgate_task_failures",
            "Tasks that ended with an exception (logged with their traceback), by kind of owner.",
            ["owner"],
            registry=r,
        )
        self.task_failures_by_owner = {o: self.task_failures.labels(o) for o in TASK_OWNERS}
        self.relay_source_failures = Counter(
            "talkgate_relay_source_failures",
            "Relayed tracks whose recv() raised (the relay ended as if the track had).",
            registry=r,
        )
        self.relay_subscriber_failures = Counter(
            "talkgate_relay_subscriber_failures",
            "Frames a relay subscriber failed to take (it missed that frame; the others did not).",
            registry=r,
        )
        self.playback_step_failures = Counter(
            "talkgate_playback_step_failures",
            "20 ms bot playback steps that raised (that slot was skipped; playback went on).",
            registry=r,
        )
        self.bot_dropped_marks = Counter(
            "talkgate_bot_dropped_marks",
            "Bot marks dropped (never reported) because too many were pending.",
            registry=r,
        )
        # Create every labelled child up front: series exist from the first scrape,
        # and the hot path looks them up in a dict instead of via .labels().
        self.in_by_type = {t: self.messages_in.labels(t) for t in CLIENT_TYPES}
        self.handle_by_type = {t: self.handle_seconds.labels(t) for t in CLIENT_TYPES}
        self.error_by_code = {c.value: self.errors.labels(c.value) for c in ErrorCode}
        self._out_by_type: dict[str, Counter] = {}

    def sent(self, mtype: str, count: int = 1) -> None:
        child = self._out_by_type.get(mtype)
        if child is None:
            child = self._out_by_type[mtype] = self.messages_out.labels(mtype)
        child.inc(count)

    def expired(self, removed: Removed) -> None:
        """A retention pass's callback: counts what it removed."""
        self.records_expired.labels("conversations").inc(removed.conversations)
        self.records_expired.labels("events").inc(removed.events)
        self.records_expired.labels("customers").inc(removed.customers)

    def event(self, event: object) -> None:
        """An event consumer: counts every domain event by its type."""
        child = self._events_by_type.get(type(event))
        if child is None:
            child = self._events_by_type[type(event)] = self.events.labels(type(event).__name__)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
