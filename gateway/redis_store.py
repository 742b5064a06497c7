"""``RedisStore``: the live state (``store.Store``) in Redis, shared by gateway processes.

Each ``Store`` method is one Lua script, so a rule that reads and then writes (join
within the cluster-wide limits, one agent of many winning an accept, escalate, the
bot's claim) runs atomically in Redis: no other process can interleave. The scripts
build their keys from a prefix (``talkgate:`` by default) and the conversation id, so
this is for a single Redis server (or a primary with replicas), not Redis Cluster.

Keys (``P`` is the prefix, ``C`` a conversation id):

- ``P convs``: the set of live conversations (``max_conversations`` is its size);
- ``P m:C``: identity -> participant JSON; ``P o:C``: identity by join order (a sorted set);
- ``P h:C``: the chat history, a list of message JSON capped at ``history_limit``;
- ``P exp``: emptied conversations by when their history is forgotten (the retention
  time, at most ``retained_limit`` of them, as ``InMemoryStore`` does);
- ``P q``: waiting conversations by arrival; ``P qe``: conversation -> queue entry JSON;
- ``P at:C``: identity -> the node (process) that holds the participant; ``P np:N``: the
  participants node N holds, as conversation and identity joined by a newline (``adopt``
  moves them to a live node when N is dead); ``P pv``: conversation -> the version of its
  placement (which nodes hold its participants: ``bus.Placement``);
- ``P pc:I``: the conversations identity I is in (an agent reconnecting through another
  node finds its conversations);
- ``P qv``: the agent queue's version (``Store.queue``);
- ``P md:C``: identity -> what it sends on C's calls ("AUDIO VIDEO", 1 or 0 each), as C's
  home node recorded it when it published the change (``bus.Bus.room``), read for
  ``joined`` on the other nodes; ``P hm:N``: the conversations whose ``md`` node N wrote
  (dropped with N when it is reaped: its calls died with it);
- ``P seq``: a counter for join and arrival order, and every version (placements,
  connections: ``Store.next_version``). It and ``P qv`` start at the server's clock in
  µs (``bump``): nodes keep the newest version they heard of, so a Redis that restarts
  empty must not count from 1 again.

The retention clock is wall time by default (``time.time``): several processes must
agree on it, which their monotonic clocks do not. A Redis error is ``Unavailable`` to
the caller (the client gets ``unavailable``; nobody else's session is disturbed).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import Unavailable
from .messages import ChatMessage, Participant, QueueEntry
from .store import (
    Admission,
    Enqueued,
    EnqueueResult,
    JoinResult,
    LeaveResult,
    Limits,
    Store,
)

log = logging.getLogger("talkgate.redis")
#: The default key prefix: every key of a deployment starts with it.
PREFIX = "talkgate:"
#: How long one step may take before it is ``Unavailable`` (seconds).
COMMAND_SECONDS = 5.0
#: Connections to Redis per process at most (steps in flight at once; the bus's
#: subscription holds one).
MAX_CONNECTIONS = 64
_encode = msgspec.json.Encoder().encode
_participant = msgspec.json.Decoder(Participant).decode
_entry = msgspec.json.Decoder(QueueEntry).decode
_message = msgspec.json.Decoder(ChatMessage).decode

#: Shared by every script: ARGV[1] is the key prefix, ARGV[2] this node's id; the
#: scripts' own arguments follow.
_PRELUDE = """
local P = ARGV[1]
local function forget_expired(now)
  local gone = redis.call('ZRANGEBYSCORE', P..'exp', '-inf', now)
  for _, c in ipairs(gone) do redis.call('DEL', P..'h:'..c) end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', P..'exp', '-inf', now) end
end
local NODE = ARGV[2]
-- A counter whose values only grow, even across a Redis that restarts empty: a new one
-- starts at the server's clock in microseconds (above anything handed out before, as
-- long as fewer than a million were a second), so nodes that keep the newest version
-- they heard of do not ignore what comes after a restart.
local function bump(key)
  local v = redis.call('INCR', key)
  if v == 1 then
    local t = redis.call('TIME')
    v = tonumber(t[1]) * 1000000 + tonumber(t[2])
    redis.call('SET', key, string.format('%.0f', v))
  end
  return v
end
local function moved(conv)
  redis.call('HSET', P..'pv', conv, string.format('%.0f', bump(P..'seq')))
end
local function untag(conv, ident)
  local node = redis.call('HGET', P..'at:'..conv, ident)
  if node then
    redis.call('HDEL', P..'at:'..conv, ident)
    redis.call('SREM', P..'np:'..node, conv..'\\n'..ident)
    moved(conv)
  end
end
-- Where the conversation is: "VERSION HOME NODE NODE…", the nodes its participants are
-- held by and its home (where its calls are; '-' for none). The version grows with every
-- change, so a node keeps the newest it has heard of.
local function placed(conv)
  local seen, out = {}, {}
  for _, n in ipairs(redis.call('HVALS', P..'at:'..conv)) do
    if not seen[n] then
      seen[n] = true
      out[#out + 1] = n
    end
  end
  local home = redis.call('HGET', P..'home', conv) or '-'
  return (redis.call('HGET', P..'pv', conv) or '0')..' '..home..' '..table.concat(out, ' ')
end
-- What the conversation's calls send, as its home node recorded it: one participant's
-- entry, or (no ident) all of them (the calls were on a home that is not any more).
local function drop_media(conv, ident)
  local key = P..'md:'..conv
  if ident then redis.call('HDEL', key, ident) else redis.call('DEL', key) end
  if redis.call('EXISTS', key) == 0 then
    local home = redis.call('HGET', P..'home', conv)
    if home then redis.call('SREM', P..'hm:'..home, conv) end
  end
end
-- A participant now sends STATE ("AUDIO VIDEO") on a call of this node's: recorded only
-- if this node is the conversation's home (one that was home before, draining, still
-- ends its calls there) and the participant is in it.
local function record_media(conv, ident, state)
  if redis.call('HGET', P..'home', conv) ~= NODE then return end
  if state == '0 0' or redis.call('HEXISTS', P..'m:'..conv, ident) == 0 then
    drop_media(conv, ident)
  else
    redis.call('HSET', P..'md:'..conv, ident, state)
    redis.call('SADD', P..'hm:'..NODE, conv)
  end
end
-- The conversation's home: where it is, or this node if it has none or its home node is
-- gone (its registry entry expired, or nothing listens on its channel: a killed process's
-- connections close at once, long before its entry expires) or draining.
local function homed(conv)
  local home = redis.call('HGET', P..'home', conv)
  if home then
    local key = P..'node:'..home
    if home == NODE then return home end
    if redis.call('EXISTS', key) == 1 and redis.call('HGET', key, 'draining') ~= '1'
        and redis.call('PUBSUB', 'NUMSUB', P..'ch:'..home)[2] > 0 then
      return home
    end
  end
  drop_media(conv)  -- the calls of the home before are not this node's
  redis.call('HSET', P..'home', conv, NODE)
  moved(conv)
  return NODE
end
-- Adds (or updates) a participant held by this node; answers whether it is new, and the
-- node that held it until now ('' if none).
local function add(conv, ident, pjson, now)
  forget_expired(now)
  redis.call('ZREM', P..'exp', conv)
  local added = redis.call('HSET', P..'m:'..conv, ident, pjson)
  if added == 1 then redis.call('ZADD', P..'o:'..conv, bump(P..'seq'), ident) end
  redis.call('SADD', P..'convs', conv)
  redis.call('SADD', P..'pc:'..ident, conv)
  -- Which node holds the participant (the websocket, or the bot's link): reaped with it.
  local before = redis.call('HGET', P..'at:'..conv, ident) or ''
  untag(conv, ident)
  redis.call('HSET', P..'at:'..conv, ident, NODE)
  redis.call('SADD', P..'np:'..NODE, conv..'\\n'..ident)
  moved(conv)
  return added, before
end
local function has_role(conv, role)
  for _, v in ipairs(redis.call('HVALS', P..'m:'..conv)) do
    if cjson.decode(v).role == role then return true end
  end
  return false
end
local function unqueue(conv)
  local entry = redis.call('HGET', P..'qe', conv)
  if entry then
    redis.call('HDEL', P..'qe', conv)
    redis.call('ZREM', P..'q', conv)
    bump(P..'qv')
  end
  return entry
end
local function leave(conv, ident, now, retention, retained_limit)
  local mkey = P..'m:'..conv
  local gone = redis.call('HGET', mkey, ident)
  if not gone then return {false} end
  redis.call('HDEL', mkey, ident)
  redis.call('ZREM', P..'o:'..conv, ident)
  redis.call('SREM', P..'pc:'..ident, conv)
  untag(conv, ident)
  drop_media(conv, ident)
  local removed = redis.call('HLEN', mkey) == 0
  if removed then
    redis.call('SREM', P..'convs', conv)
    redis.call('DEL', P..'o:'..conv, P..'at:'..conv)
    redis.call('HDEL', P..'pv', conv)
    redis.call('HDEL', P..'home', conv)
    if tonumber(retention) > 0 and redis.call('EXISTS', P..'h:'..conv) == 1 then
      redis.call('ZADD', P..'exp', tonumber(now) + tonumber(retention), conv)
      while redis.call('ZCARD', P..'exp') > tonumber(retained_limit) do
        local oldest = redis.call('ZPOPMIN', P..'exp')
        redis.call('DEL', P..'h:'..oldest[1])
      end
    else
      redis.call('DEL', P..'h:'..conv)
    end
    forget_expired(now)
  end
  local customers = 0
  for _, v in ipairs(redis.call('HVALS', mkey)) do
    if cjson.decode(v).role == 'customer' then customers = customers + 1 end
  end
  local queue_changed = 0
  if customers == 0 and unqueue(conv) then queue_changed = 1 end
  return {gone, removed and 1 or 0, queue_changed, customers, placed(conv)}
end
"""

# ARGV (after the prelude's): conversation, identity, participant JSON, max conversations,
# max participants, take queue (0/1), now
_JOIN = """
local conv, ident = ARGV[3], ARGV[4]
local mkey = P..'m:'..conv
local exists = redis.call('EXISTS', mkey) == 1
if not exists then
  if redis.call('SCARD', P..'convs') >= tonumber(ARGV[6]) then return {'gateway_full'} end
elseif redis.call('HEXISTS', mkey, ident) == 0 and redis.call('HLEN', mkey) >= tonumber(ARGV[7]) then
  return {'conversation_full'}
end
local taken = false
if ARGV[8] == '1' then taken = unqueue(conv) end
local added, before = add(conv, ident, ARGV[5], ARGV[9])
homed(conv)
return {'admitted', added, exists and 0 or 1, taken or '', placed(conv), before}
"""

# ARGV: conversation, identity, participant JSON, max participants, now
_ACCEPT = """
local conv, ident = ARGV[3], ARGV[4]
local mkey = P..'m:'..conv
if redis.call('HEXISTS', P..'qe', conv) == 0 then
  if has_role(conv, 'agent') then return {'taken'} end
  return {'not_waiting'}
end
if redis.call('HEXISTS', mkey, ident) == 0 and redis.call('HLEN', mkey) >= tonumber(ARGV[6]) then
  return {'conversation_full'}
end
local taken = unqueue(conv)
local added = add(conv, ident, ARGV[5], ARGV[7])
return {'admitted', added, 0, taken, placed(conv)}
"""

# ARGV: conversation, identity, participant JSON, now
_CLAIM_BOT = """
local conv, ident = ARGV[3], ARGV[4]
local mkey = P..'m:'..conv
if redis.call('EXISTS', mkey) == 0 or redis.call('HEXISTS', mkey, ident) == 1 then return 0 end
if not has_role(conv, 'customer') or has_role(conv, 'agent') or has_role(conv, 'bot') then return 0 end
add(conv, ident, ARGV[5], ARGV[6])
return placed(conv)
"""

# ARGV: conversation, reason JSON string, since (digits), customer identity ('' = first)
_ESCALATE = """
local conv = ARGV[3]
if has_role(conv, 'agent') then return {'agent_present'} end
local waiting = redis.call('HGET', P..'qe', conv)
if waiting then return {'already_waiting', waiting} end
local who = false
for _, ident in ipairs(redis.call('ZRANGE', P..'o:'..conv, 0, -1)) do
  local v = redis.call('HGET', P..'m:'..conv, ident)
  if cjson.decode(v).role == 'customer' and (ARGV[6] == '' or ident == ARGV[6]) then
    who = v
    break
  end
end
if not who then return {'no_customer'} end
local entry = '{"conversation":'..cjson.encode(conv)..',"customer":'..who
entry = entry..',"since":'..ARGV[5]..',"reason":'..ARGV[4]..'}'
redis.call('HSET', P..'qe', conv, entry)
redis.call('ZADD', P..'q', bump(P..'seq'), conv)
bump(P..'qv')
return {'queued', entry}
"""

# ARGV: conversation, identity, now, retention seconds, retained limit, only if held here (0/1)
_LEAVE = """
if ARGV[8] == '1' and redis.call('HGET', P..'at:'..ARGV[3], ARGV[4]) ~= NODE then return {false} end
return leave(ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
"""

# ARGV: the dead node. Every participant it held is held by this node from now on (no
# one leaves here: this node gives them the grace time to reconnect). Returns
# [conversation, participant JSON, …].
_ADOPT = """
local out = {}
local dead = ARGV[3]
for _, entry in ipairs(redis.call('SMEMBERS', P..'np:'..dead)) do
  local cut = string.find(entry, '\\n', 1, true)
  local conv, ident = string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1)
  local pjson = redis.call('HGET', P..'m:'..conv, ident)
  if pjson and redis.call('HGET', P..'at:'..conv, ident) == dead then
    if dead ~= NODE then  -- (this node's own previous run: they are held here already)
      untag(conv, ident)
      redis.call('HSET', P..'at:'..conv, ident, NODE)
      redis.call('SADD', P..'np:'..NODE, entry)
    end
    table.insert(out, conv)
    table.insert(out, pjson)
  end
end
if dead ~= NODE then redis.call('DEL', P..'np:'..dead) end
-- Its calls died with it (or, its own previous run's, with that process).
for _, conv in ipairs(redis.call('SMEMBERS', P..'hm:'..dead)) do
  if redis.call('HGET', P..'home', conv) == dead then drop_media(conv) end
end
redis.call('DEL', P..'hm:'..dead)
return out
"""

# ARGV: conversation. Its placement after making sure it has a live home ('' if it does
# not exist).
_HOME = """
if redis.call('EXISTS', P..'m:'..ARGV[3]) == 0 then return '' end
homed(ARGV[3])
return placed(ARGV[3])
"""

# ARGV: identity. The live conversations it is in.
_MEMBERSHIPS = """
local out = {}
for _, conv in ipairs(redis.call('SMEMBERS', P..'pc:'..ARGV[3])) do
  if redis.call('HEXISTS', P..'m:'..conv, ARGV[3]) == 1 then out[#out + 1] = conv
  else redis.call('SREM', P..'pc:'..ARGV[3], conv) end
end
return out
"""

# ARGV: conversation. What its calls send: identity, state, identity, state…
_MEDIA = """
return redis.call('HGETALL', P..'md:'..ARGV[3])
"""

# (no arguments)
_NEXT_VERSION = """
return bump(P..'seq')
"""

# ARGV: conversation
_PARTICIPANTS = """
local ids = redis.call('ZRANGE', P..'o:'..ARGV[3], 0, -1)
if #ids == 0 then return false end
return redis.call('HMGET', P..'m:'..ARGV[3], unpack(ids))
"""

# ARGV: conversation, message JSON, history limit
_APPEND = """
local conv = ARGV[3]
if redis.call('EXISTS', P..'m:'..conv) == 0 then return 0 end
redis.call('RPUSH', P..'h:'..conv, ARGV[4])
redis.call('LTRIM', P..'h:'..conv, -tonumber(ARGV[5]), -1)
return placed(conv)
"""

# ARGV: conversation, now
_HISTORY = """
forget_expired(ARGV[4])
return redis.call('LRANGE', P..'h:'..ARGV[3], 0, -1)
"""

# (no arguments). Returns the queue's version, then the entries.
_WAITING = """
local version = tonumber(redis.call('GET', P..'qv') or '0')
local ids = redis.call('ZRANGE', P..'q', 0, -1)
if #ids == 0 then return {version} end
local out = redis.call('HMGET', P..'qe', unpack(ids))
table.insert(out, 1, version)
return out
"""


class RedisStore(Store):
    """``Store`` on a Redis server (see the module's docstring); ``close`` ends its
    connections. Several stores with the same ``prefix`` on one server are one store."""

    def __init__(
        self,
        url: str,
        *,
        history_limit: int = 100,
        retention_seconds: float = 0.0,
        retained_limit: int = 1000,
        clock: Callable[[], float] = time.time,
        prefix: str = PREFIX,
        node: str = "",
    ) -> None:
        self.url = url
        #: This process's node id: the participants it adds are its own (``reap``).
        self.node = node or new_node_id()
        self.history_limit = history_limit
        self.retention_seconds = retention_seconds
        self.retained_limit = retained_limit
        self.prefix = prefix
        self._clock = clock
        self.redis: aioredis.Redis = connect(url)
        scripts = {
            "join": _JOIN,
            "accept": _ACCEPT,
            "claim_bot": _CLAIM_BOT,
            "escalate": _ESCALATE,
            "leave": _LEAVE,
            "adopt": _ADOPT,
            "memberships": _MEMBERSHIPS,
            "home": _HOME,
            "media": _MEDIA,
            "next_version": _NEXT_VERSION,
            "participants": _PARTICIPANTS,
            "append": _APPEND,
            "history": _HISTORY,
            "waiting": _WAITING,
        }
        self._scripts = {name: self.redis.register_script(_PRELUDE + body) for name, body in scripts.items()}
        #: Told where a conversation is after each step that says so: the bus's view
        #: (``bus.Placement``).
        self.on_placement: Callable[[str, Placed], None] | None = None

    def _placed(self, conversation: str, reply: bytes | str) -> None:
        if self.on_placement is not None:
            self.on_placement(conversation, placement(reply))

    async def close(self) -> None:
        await self.redis.aclose()

    def describe(self) -> str:
        """Where the state is, for the start-up lines (no password)."""
        kw = self.redis.connection_pool.connection_kwargs
        where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"
        return f"{where} db {kw.get('db', 0)}, keys {self.prefix}*"

    async def ping(self) -> bool:
        """Whether Redis answers (``/healthz``)."""
        try:
            async with asyncio.timeout(COMMAND_SECONDS):
                return bool(await self.redis.ping())
        except (RedisError, TimeoutError):
            return False

    async def _run(self, script: str, *args: Any) -> Any:
        try:
            async with asyncio.timeout(COMMAND_SECONDS):
                return await self._scripts[script](args=[self.prefix, self.node, *args])
        except (RedisConnectionError, RedisTimeoutError, TimeoutError) as exc:
            raise Unavailable("the gateway's shared state (Redis) is unreachable; try again") from exc
        except RedisError as exc:  # a refusal (out of memory, read-only replica) or a bug
            log.error("redis refused the %s step: %s", script, exc)
            raise Unavailable("the gateway's shared state (Redis) refused that; try again") from exc

    async def join(
        self, conversation: str, participant: Participant, limits: Limits, *, take_queue: bool = False
    ) -> JoinResult:
        reply = await self._run(
            "join",
            conversation,
            participant.identity,
            _encode(participant),
            limits.max_conversations,
            limits.max_participants,
            int(take_queue),
            self._clock(),
        )
        outcome = as_text(reply[0])
        if outcome != "admitted":
            return JoinResult(Admission(outcome))
        taken = _entry(reply[3]) if reply[3] else None
        self._placed(conversation, reply[4])
        before = as_text(reply[5])
        return JoinResult(
            Admission.ADMITTED,
            added=bool(reply[1]),
            opened=bool(reply[2]),
            taken=taken,
            previous=before if before != self.node else "",
            version=placement(reply[4]).version,
        )

    async def accept(self, conversation: str, agent: Participant, limits: Limits) -> JoinResult:
        reply = await self._run(
            "accept", conversation, agent.identity, _encode(agent), limits.max_participants, self._clock()
        )
        outcome = as_text(reply[0])
        if outcome != "admitted":
            return JoinResult(Admission(outcome))
        self._placed(conversation, reply[4])
        return JoinResult(Admission.ADMITTED, added=bool(reply[1]), taken=_entry(reply[3]))

    async def claim_bot(self, conversation: str, bot: Participant) -> bool:
        reply = await self._run("claim_bot", conversation, bot.identity, _encode(bot), self._clock())
        if reply == 0:
            return False
        self._placed(conversation, reply)
        return True

    async def escalate(self, conversation: str, reason: str, since: int, customer: str | None = None) -> EnqueueResult:
        reply = await self._run("escalate", conversation, _encode(reason), str(int(since)), customer or "")
        outcome = Enqueued(as_text(reply[0]))
        return EnqueueResult(outcome, _entry(reply[1]) if len(reply) > 1 else None)

    async def leave(self, conversation: str, identity: str, *, held_here: bool = False) -> LeaveResult:
        reply = await self._run(
            "leave",
            conversation,
            identity,
            self._clock(),
            self.retention_seconds,
            self.retained_limit,
            int(held_here),
        )
        return self._left(conversation, reply)

    async def adopt(self, node: str) -> list[tuple[str, Participant]]:
        """Hold every participant ``node`` (a dead process) held, as this node's own: they
        are in their grace time here (``Broker.node_lost``). Another node's participants,
        and anyone who has rejoined through another node since, stay as they are."""
        reply = await self._run("adopt", node)
        return [(as_text(reply[i]), _participant(reply[i + 1])) for i in range(0, len(reply), 2)]

    async def memberships(self, identity: str) -> list[str]:
        return sorted(as_text(c) for c in await self._run("memberships", identity))

    async def home(self, conversation: str) -> str:
        reply = await self._run("home", conversation)
        if not reply:
            return ""
        self._placed(conversation, reply)
        return placement(reply).home

    async def media(self, conversation: str) -> list[dict[str, Any]]:
        reply = await self._run("media", conversation)
        return [media_entry(reply[i], reply[i + 1]) for i in range(0, len(reply), 2)]

    async def next_version(self) -> int:
        return int(await self._run("next_version"))

    async def participants(self, conversation: str) -> list[Participant] | None:
        reply = await self._run("participants", conversation)
        return None if reply is None else [_participant(v) for v in reply if v is not None]

    async def append_chat(self, conversation: str, message: ChatMessage) -> bool:
        reply = await self._run("append", conversation, _encode(message), self.history_limit)
        if reply == 0:
            return False
        self._placed(conversation, reply)
        return True

    async def history(self, conversation: str) -> list[ChatMessage]:
        return [_message(v) for v in await self._run("history", conversation, self._clock())]

    async def waiting(self) -> list[QueueEntry]:
        return (await self.queue())[1]

    async def queue(self) -> tuple[int, list[QueueEntry]]:
        reply = await self._run("waiting")
        return int(reply[0]), [_entry(v) for v in reply[1:] if v is not None]

    async def conversation_count(self) -> int:
        try:
            async with asyncio.timeout(COMMAND_SECONDS):
                return int(await self.redis.scard(self.prefix + "convs"))
        except (RedisError, TimeoutError) as exc:
            raise Unavailable("the gateway's shared state (Redis) is unreachable; try again") from exc

    def _left(self, conversation: str, reply: list[Any]) -> LeaveResult:
        if not reply or reply[0] is None:
            return LeaveResult(None)
        self._placed(conversation, reply[4])
        return _left(reply)


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (redis-py answers bytes unless told to decode)."""
    return value.decode() if isinstance(value, bytes) else value


def media_state(audio: bool, video: bool) -> str:
    """What a participant sends, as ``P md:C`` holds it."""
    return f"{int(audio)} {int(video)}"


def media_entry(identity: bytes | str, state: bytes | str) -> dict[str, Any]:
    """One ``P md:C`` entry as ``joined`` lists it."""
    audio, video = as_text(state).split(" ")
    return {"identity": as_text(identity), "audio": audio == "1", "video": video == "1"}


class Placed(NamedTuple):
    """Where a conversation is."""

    #: Grows with every change: of two, the newer wins.
    version: int
    #: The node its calls are on ("" for none yet).
    home: str
    #: The nodes that hold its participants, in no order.
    nodes: frozenset[str]


def placement(reply: bytes | str) -> Placed:
    """A script's ``placed`` reply."""
    version, home, *nodes = as_text(reply).split(" ")
    return Placed(int(version), "" if home == "-" else home, frozenset(n for n in nodes if n))


def _left(reply: list[Any]) -> LeaveResult:
    return LeaveResult(
        _participant(reply[0]),
        conversation_removed=bool(reply[1]),
        queue_changed=bool(reply[2]),
        customers_left=int(reply[3]),
    )


def connect(url: str) -> aioredis.Redis:
    """A client for ``url``. Its commands get no socket timeout of their own: redis-py
    would wrap each in ``asyncio.wait_for``, which on Python 3.11 can swallow a task's
    cancellation (a shutdown then hangs); callers bound them with ``asyncio.timeout``
    (``COMMAND_SECONDS``) instead. Steps beyond ``MAX_CONNECTIONS`` at once wait for a
    connection (redis-py's default pool refuses them: a burst of chats was ``unavailable``)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=COMMAND_SECONDS,
        socket_timeout=None,
        socket_connect_timeout=COMMAND_SECONDS,
    )
    return aioredis.Redis.from_pool(pool)


def new_node_id() -> str:
    """A node id unique per process start: the host's name and a random suffix."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "node"
    return f"{host}-{uuid.uuid4().hex[:6]}"
