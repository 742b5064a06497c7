"""Prometheus metrics, one registry per server (tests run several servers per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .errors import ErrorCode
from .messages import CLIENT_TYPES


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("talkgate_connections", "Open client websocket connections.", registry=r)
        self.sessions = Gauge("talkgate_sessions", "Connections that have joined.", registry=r)
        self.conversations = Gauge("talkgate_conversations", "Live conversations.", registry=r)
        self.queue_length = Gauge("talkgate_queue_length", "Conversations waiting for an agent.", registry=r)
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
        self.bot_dropped_frames = Counter(
            "talkgate_bot_dropped_frames", "Speech frames dropped because a bot did not read them.", registry=r
        )
        self.slow_consumers = Counter(
            "talkgate_slow_consumer_disconnects", "Clients dropped for not reading their messages.", registry=r
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
