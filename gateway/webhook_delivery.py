"""The webhook delivery worker: sends the outbox's rows (``outbox.py``) to their endpoints,
signed per Standard Webhooks, and retries them.

- **One task per endpoint**, one request in flight each, through one ``aiohttp``
  session (connections are reused). The worker never runs in the records writer: a
  slow or dead receiver costs its own task's time (``--webhook-timeout`` per try), never
  a conversation's.
- **Order per endpoint**: the oldest pending row of an endpoint goes first, and a newer
  one is not sent while an older one waits for its retry. The trade-off is head-of-line
  blocking: one event an endpoint keeps refusing holds back the endpoint's later ones
  until it is delivered or fails for good (``--webhook-retry-hours``). Receivers get a
  conversation's events in order, and an endpoint that is down gets its backlog in
  order once it is back.
- **Retries**: anything but a 2xx (or a timeout, a refused connection) is tried again
  after an exponential backoff with full jitter (``webhooks.retry_delay``: up to
  ``FIRST_RETRY_SECONDS`` doubling, at most ``MAX_RETRY_SECONDS``) until the row is
  ``--webhook-retry-hours`` old; a try after that marks it ``failed`` (the API can
  make it pending again).
- **At least once**: a row is marked delivered after its 2xx, in batches (one statement
  per look at the outbox, at most ``BATCH`` rows, not a transaction per delivery); a
  crash before that sends those rows again after the restart, in order, with the same
  ``webhook-id`` (receivers dedupe by it).
  The writer wakes the worker after each commit that added rows (``committed``); it also
  looks every ``POLL_SECONDS``, which resumes what a restart left pending.

- **One sender per endpoint** among gateway processes sharing a PostgreSQL database: an
  endpoint's task delivers only while it holds the endpoint's advisory lock
  (``database.try_lock``), so the endpoint's rows are sent once and in order, whichever
  process wrote them. The others look every ``POLL_SECONDS`` whether the lock is free (a
  process that stops or dies frees it with its connection). Rows another process writes
  are seen by the owner's next look (within ``POLL_SECONDS``): the writer's wake-up is
  in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import math
from typing import Any

import aiohttp
import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from media.tasks import TaskOwner

from . import __version__, outbox
from .config import Config
from .database import Lock, locks_engine, try_lock
from .events import now_ms
from .metrics import Metrics
from .records import SqlRecords
from .webhooks import retry_delay, signer

log = logging.getLogger("talkgate.webhooks")

#: The first retry comes within this many seconds; each next one within twice as long.
FIRST_RETRY_SECONDS = 1.0
#: The longest wait between two tries.
MAX_RETRY_SECONDS = 3600.0
#: How often an idle endpoint's task looks at the outbox anyway (seconds).
POLL_SECONDS = 5.0
#: How often the outbox gauges are updated (seconds).
GAUGE_SECONDS = 5.0
#: How often delivered rows older than ``--webhook-retry-hours`` are deleted (seconds).
PRUNE_SECONDS = 3600.0
#: Rows one look at the outbox reads per endpoint (and one pruning transaction deletes).
BATCH = 100
_json = msgspec.json.Encoder()


class WebhookDelivery:
    """Sends the outbox of one ``SqlRecords`` to ``config.webhook_urls``."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.endpoints = config.webhook_urls
        self.retry_ms = int(config.webhook_retry_hours * 3_600_000)
        self._timeout = config.webhook_timeout
        self._signer = signer(config.webhook_secret)
        self._metrics = metrics
        self._records: SqlRecords | None = None
        #: Where the endpoints' locks take their connections (``database.locks_engine``).
        self._locks: AsyncEngine | None = None
        self._session: aiohttp.ClientSession | None = None
        self._owner = TaskOwner("webhooks", log)
        #: endpoint -> set when rows were added (the writer) or made due (the API)
        self._new = {endpoint: asyncio.Event() for endpoint in self.endpoints}
        #: endpoint -> set when a delivery was made due now (``retry``): ends a backoff wait
        self._urgent = {endpoint: asyncio.Event() for endpoint in self.endpoints}

    def committed(self) -> None:
        """The writer committed new rows: idle endpoints look at once (one waiting for a
        retry goes on waiting: the new rows queue behind its head)."""
        for event in self._new.values():
            event.set()

    def wake(self) -> None:
        """A delivery was made due now (the API's retry): every endpoint looks at once,
        one in a backoff too."""
        for endpoint in self.endpoints:
            self._urgent[endpoint].set()
            self._new[endpoint].set()

    async def start(self, records: SqlRecords) -> None:
        self._records = records
        assert records.engine is not None
        self._locks = locks_engine(records.engine)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            connector=aiohttp.TCPConnector(limit_per_host=1),
            headers={"User-Agent": f"talkgate/{__version__}"},
        )
        for endpoint in self.endpoints:
            self._owner.spawn(self._endpoint(endpoint), f"talkgate-webhooks-{len(self._owner)}")
        self._owner.spawn(self._housekeeping(), "talkgate-webhooks-housekeeping")

    async def close(self) -> None:
        """Stop sending (a request in flight is abandoned: its row stays pending)."""
        await self._owner.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._locks is not None and self._records is not None and self._locks is not self._records.engine:
            await self._locks.dispose()
        self._locks = None

    async def retry(self, delivery: int) -> outbox.Delivery | None:
        """The API's retry: make a delivery pending and due now, and tell its endpoint."""
        assert self._records is not None
        row = await self._records.retry_delivery(delivery)
        if row is not None and row.endpoint in self._urgent:
            self._urgent[row.endpoint].set()
            self._new[row.endpoint].set()
        return row

    async def _endpoint(self, endpoint: str) -> None:
        """Deliver an endpoint's rows while this process holds its lock; else wait for it."""
        assert self._locks is not None
        while True:
            lock = None
            try:
                lock = await try_lock(self._locks, f"talkgate webhooks {endpoint}")
            except Exception:
                log.warning("webhooks: the endpoint's lock could not be asked for (retrying)", exc_info=True)
            if lock is None:
                await asyncio.sleep(POLL_SECONDS)  # another process sends this endpoint's rows
                continue
            try:
                await self._own(endpoint, lock)
            finally:
                await lock.release()

    async def _own(self, endpoint: str, lock: Lock) -> None:
        """Send the endpoint's rows until the lock is lost."""
        new, urgent = self._new[endpoint], self._urgent[endpoint]
        while await lock.held():
            new.clear()
            urgent.clear()
            try:
                wait, backoff = await self._deliver_due(endpoint)
            except Exception:
                log.warning("webhooks: reading or updating the outbox failed (retrying)", exc_info=True)
                wait, backoff = POLL_SECONDS, True
            # In a backoff, new rows do not wake the task (they wait behind the head).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await (urgent if backoff else new).wait()

    async def _deliver_due(self, endpoint: str) -> tuple[float, bool]:
        """Send an endpoint's due rows, oldest first, until one must wait: how long to wait,
        and whether it is a backoff (True) or nothing is pending (False).

        Tries are recorded in batches (one statement per look at the outbox, not one
        transaction per delivery): before the outbox is read again, and on the way out. A
        crash in between sends the unrecorded ones again (at least once, in order)."""
        assert self._records is not None
        tries: list[dict[str, Any]] = []
        try:
            while True:
                if tries:
                    await self._settle(tries)
                rows = await self._records.change(functools.partial(outbox.heads, endpoint=endpoint, limit=BATCH))
                if not rows:
                    return POLL_SECONDS, False
                for row in rows:
                    now = now_ms()
                    if row.next_attempt > now:
                        return (row.next_attempt - now) / 1000, True
                    outcome, moved_on = await self._send(row)
                    tries.append(outcome)
                    if not moved_on:
                        return 0.0, False  # to be retried: the head is read again
                if len(rows) < BATCH:
                    return POLL_SECONDS, False
        finally:
            if tries:
                await self._settle(tries)

    async def _settle(self, tries: list[dict[str, Any]]) -> None:
        assert self._records is not None
        await self._records.change(functools.partial(outbox.settle, tries=list(tries)))
        tries.clear()

    async def _send(self, row: outbox.Delivery) -> tuple[dict[str, Any], bool]:
        """One try: its outcome (for ``outbox.settle``), and whether the head moved on
        (delivered or failed for good)."""
        assert self._session is not None
        body = _json.encode(row.payload)
        moment = datetime.datetime.now(datetime.UTC)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": row.msg_id,
            "webhook-timestamp": str(math.floor(moment.timestamp())),
            "webhook-signature": self._signer.sign(row.msg_id, moment, body.decode()),
        }
        error: str | None = None
        try:
            async with self._session.post(row.endpoint, data=body, headers=headers, allow_redirects=False) as reply:
                if not 200 <= reply.status < 300:
                    error = f"HTTP {reply.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        now = now_ms()
        attempts = row.attempts + 1
        status, next_attempt, delivered_at = outbox.PENDING, now, None
        if error is None:
            status, delivered_at, result = outbox.DELIVERED, now, "delivered"
        elif now >= row.created + self.retry_ms:
            status, result = outbox.FAILED, "failed"
            log.warning("webhook %s to an endpoint failed for good after %d tries: %s", row.msg_id, attempts, error)
        else:
            delay = retry_delay(attempts, FIRST_RETRY_SECONDS, MAX_RETRY_SECONDS)
            next_attempt, result = now + math.ceil(delay * 1000), "retry"
            log.info("webhook %s: try %d failed (%s); again within %.1f s", row.msg_id, attempts, error, delay)
        self._metrics.webhook_deliveries.labels(result).inc()
        outcome = outbox.try_params(
            row.id,
            status=status,
            attempts=attempts,
            next_attempt=next_attempt,
            error=error,
            delivered_at=delivered_at,
        )
        return outcome, result != "retry"

    async def _housekeeping(self) -> None:
        """The outbox gauges every ``GAUGE_SECONDS``; delivered rows older than the retry
        window deleted every ``PRUNE_SECONDS`` (from the start: bodies are copies of what
        was said, kept no longer than needed; failed rows stay for the API, until
        ``--retention-days``)."""
        assert self._records is not None
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        while True:
            if loop.time() >= next_prune:
                next_prune = loop.time() + PRUNE_SECONDS
                await self._prune()
            try:
                count, oldest = await self._records.change(outbox.depth)
            except Exception:
                log.debug("webhooks: the outbox gauges could not be read", exc_info=True)
            else:
                self._metrics.webhook_outbox_depth.set(count)
                age = 0.0 if oldest is None else max(0.0, (now_ms() - oldest) / 1000)
                self._metrics.webhook_oldest_pending_seconds.set(age)
            await asyncio.sleep(GAUGE_SECONDS)

    async def _prune(self) -> None:
        assert self._records is not None
        before = now_ms() - self.retry_ms
        try:
            prune = functools.partial(outbox.prune_delivered, before=before, limit=BATCH)
            while True:
                if await self._records.change(prune) < BATCH:
                    return
                await asyncio.sleep(0)  # in small transactions: the writer's commits get in between
        except Exception:
            log.warning("webhooks: deleting old delivered rows failed (tried again later)", exc_info=True)
