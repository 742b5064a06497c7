"""One client connection: the thin I/O layer around ``SignalingProtocol``.

A session reads frames, lets the protocol object parse them, hands messages to
the broker and reports errors. Outgoing messages go through a bounded outbox
drained by the session's own writer task, so a fan-out never waits for a slow
client; a client that falls ``outbox_limit`` messages behind is disconnected
(it can reconnect and get the history) instead of growing memory. The session
owns its writer task and its join timer and ends both before it returns.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import MutableMapping
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from media.tasks import cancel_and_wait

from . import messages
from .access import CLOSE_JOIN_TIMEOUT, CLOSE_TRY_LATER, refused_join_close
from .broker import Broker
from .config import Config
from .delivery import Membership
from .errors import InternalError, ProtocolError, Unauthorized
from .messages import Participant
from .metrics import Metrics
from .protocol import SignalingProtocol, State

logger = logging.getLogger("talkgate.session")


class SessionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line with the session's conversation and identity."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        session = self.extra["session"]  # type: ignore[index]
        assert isinstance(session, Session)
        who = session.participant.identity if session.participant else "-"
        where = ",".join(session.memberships) or "-"
        return f"[{where} {who} {session.remote}] {msg}", kwargs


class Session:
    def __init__(self, ws: ServerConnection, broker: Broker, config: Config, metrics: Metrics) -> None:
        self.ws = ws
        self.broker = broker
        self.config = config
        self.metrics = metrics
        self.remote = _remote(ws)
        loop = asyncio.get_running_loop()
        self.protocol = SignalingProtocol(
            max_message_bytes=config.max_message_bytes,
            rate=config.rate_per_second,
            burst=config.rate_burst,
            now=loop.time(),
        )
        #: Set by the broker on join; None before, and after a customer leaves.
        self.participant: Participant | None = None
        #: The conversations this connection is in (agents: none while in the lobby).
        self.memberships: dict[str, Membership] = {}
        #: Its join's ``Store`` version, set by the broker: of two connections with one
        #: identity on two nodes, the one with the greater version replaces the other.
        self.version = 0
        #: Encoded messages waiting for the writer task; bounded by config.outbox_limit.
        self._outbox: collections.deque[bytes] = collections.deque()
        self._wake = asyncio.Event()
        #: Close code and reason once closing has been decided; nothing is queued after.
        self._closing: tuple[int, str] | None = None
        self._join_timer: asyncio.TimerHandle | None = None
        self.log = SessionLog(logger, {"session": self})

    # -- Peer interface (used by the broker) ------------------------------------------

    def deliver(self, data: bytes, mtype: str) -> None:
        if self._closing is not None:
            return
        if len(self._outbox) >= self.config.outbox_limit:
            self.metrics.slow_consumers.inc()
            self.log.warning("dropping a client that stopped reading (%d messages queued)", len(self._outbox))
            self._outbox.clear()
            self.close(CLOSE_TRY_LATER, "not reading messages fast enough")
            return
        self._outbox.append(data)
        self._wake.set()
        self.metrics.sent(mtype)

    def close(self, code: int, reason: str) -> None:
        if self._closing is None:
            self._closing = (code, reason)
            self.protocol.close()
            self._wake.set()

    def send_error(self, exc: ProtocolError, request: str | None = None) -> None:
        self.metrics.error_by_code[exc.code.value].inc()
        self.deliver(messages.encode(messages.error(exc.code.value, exc.message, request)), "error")

    # -- I/O --------------------------------------------------------------------------

    async def run(self) -> None:
        self.metrics.connections.inc()
        self._arm_join_timer()
        writer = asyncio.create_task(self._write_loop(), name=f"talkgate-writer-{self.remote}")
        try:
            await self._read_loop()
        finally:
            if self._join_timer is not None:
                self._join_timer.cancel()
            self.protocol.close()
            try:
                await self.broker.disconnect(self)
            finally:
                await cancel_and_wait(
                    [writer], logger, f"writer {self.remote}", failures=self.metrics.task_failures_by_owner["session"]
                )
                self.metrics.connections.dec()

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        handle_by_type = self.metrics.handle_by_type
        in_by_type = self.metrics.in_by_type
        while True:
            try:
                data = await self.ws.recv(decode=False)
            except ConnectionClosed:
                return
            event = self.protocol.receive(data, loop.time())
            if event is None:
                continue
            if isinstance(event, ProtocolError):
                self.send_error(event)
                continue
            mtype = messages.TAGS[type(event)]
            in_by_type[mtype].inc()
            started = time.perf_counter()
            try:
                await self.broker.handle(self, event)
            except ProtocolError as exc:
                self.send_error(exc, mtype)
                code = refused_join_close(exc) if isinstance(event, messages.Join) else None
                if code is not None:
                    self.log.info("join refused: %s", exc.message)
                    self.close(code, "join refused")
            except Exception:
                self.log.exception("failed to handle a %s message", mtype)
                self.send_error(InternalError("the gateway failed to handle that message; it has been logged"), mtype)
            handle_by_type[mtype].observe(time.perf_counter() - started)
            if self.protocol.state is State.AWAITING_JOIN:
                self._arm_join_timer()
            elif self._join_timer is not None:
                self._join_timer.cancel()
                self._join_timer = None

    async def _write_loop(self) -> None:
        outbox = self._outbox
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while outbox:
                    await self.ws.send(outbox.popleft(), text=True)
                if self._closing is not None:
                    await self.ws.close(*self._closing)
                    return
        except ConnectionClosed:
            return

    def _arm_join_timer(self) -> None:
        if self._join_timer is None:
            self._join_timer = asyncio.get_running_loop().call_later(self.config.join_timeout, self._join_expired)

    def _join_expired(self) -> None:
        self._join_timer = None
        if self.protocol.state is State.AWAITING_JOIN:
            self.send_error(Unauthorized(f"no join within {self.config.join_timeout:g} s"))
            self.close(CLOSE_JOIN_TIMEOUT, "join timeout")


def _remote(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
    except (TypeError, ValueError):
        return "?"
    return f"{host}:{port}"
