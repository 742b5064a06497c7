"""The node registry in Redis: which gateway processes are alive, where, and how loaded.

Each node keeps a hash ``P node:ID`` (``NodeInfo``'s fields) that expires ``NODE_TTL``
seconds after its last refresh, and refreshes it every ``REFRESH_SECONDS``. ``P nodes``
is the set of the nodes registered and not yet reaped. A node whose hash has expired is
dead (SIGKILL, a lost machine): at its next refresh, each live node looks for dead ones,
and the first to remove one from ``P nodes`` (``SREM`` answers 1 to one caller only)
reaps what it held (``on_dead``: ``RedisStore.reap``, the leaves published and
recorded). A node that stops cleanly removes its own entries.

``P`` is the store's key prefix: the registry lives beside the state it describes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from media.tasks import TaskOwner

from .errors import ConfigError
from .redis_store import COMMAND_SECONDS, as_text, connect

log = logging.getLogger("talkgate.cluster")

#: A node not refreshed for this long is dead (seconds).
NODE_TTL = 5.0
#: How often a node refreshes its entry and looks for dead nodes (seconds).
REFRESH_SECONDS = 1.5


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node says about itself (``talkgate cluster status``, ``/healthz``)."""

    id: str
    #: Its public URL (pages and websockets).
    url: str
    #: Its own ``/healthz`` and ``/metrics`` (``--workers``: ``url`` is shared by the
    #: machine's workers), "" for none.
    node_url: str = ""
    #: The address its peer connections offer (``--rtc-address``), "" for the default.
    rtc: str = ""
    version: str = ""
    #: When it started, Unix ms.
    started: int = 0
    conversations: int = 0
    sessions: int = 0
    peer_connections: int = 0
    #: It takes no new conversations (SIGTERM).
    draining: bool = False
    #: When it last refreshed, Unix ms.
    seen: int = 0

    def as_fields(self) -> dict[str, str]:
        return {k: str(int(v)) if isinstance(v, bool) else str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_fields(cls, raw: dict[Any, Any]) -> NodeInfo:
        values: dict[str, Any] = {as_text(k): as_text(v) for k, v in raw.items()}
        kinds = {f.name: f.type for f in fields(cls)}
        for name in list(values):
            if name not in kinds:
                del values[name]  # a newer node's field
            elif kinds[name] == "int":
                values[name] = int(values[name] or 0)
            elif kinds[name] == "bool":
                values[name] = values[name] == "1"
        return cls(**values)


#: ARGV: prefix, node id, TTL (ms), then the entry's fields and values. Writes the entry,
#: registers the node, answers whether the entry was there (1/0), then the registered
#: nodes whose entry has expired.
_REFRESH = """
local P, id = ARGV[1], ARGV[2]
local key = P..'node:'..id
local entry = {}
for i = 4, #ARGV do entry[#entry + 1] = ARGV[i] end
local existed = redis.call('EXISTS', key)
redis.call('HSET', key, unpack(entry))
redis.call('PEXPIRE', key, ARGV[3])
redis.call('SADD', P..'nodes', id)
local dead = {existed}
for _, node in ipairs(redis.call('SMEMBERS', P..'nodes')) do
  if redis.call('EXISTS', P..'node:'..node) == 0 then dead[#dead + 1] = node end
end
return dead
"""


class Registry:
    """This node's entry, refreshed by a task of its own (``start``/``close``)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        describe: Callable[[], Awaitable[NodeInfo]],
        on_dead: Callable[[str], Awaitable[None]],
        *,
        on_lost: Callable[[], Awaitable[None]] | None = None,
        ttl: float = NODE_TTL,
        refresh_seconds: float = REFRESH_SECONDS,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self._describe = describe
        self._on_dead = on_dead
        #: This node's entry was gone at a refresh: Redis lost its state (a restart without
        #: persistence), or this node was cut off past its expiry and reaped. What it held
        #: must be put back.
        self._on_lost = on_lost
        self._registered = False
        self.ttl = ttl
        self.refresh_seconds = refresh_seconds
        self._owner = TaskOwner("cluster", log)
        self.node: NodeInfo | None = None
        self._refresh = redis.register_script(_REFRESH)

    async def start(self) -> None:
        """Register, then keep refreshing (the first refresh, at once, reaps the nodes that
        died meanwhile: after the start-up lines)."""
        await self._register()
        self._registered = True
        self._owner.spawn(self._refreshing(), "talkgate-cluster-refresh")

    async def close(self) -> None:
        await self._owner.close()
        if self.node is not None:
            try:
                async with asyncio.timeout(COMMAND_SECONDS):
                    await self.redis.delete(self._key(self.node.id))
                    await self.redis.srem(self.prefix + "nodes", self.node.id)
            except (RedisError, TimeoutError):
                log.warning("the node's registry entry could not be removed (it expires)", exc_info=True)

    async def refresh(self) -> None:
        """Write this node's entry with a fresh expiry; reap the nodes whose entry expired."""
        async with asyncio.timeout(COMMAND_SECONDS):
            existed, dead_nodes = await self._register()
        if not existed and self._registered and self._on_lost is not None:
            log.warning("this node's registry entry was gone (Redis restarted, or this node was cut off): rebuilding")
            await self._on_lost()
        self._registered = True
        for dead in dead_nodes:
            if await self.redis.srem(self.prefix + "nodes", dead):
                log.warning("node %s stopped refreshing: reaping what it held", dead)
                await self._on_dead(dead)

    async def _register(self) -> tuple[bool, list[str]]:
        """Write this node's entry with a fresh expiry (one script: no pipeline whose
        cancellation could leave a reply unread); whether it was there, and the registered
        nodes whose entry expired."""
        node = await self._describe()
        self.node = node
        entry = [v for pair in {**node.as_fields(), "seen": str(int(time.time() * 1000))}.items() for v in pair]
        reply = await self._refresh(args=[self.prefix, node.id, int(self.ttl * 1000), *entry])
        return bool(reply[0]), sorted(as_text(v) for v in reply[1:])

    async def _refreshing(self) -> None:
        task = asyncio.current_task()
        while True:
            try:
                await self.refresh()
            except Exception as exc:
                if task is not None and task.cancelling():
                    # redis-py may turn the cancellation of a command into a ConnectionError.
                    raise asyncio.CancelledError from exc
                if isinstance(exc, RedisError | TimeoutError):
                    log.warning("the node registry could not be refreshed (retrying)", exc_info=True)
                else:
                    log.exception("reaping a dead node failed (tried again at the next refresh)")
            await asyncio.sleep(self.refresh_seconds)

    def _key(self, node: str) -> str:
        return f"{self.prefix}node:{node}"


async def live_nodes(redis: aioredis.Redis, prefix: str) -> list[NodeInfo]:
    """The nodes whose entry has not expired, by id."""
    ids = sorted(as_text(v) for v in await redis.smembers(prefix + "nodes"))
    out = []
    for node in ids:
        raw = await redis.hgetall(f"{prefix}node:{node}")
        if raw:
            out.append(NodeInfo.from_fields(raw))
    return out


async def read_status(url: str, prefix: str) -> list[NodeInfo]:
    """The live nodes of the Redis at ``url`` (``talkgate cluster status``)."""
    client = connect(url)
    try:
        async with asyncio.timeout(COMMAND_SECONDS):
            return await live_nodes(client, prefix)
    finally:
        await client.aclose()


def redacted(url: str) -> str:
    """A Redis URL without its password (for logs and errors)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


async def claim_id(redis: aioredis.Redis, prefix: str, me: str, url: str, ttl: float = NODE_TTL) -> bool:
    """Make sure no live node has this node's id (ConfigError if one does, or if Redis is
    unreachable); True if a dead one had it and was not reaped (this node's previous run,
    killed): what it held must be reaped before this one registers. A node with this id
    that stops refreshing (killed just before) is waited out, at most ``ttl`` seconds."""
    deadline = time.monotonic() + ttl + 1
    while True:
        try:
            async with asyncio.timeout(COMMAND_SECONDS):
                live = await redis.exists(f"{prefix}node:{me}")
                if not live:
                    return bool(await redis.srem(prefix + "nodes", me))
        except (RedisError, TimeoutError) as exc:
            raise ConfigError(f"Redis at {redacted(url)} is unreachable: {exc}") from exc
        if time.monotonic() > deadline:
            raise ConfigError(f"another gateway node with the id {me!r} is live on this Redis: give each its own")
        await asyncio.sleep(0.25)
