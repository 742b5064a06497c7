"""Delivery between gateway nodes: Redis pub/sub, one channel per node.

A node delivers what happens in a conversation to its own connections itself
(``delivery.py``); the bus carries it to the nodes where the conversation's other
participants are connected. Each event is encoded once (the client message's bytes
in an ``Envelope``) and published once per other node, never per recipient.

**Which nodes.** Every store step that touches a conversation answers where its
participants are (``RedisStore.on_placement``: a version, the nodes and the home), and every
envelope carries the sender's newest view; ``Placement`` keeps the newest per
conversation. A chat is a store step, so a conversation whose participants are all on
this node costs no Redis round trip beyond the step itself. For a conversation this
node has no view of, one script reads the placement and publishes in the same step.

**Why pub/sub, not streams.** What travels is live delivery to connected clients:
a node that is down has nobody to deliver to, and everything durable (the timeline,
chat history) is in the database, where a client that reconnects reads it. Pub/sub
costs one ``PUBLISH`` per node and no storage, trimming or consumer state; streams
would buy replay that nobody needs. What pub/sub loses is what is published while a
node's subscription reconnects (a Redis restart): counted, and the clients resync on
reconnect. Per publisher and channel, order is kept: one connection publishes in order.

**Calls** live on the conversation's home node: a participant's node sends its call
signaling there (``kind`` "call", ``home.py``) and the home node answers that one
participant (``kind`` "to"). What a participant sends on its call (``media``) is recorded
in Redis by the script that publishes the change, in the same step: a node where
someone joins later reads it for ``joined`` (``RedisStore.media``) and, whatever the
timing, has either read a change or is sent it.

**A newer connection** with an identity (``kind`` "replaced") closes the older one: a
customer's to the node that held it in that conversation, an agent's to every node (an
agent in the lobby is in no conversation). The receiving node closes its connection only
if it is older (``Store.next_version``): a notice that arrives late never closes one that
joined after it.

**The queue** goes to every node on one broadcast channel, with the store's queue
version (``Store.queue``): a node delivers a snapshot to its agents only if it is not
older than the last one they got (``Delivery.queue_to_agents``), so snapshots racing
from two nodes never go back.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from media.tasks import Tally, TaskOwner

from .redis_store import _PRELUDE, COMMAND_SECONDS, Placed, media_state, placement

log = logging.getLogger("talkgate.bus")

#: Envelopes waiting to be published; past this (Redis unreachable) new ones are dropped.
QUEUE_LIMIT = 10_000
#: Envelopes published in one round trip at most.
BATCH_LIMIT = 256
#: Conversations whose placement a node remembers (the least recently used go first).
PLACEMENT_LIMIT = 100_000
#: How long a lost subscription waits before subscribing again (seconds).
RESUBSCRIBE_SECONDS = 0.5


class Kind:
    """What an envelope is (``Envelope.kind``)."""

    #: A conversation's message for its participants here (or, without a conversation,
    #: the agent queue for the agents here).
    ROOM = ""
    #: A participant's call signaling for its conversation's home node (``home.CallRequest``).
    CALL = "call"
    #: A message for one participant here (``to``): the home node answering its call.
    TO = "to"
    #: A newer connection of participant ``to`` joined through the sender (``version``: its
    #: ``Store`` version): the older one here is replaced, in ``conversation`` (a
    #: customer's) or anywhere ("": an agent's).
    REPLACED = "replaced"


class Envelope(msgspec.Struct, array_like=True, omit_defaults=True):
    """One message between nodes."""

    #: The sending node.
    sender: str
    #: The conversation ("" for the queue).
    conversation: str
    #: The client message's type and its encoded bytes (``Kind.CALL``: the request).
    mtype: str
    data: bytes
    #: An identity that does not get it (the joiner of its own ``participant.joined``).
    skip: str | None = None
    #: The placement's version and nodes as the sender knows them; for the queue, its
    #: version; for ``Kind.REPLACED``, the newer connection's.
    version: int = 0
    nodes: list[str] | None = None
    #: A domain event the receiving node reacts to too (``delivery.REMOTE_REACTIONS``), encoded.
    event: bytes | None = None
    #: The conversation's home as the sender knows it ("" for none).
    home: str = ""
    kind: str = Kind.ROOM
    #: ``Kind.TO``: the participant it is for.
    to: str = ""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Envelope).decode
#: What waits to be published: the conversation (None: to every node), the nodes (None:
#: the conversation's, read as it is published), the envelope, and a ``media`` change to
#: record in the same step (identity and ``P md:C`` state).
Outgoing = tuple[str | None, frozenset[str] | None, bytes, tuple[str, str] | None]


class Placement:
    """Which nodes a conversation's participants are on, as this node last heard (sans-I/O)."""

    def __init__(self, node: str, limit: int = PLACEMENT_LIMIT) -> None:
        self.node = node
        self.limit = limit
        self._known: OrderedDict[str, Placed] = OrderedDict()

    def learned(self, conversation: str, placed: Placed) -> None:
        """A placement from a store step or an envelope; an older one than known is ignored."""
        known = self._known.get(conversation)
        if known is not None and known.version >= placed.version:
            return
        self._known[conversation] = placed
        self._known.move_to_end(conversation)
        while len(self._known) > self.limit:
            self._known.popitem(last=False)

    def get(self, conversation: str) -> Placed | None:
        return self._known.get(conversation)

    def clear(self) -> None:
        """Forget everything: Redis came back empty, its version counter starts again, so
        what was known would outrank the placements to come."""
        self._known.clear()

    def others(self, conversation: str) -> frozenset[str] | None:
        """The other nodes to send to (None: unknown here, ask Redis)."""
        known = self._known.get(conversation)
        return None if known is None else known.nodes - {self.node}

    def home(self, conversation: str) -> str:
        """The conversation's home as last heard ("" unknown or none)."""
        known = self._known.get(conversation)
        return "" if known is None else known.home

    def __len__(self) -> int:
        return len(self._known)


# ARGV (after the prelude's): conversation, envelope, and for a ``media`` change of a
# call here the participant and its state (recorded in the same step). Publishes it to
# every node of the conversation but this one, and answers the placement.
_FANOUT = """
local conv = ARGV[3]
if ARGV[5] then record_media(conv, ARGV[5], ARGV[6]) end
local here = placed(conv)
local seen = {}
for _, n in ipairs(redis.call('HVALS', P..'at:'..conv)) do
  if n ~= NODE and not seen[n] then
    seen[n] = true
    redis.call('PUBLISH', P..'ch:'..n, ARGV[4])
  end
end
return here
"""


class Bus:
    """This node's channel and its sender (``start``/``close``); ``receive`` gets what other
    nodes send here."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        node: str,
        receive: Callable[[Envelope], None],
        *,
        dropped: Tally | None = None,
        queue_limit: int = QUEUE_LIMIT,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.node = node
        self.receive = receive
        self.placement = Placement(node)
        self._dropped = dropped
        self._outbox: asyncio.Queue[Outgoing] = asyncio.Queue(queue_limit)
        self._owner = TaskOwner("bus", log)
        self._fanout = redis.register_script(_PRELUDE + _FANOUT)
        self._channel = f"{prefix}ch:{node}"
        self._everyone = f"{prefix}ch:*all"
        self._subscribed = asyncio.Event()
        #: Publishing fails (Redis unreachable): said once, until it works again.
        self._failing = False

    async def start(self) -> None:
        """Subscribe (before this node takes clients: nothing sent to it is missed), then send."""
        self._owner.spawn(self._listening(), "talkgate-bus-listen")
        async with asyncio.timeout(COMMAND_SECONDS):
            await self._subscribed.wait()
        self._owner.spawn(self._sending(), "talkgate-bus-send")

    async def close(self) -> None:
        await self._owner.close()

    # -- out --------------------------------------------------------------------------

    def room(
        self,
        conversation: str,
        data: bytes,
        mtype: str,
        *,
        skip: str | None = None,
        event: bytes | None = None,
        fresh: bool = False,
        everyone: bool = False,
        media: tuple[str, bool, bool] | None = None,
    ) -> None:
        """Send a conversation's message to its participants on other nodes (not waiting);
        ``fresh``: read where they are in Redis as it is published, not from ``placement``;
        ``everyone``: to every other node; ``media``: (identity, audio, video) of a call
        here, recorded in the same step as it is published."""
        targets = None if fresh or everyone or media else self.placement.others(conversation)
        if targets is not None and not targets:
            return  # everyone is here
        known = self.placement.get(conversation)
        if known is None:
            envelope = Envelope(self.node, conversation, mtype, data, skip, event=event)
        else:
            envelope = Envelope(
                self.node, conversation, mtype, data, skip, known.version, sorted(known.nodes), event, known.home
            )
        record = None if media is None else (media[0], media_state(media[1], media[2]))
        self._put(None if everyone else conversation, targets, _encode(envelope), record)

    def queue(self, data: bytes, version: int) -> None:
        """Send the agent queue (``version``: ``Store.queue``'s) to every other node's agents."""
        self._put(None, None, _encode(Envelope(self.node, "", "queue", data, version=version)))

    def call(self, home: str, conversation: str, request: bytes) -> None:
        """A participant's call signaling (``home.CallRequest``) to its conversation's home."""
        envelope = Envelope(self.node, conversation, "", request, kind=Kind.CALL)
        self._put(conversation, frozenset((home,)), _encode(envelope))

    def home_of(self, conversation: str) -> str:
        return self.placement.home(conversation)

    def to(self, node: str, conversation: str, identity: str, data: bytes, mtype: str) -> None:
        """A client message for one participant connected to ``node``."""
        envelope = Envelope(self.node, conversation, mtype, data, kind=Kind.TO, to=identity)
        self._put(conversation, frozenset((node,)), _encode(envelope))

    def replaced(self, identity: str, version: int, *, conversation: str = "", node: str | None = None) -> None:
        """A newer connection of ``identity`` joined here (``version``: its ``Store``
        version): the older one in ``conversation`` on ``node`` is replaced (a customer's),
        or the older one anywhere on every other node (None: an agent's)."""
        envelope = Envelope(self.node, conversation, "", b"", version=version, kind=Kind.REPLACED, to=identity)
        if node is None:
            self._put(None, None, _encode(envelope))
        else:
            self._put(conversation, frozenset((node,)), _encode(envelope))

    def _put(
        self,
        conversation: str | None,
        targets: frozenset[str] | None,
        payload: bytes,
        media: tuple[str, str] | None = None,
    ) -> None:
        try:
            self._outbox.put_nowait((conversation, targets, payload, media))
        except asyncio.QueueFull:
            if self._dropped is not None:
                self._dropped.inc()

    async def _sending(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < BATCH_LIMIT and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            try:
                await self._publish(batch)
            except (RedisError, TimeoutError, OSError) as exc:
                if not self._failing:  # once per outage, not once per batch
                    log.warning("the bus cannot publish (messages to other nodes are dropped): %s", exc)
                    self._failing = True
                if self._dropped is not None:
                    self._dropped.inc(len(batch))
            else:
                if self._failing:
                    log.info("the bus publishes again")
                    self._failing = False

    async def _publish(self, batch: list[Outgoing]) -> None:
        """One round trip for the whole batch, in order."""
        pipe = self.redis.pipeline(transaction=False)
        asked: list[tuple[int, str]] = []  # (reply index, conversation) of the fan-out scripts
        replies = 0
        for conversation, targets, payload, media in batch:
            if targets is not None:
                for target in sorted(targets):
                    pipe.publish(f"{self.prefix}ch:{target}", payload)
                    replies += 1
            elif conversation is None:
                pipe.publish(self._everyone, payload)
                replies += 1
            else:
                record = [] if media is None else list(media)
                await self._fanout(args=[self.prefix, self.node, conversation, payload, *record], client=pipe)
                asked.append((replies, conversation))
                replies += 1
        async with asyncio.timeout(COMMAND_SECONDS):
            results = await pipe.execute()
        for index, conversation in asked:
            placed = placement(results[index])
            if self.node in placed.nodes:
                self.placement.learned(conversation, placed)

    # -- in ---------------------------------------------------------------------------

    async def _listening(self) -> None:
        task = asyncio.current_task()
        lost = False
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(COMMAND_SECONDS):
                    await pubsub.subscribe(self._channel, self._everyone)
                if lost:
                    log.info("the bus is subscribed again")
                    lost = False
                self._subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message["type"] == "message":
                        self._heard(message["data"])
            except Exception as exc:
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc
                if not isinstance(exc, RedisError | TimeoutError | OSError):
                    raise
                if not lost:  # once per outage
                    log.warning("the bus lost its subscription (subscribing again): %s", exc)
                    lost = True
            finally:
                await _quietly_close(pubsub)
            await asyncio.sleep(RESUBSCRIBE_SECONDS)

    def _heard(self, payload: bytes) -> None:
        try:
            envelope = _decode(payload)
        except msgspec.DecodeError:
            log.warning("the bus got a message it cannot read (%d bytes): ignored", len(payload))
            return
        if envelope.sender == self.node:
            return  # the broadcast comes back to its sender
        if envelope.conversation and envelope.nodes is not None:
            placed = Placed(envelope.version, envelope.home, frozenset(envelope.nodes))
            self.placement.learned(envelope.conversation, placed)
        try:
            self.receive(envelope)
        except Exception:
            log.exception("delivering a message from node %s failed", envelope.sender)


async def _quietly_close(pubsub: Any) -> None:
    try:
        async with asyncio.timeout(1):
            await pubsub.aclose()
    except Exception:  # a dead connection may fail to close: it is dropped anyway
        log.debug("closing a pub/sub connection failed", exc_info=True)
