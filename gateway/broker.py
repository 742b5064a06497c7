"""The broker: a thin dispatcher from client messages to the conversation core.

For each client message the broker finds the conversation it is about (a connection
may be in several), asks the rules (``conversation.py``), the calls (``calls.py``) or
the consent requests for the change, and hands the resulting domain events to their
consumers: the wire encoder (``delivery.py``), metrics, and its own reactions (a
customer's chat goes to the bot; an agent's arrival stops the bot; an ended
conversation's per-process state is dropped). What clients read of the past (the chat
in ``joined``, customer cards, ``history`` pages) comes from ``history.py``. It
implements ``BotHost`` for the bot manager. Every client-caused failure is raised as a
``ProtocolError`` for the session.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from media.ears import Ears
from media.pipeline import VoicePipeline
from media.playback import PlaybackTrack
from media.relay import Relay, Subscriber
from media.tasks import TaskOwner

from . import access, messages
from . import events as ev
from .access import CLOSE_REPLACED
from .bot.manager import BotManager
from .calls import Calls, RtcSettings
from .config import Config
from .conversation import MAX_REASON_CHARS, Conversations, Upgrades
from .delivery import Connection, Delivery, remote_reaction, target
from .errors import BadRequest, Conflict, Forbidden, NotFound, ProtocolError, TooLarge, Unauthorized, Unavailable
from .events import now_ms
from .history import History
from .home import CallHomes, Cluster, Op, read_message, read_request
from .messages import Participant, Role
from .metrics import Metrics
from .recording import Recordings
from .records import Records, RecordsError
from .routing import Router
from .store import Admission, Limits, Store

log = logging.getLogger("talkgate.broker")

_PONG = messages.encode({"type": "pong"})
#: What the customer reads when the app puts the conversation in the agent queue.
ESCALATE_APP_NOTICE = "An agent will join shortly."
#: The leaving reason of a participant whose connection was lost and did not come back.
DISCONNECTED = "disconnected"
#: The leaving reason of the participants a dead node held that did not come back.
NODE_LOST = "node_lost"
#: The queue reason of a conversation whose agent's connection (or node) was lost.
AGENT_LOST = "agent_lost"
AGENT_LOST_NOTICE = "The agent was disconnected. Another agent will join shortly."

Consumer = Callable[[ev.Event], None]
#: The client messages that are call signaling (applied on the conversation's home node).
CallMessage = (
    messages.Offer | messages.Answer | messages.Candidate | messages.Hangup | messages.Upgrade | messages.UpgradeReply
)


@dataclass(eq=False)
class Away:
    """A participant whose connection was lost, kept in a conversation for the grace time."""

    participant: Participant
    #: Sleeps out the grace time, then makes the participant leave; cancelled on return.
    expiry: asyncio.Task[None]


class Broker:
    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        *,
        records: Records | None = None,
        remote: Cluster | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        #: The durable records: every event is written there, and what ``apply`` publishes
        #: only once it is committed (a chat's echo is its delivery receipt).
        self.records = records
        #: Tasks the broker starts and does not await at once (a bot stopping, a replaced
        #: call closing): named, failures logged, cancelled on close.
        self.tasks = TaskOwner("broker", log, failures=metrics.task_failures_by_owner["broker"])
        self.conversations = Conversations(
            store, Limits(max_conversations=config.max_conversations, max_participants=config.max_participants)
        )
        self.upgrades = Upgrades()
        #: ``remote``: the other nodes of a cluster (``bus.Bus``).
        self.delivery = Delivery(remote=remote)
        #: Where calls are when the conversation's home is another node (``home.py``).
        self.homes = CallHomes(remote) if remote is not None else None
        metrics.sessions.set_function(lambda: len(self.delivery.sessions))
        self.ice_servers_json = config.ice_servers()
        #: The voice detectors' and end-of-turn models, loaded once for every call here.
        self.ears = Ears(
            config.vad_settings(),
            turn_timer=metrics.turn_decision_seconds,
            turn_overloaded=metrics.turn_overloaded,
            turn_failures=metrics.turn_failures,
        )
        self.calls = Calls(
            settings=RtcSettings.of(
                self.ice_servers_json, config.rtc_allowed_networks, forward_video=config.video == "forward"
            ),
            ears=self.ears,
            max_peer_connections=config.max_peer_connections,
            emit=self.publish,
            clock=now_ms,
            tasks=self.tasks,
            pipeline_timer=metrics.rtp_to_pipeline,
            make_relay=functools.partial(
                Relay,
                reader_failures=metrics.relay_source_failures,
                subscriber_failures=metrics.relay_subscriber_failures,
            ),
            recordings=(
                Recordings(Path(config.record_dir), emit=self.publish, clock=now_ms, tasks=self.tasks)
                if config.record_dir
                else None
            ),
            pipeline_failures=metrics.relay_subscriber_failures,
        )
        self.calls.on_pipeline = self._pipeline_created
        metrics.peer_connections.set_function(lambda: len(self.calls))
        #: Each conversation's link to the speech bot, if the gateway has one.
        self.bots = BotManager(config, metrics, self, self.tasks)
        #: Everything that reacts to domain events, in order (records and webhooks join here).
        self.consumers: list[Consumer] = [self.delivery, metrics.event, self._react]
        #: What clients read of the past: the chat in ``joined``, customer cards, history pages.
        self.history = History(records, store, history_limit=config.history_limit)
        #: (conversation, identity) -> a participant whose connection was lost, in its grace time
        self._away: dict[tuple[str, str], Away] = {}
        self._closing = False

    # -- views used by the server and tests ---------------------------------------------

    @property
    def sessions(self) -> set[Connection]:
        return self.delivery.sessions

    @property
    def router(self) -> Router:
        return self.calls.router

    @property
    def rtc(self) -> RtcSettings:
        return self.calls.settings

    @property
    def local_conversations(self) -> int:
        """Conversations with a participant connected to this process (what a drain waits for;
        the store's count covers every gateway process sharing it)."""
        return len(self.delivery.rooms)

    async def close(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109 (a grace period for owned tasks)
        """Shutdown: participants still in their grace time leave now (the store stays
        consistent for other processes), bots stop, owned tasks end."""
        self._closing = True
        for key, away in list(self._away.items()):
            if self._away.pop(key, None) is away:  # not returned or expired meanwhile
                away.expiry.cancel()
                await self._depart(key[0], away.participant, DISCONNECTED, held_here=True)
        await self.bots.close(timeout)
        if self.calls.recordings is not None:
            await self.calls.recordings.close()  # the files end properly, and the timeline says so
        await self.tasks.close(timeout)
        self.ears.close()

    # -- events -------------------------------------------------------------------------

    def publish(self, events: list[ev.Event], *, recorded: bool = False) -> None:
        """Hand events to every consumer; a failing consumer is logged and the others still run.
        Unless ``recorded`` already, they are queued for the records (in order, not awaited)."""
        if self.records is not None and not recorded:
            self.records.submit(events)
        for event in events:
            for consumer in self.consumers:
                try:
                    consumer(event)
                except Exception:
                    log.exception("an event consumer failed on %s", type(event).__name__)

    async def apply(self, events: list[ev.Event]) -> None:
        """Record (committed before anyone is told), ``publish``, then give every agent the
        new queue if it changed.

        If the records refuse the write, the live state has changed already (someone joined,
        left, was queued): that is published all the same, so nobody sees a ghost, and the
        writer has logged what the records miss. A chat is not: nothing unrecorded is
        acknowledged, and the caller gets ``unavailable``."""
        withheld = False
        if self.records is not None and events:
            try:
                await self.records.write(events)
            except RecordsError:
                kept = [e for e in events if not isinstance(e, ev.ChatPosted)]
                withheld = len(kept) < len(events)
                events = kept
        self.publish(events, recorded=True)
        if any(isinstance(event, ev.QUEUE_EVENTS) for event in events):
            await self.publish_queue()
        if withheld:
            raise Unavailable("the gateway could not store that; try again")

    def apply_soon(self, events: list[ev.Event], conn: Connection, request: str) -> None:
        """``apply`` without waiting for the commit, for events that change no queue (a
        chat): the connection's next message is handled meanwhile, and a connection sending
        fast gets its messages committed together. The writer commits in submission order
        and publishes each batch once it is committed, so everything is still published in
        order and nobody hears of a message before it is stored. A failed commit is an
        error to ``conn`` (``request`` names what failed)."""
        if self.records is None:
            self.publish(events, recorded=True)
            return

        def committed(error: BaseException | None) -> None:
            if error is None:
                self.publish(events, recorded=True)
            else:
                conn.send_error(Unavailable("the gateway could not store that; try again"), request)

        if not self.records.submit(events, then=committed):
            raise Unavailable("the gateway is too busy to store that; try again")

    def _react(self, event: ev.Event) -> None:
        match event:
            case ev.ChatPosted(message=message) if message.sender.role == Role.CUSTOMER:
                bot = self.bots.get(event.conversation)
                if bot is not None:
                    bot.customer_chat(message.as_dict())
            case ev.AgentAccepted():
                # Not awaited: the agent gets its conversation while the bot says goodbye.
                self.bots.stop_soon(event.conversation, "transferred")
            case ev.CallEnded(participant=who, reason=reason) if who.role == Role.CUSTOMER:
                self.bots.call_ended(event.conversation, reason)
            case ev.ConversationClosed():
                self.upgrades.forget(event.conversation)
                self.calls.forget(event.conversation)
                if self.homes is not None:
                    self.homes.forget(event.conversation)

    # -- dispatch -----------------------------------------------------------------------

    async def handle(self, conn: Connection, msg: messages.ClientMessage) -> None:
        match msg:
            case messages.Chat():
                await self.chat(conn, msg)
            case messages.Ping():
                conn.deliver(_PONG, "pong")
            case messages.Join():
                await self.join(conn, msg)
            case messages.Escalate():
                await self.escalate(conn, msg)
            case messages.Accept():
                await self.accept(conn, msg)
            case messages.Leave():
                await self.leave(conn, msg)
            case (
                messages.Offer()
                | messages.Answer()
                | messages.Candidate()
                | messages.Hangup()
                | messages.Upgrade()
                | messages.UpgradeReply()
            ):
                await self.call_message(conn, msg)
            case messages.History():
                page = await self.history.page(_me(conn), conn.memberships, msg)
                conn.deliver(messages.encode(page), "history")

    # -- join -------------------------------------------------------------------------

    async def join(self, conn: Connection, msg: messages.Join) -> None:
        grant = access.authorize(self.config, msg)
        me = Participant(identity=grant.identity, role=grant.role.value, name=grant.name)
        if grant.role is Role.AGENT:
            await self._join_agent(conn, me, grant.room)
            return
        room = grant.room
        assert room is not None  # tokens.verify and authorize guarantee it
        result, events = await self.conversations.join(room, me, profile=grant.profile)  # refused: nothing changed
        events += self._returned(room, me)
        self._joined(conn, me)
        conn.version = result.version
        old = self.delivery.local(room, me.identity)
        if old is not None and old is not conn:
            self._evict(old)
        self.delivery.enter(conn, room)
        if result.previous and self.delivery.remote is not None:
            # Held through another node until now: its connection there (if any) is replaced.
            self.delivery.remote.replaced(me.identity, result.version, conversation=room, node=result.previous)
        await self._send_joined(conn, room)
        await self.apply(events)
        home = self.homes.remote_home(room) if self.homes is not None else None
        if self.homes is not None and home is not None:
            self.homes.start_bot(home, room, me)  # the bot is dialled from the home node
        else:
            await self.bots.start(room, me)

    async def _join_agent(self, conn: Connection, me: Participant, room: str | None) -> None:
        """Agents get one ``joined`` per conversation they are in (or one for the lobby), then
        the queue. A reload of the agent console takes over the old connection's conversations
        without the customers seeing the agent leave, and replaces the old connection here
        or on any other node."""
        version = await self.store.next_version()  # orders it after every connection before it
        old = self.delivery.agents.get(me.identity)
        inherited = list(old.memberships) if old is not None else []
        # A reload whose old connection closed first: its conversations wait in their grace
        # time, here or (a reload through another node, a dead node) on another node.
        inherited += [c for (c, identity) in self._away if identity == me.identity and c not in inherited]
        elsewhere = [c for c in await self.store.memberships(me.identity) if c not in inherited and c != room]
        entering = room is not None and room not in inherited
        events: list[ev.Event] = []
        if entering:
            assert room is not None
            _, events = await self.conversations.join(room, me, take_queue=True)  # refused: nothing changed
        for conversation in inherited:
            events += self._returned(conversation, me)
        for conversation in elsewhere:
            events += (await self.conversations.join(conversation, me))[1]  # held here from now on
        inherited += elsewhere
        self._joined(conn, me)
        conn.version = version
        if old is not None:
            self._evict(old)
        self.delivery.agents[me.identity] = conn
        if self.delivery.remote is not None:
            self.delivery.remote.replaced(me.identity, version)  # wherever its console was before
        for conversation in inherited:
            self.delivery.enter(conn, conversation)
        if entering:
            assert room is not None
            while len(conn.memberships) >= self.config.agent_capacity:
                # The token names another room: leave the oldest to make place for it.
                await self._exit(conn, next(iter(conn.memberships)), "left")
            self.delivery.enter(conn, room)
        if not conn.memberships:
            conn.deliver(self._joined_message(None, me, [], []), "joined")
        for conversation in list(conn.memberships):
            await self._send_joined(conn, conversation)
        await self.apply(events)
        if not any(isinstance(event, ev.QUEUE_EVENTS) for event in events):
            entries = await self.store.waiting()
            cards = await self.history.queue_cards(entries)
            conn.deliver(messages.encode(messages.queue(entries, cards)), "queue")

    def _joined(self, conn: Connection, me: Participant) -> None:
        conn.participant = me
        conn.protocol.joined()
        self.delivery.sessions.add(conn)

    def replaced(self, conversation: str, identity: str, version: int) -> None:
        """A newer connection of ``identity`` joined through another node (``version``: its
        join's): the one here in ``conversation`` (a customer's), or anywhere ("": an
        agent's), is replaced, unless it joined after that one (a late notice)."""
        old = self.delivery.local(conversation, identity) if conversation else self.delivery.agents.get(identity)
        if old is None or old.version >= version:
            return
        if self.delivery.agents.get(identity) is old:
            del self.delivery.agents[identity]
        self._evict(old)

    def _evict(self, old: Connection) -> None:
        """Detach a connection replaced by a newer one with the same identity: its calls end
        now (the new connection negotiates its own), it leaves no conversation."""
        me = _me(old)
        for conversation in list(old.memberships):
            if self.homes is None or not self.homes.end(conversation, me, old, "replaced"):
                self.calls.end_soon(conversation, me.identity, "replaced")
            self.delivery.exit(old, conversation)
        old.deliver(
            messages.encode(
                messages.error("conflict", "replaced by a newer connection with the same identity", "join")
            ),
            "error",
        )
        self.metrics.error_by_code["conflict"].inc()
        old.close(CLOSE_REPLACED, "replaced")

    async def _send_joined(self, conn: Connection, conversation: str) -> None:
        """``joined`` for a conversation ``conn`` just entered, then what the room said while it
        was being built (``Delivery.enter`` holds it: building it awaits the records)."""
        try:
            participants = await self.store.participants(conversation) or []
            history = await self.history.chat(conversation)
            me = _me(conn)
            customer = next((p for p in participants if p.role == Role.CUSTOMER), None)
            # An agent sees who the customer is and what happened before.
            card = await self.history.card(conversation, customer) if me.role == Role.AGENT and customer else None
            media = await self._media(conversation)
            conn.deliver(self._joined_message(conversation, me, participants, history, card, media), "joined")
        finally:
            self.delivery.ready(conn, conversation)

    async def _media(self, conversation: str) -> list[dict[str, Any]]:
        """Who sends what on the conversation's calls: this node's calls if it is their home
        (the join step just said where that is), else what the home recorded."""
        if self.homes is None or self.homes.here(conversation):
            return self.calls.media_list(conversation)
        return await self.store.media(conversation)

    def _joined_message(
        self,
        conversation: str | None,
        me: Participant,
        participants: list[Participant],
        history: list[messages.ChatMessage],
        customer: dict[str, Any] | None = None,
        media: list[dict[str, Any]] | None = None,
    ) -> bytes:
        capacity = self.config.agent_capacity if me.role == Role.AGENT else None
        return messages.encode(
            messages.joined(
                conversation,
                me,
                participants,
                history,
                ice_servers=self.ice_servers_json,
                media=media or [],
                capacity=capacity,
                customer=customer,
                # Every call is recorded or none is (one setting for the deployment).
                recording=bool(self.config.record_dir) and any(m["audio"] or m["video"] for m in media or []),
            )
        )

    # -- chat and queue ---------------------------------------------------------------

    async def chat(self, conn: Connection, msg: messages.Chat) -> None:
        conversation = target(conn, msg.conversation)
        if len(msg.text) > self.config.max_chat_chars:
            raise TooLarge(f"chat text is {len(msg.text)} characters; the limit is {self.config.max_chat_chars}")
        if not msg.text.strip():
            raise BadRequest("chat text is empty")
        self.apply_soon(await self.conversations.post(conversation, _me(conn), msg.text), conn, "chat")

    async def escalate(self, conn: Connection, msg: messages.Escalate) -> None:
        me = _me(conn)
        if me.role != Role.CUSTOMER:
            raise Forbidden("only customers can ask for an agent")
        conversation = target(conn, msg.conversation)
        events = await self.conversations.escalate(conversation, me, msg.reason)
        if not events:
            # Already waiting: acknowledge again.
            reason = (msg.reason or "customer_request")[:MAX_REASON_CHARS]
            queued = {"type": "queued", "conversation": conversation, "reason": reason}
            conn.deliver(messages.encode(queued), "queued")
        await self.apply(events)

    async def accept(self, conn: Connection, msg: messages.Accept) -> None:
        holding = list(conn.memberships)
        capacity = self.config.agent_capacity
        events = await self.conversations.accept(msg.conversation, _me(conn), holding=holding, capacity=capacity)
        self.delivery.enter(conn, msg.conversation)
        await self._send_joined(conn, msg.conversation)
        await self.apply(events)

    async def publish_queue(self) -> None:
        version, entries = await self.store.queue()
        self.metrics.queue_length.set(len(entries))
        self.delivery.to_agents(entries, await self.history.queue_cards(entries), version)

    def heard(self, conversation: str, data: bytes, mtype: str, skip: str | None, event: bytes | None) -> None:
        """Another node's message for a conversation: to its participants here, and the
        reaction due here (a bot this node links to hears the customer's chat)."""
        if data:
            self.delivery.fan_out(conversation, data, mtype, skip=skip)
        if event is not None:
            try:
                reaction = remote_reaction(event)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError):
                log.warning("another node sent an event this one cannot read: ignored")
                return
            if isinstance(reaction, ev.ConversationClosed) and self.records is not None:
                self.records.closed_elsewhere(conversation)
            self._react(reaction)

    # -- leaving ----------------------------------------------------------------------

    async def leave(self, conn: Connection, msg: messages.Leave) -> None:
        conversation = target(conn, msg.conversation)
        await self._removed(conn, conversation, "left")

    async def _removed(self, conn: Connection, conversation: str, reason: str) -> None:
        """``conn`` leaves ``conversation`` (its own ``leave``, or the app closing it) and is
        told so with ``left``."""
        me = _me(conn)
        await self._exit(conn, conversation, reason)
        conn.deliver(messages.encode({"type": "left", "conversation": conversation}), "left")
        if me.role == Role.CUSTOMER and not conn.memberships:
            # A customer without a conversation has nothing to do until it joins again.
            conn.protocol.left()
            conn.participant = None
            self.delivery.sessions.discard(conn)

    async def disconnect(self, conn: Connection) -> None:
        """The connection is gone (unless it was replaced, it is in conversations): its calls
        end, and it stays in each conversation for ``reconnect_grace_seconds`` so that a
        reload or a network switch resumes unseen; after that it leaves."""
        self.delivery.sessions.discard(conn)
        me = conn.participant
        if me is None:
            return
        if self.delivery.agents.get(me.identity) is conn:
            del self.delivery.agents[me.identity]
        grace = self.config.reconnect_grace_seconds
        for conversation in list(conn.memberships):
            if grace > 0 and not self._closing:
                await self._go_away(conn, conversation, grace)
            else:
                await self._exit(conn, conversation, DISCONNECTED)

    async def _go_away(self, conn: Connection, conversation: str, grace: float) -> None:
        me = _me(conn)
        await self._end_call(conn, conversation, DISCONNECTED)
        self.delivery.exit(conn, conversation)
        self._away_here(conversation, me, grace, DISCONNECTED)

    def _away_here(self, conversation: str, me: Participant, grace: float, reason: str) -> None:
        """``me`` has no connection here; it leaves (``reason``) unless back within ``grace``."""
        key = (conversation, me.identity)
        previous = self._away.pop(key, None)
        if previous is not None:  # pragma: no cover - a connection in the room replaces the away entry
            previous.expiry.cancel()
        expiry = self.tasks.spawn(self._expire(conversation, me, grace, reason), f"away {conversation}/{me.identity}")
        self._away[key] = Away(me, expiry)
        self.publish([ev.ParticipantAway(conversation=conversation, ts=now_ms(), participant=me, grace_seconds=grace)])

    async def _expire(self, conversation: str, me: Participant, grace: float, reason: str) -> None:
        await asyncio.sleep(grace)
        away = self._away.get((conversation, me.identity))
        if away is None or away.expiry is not asyncio.current_task():
            return
        del self._away[(conversation, me.identity)]  # from here on a return is a new join
        await self._depart(conversation, me, reason, held_here=True)

    def _returned(self, conversation: str, me: Participant) -> list[ev.Event]:
        """``me`` joined again: if it was away from ``conversation``, it never left."""
        away = self._away.pop((conversation, me.identity), None)
        if away is None:
            return []
        away.expiry.cancel()
        return [ev.ParticipantReturned(conversation=conversation, ts=now_ms(), participant=me)]

    async def _exit(self, conn: Connection, conversation: str, reason: str) -> None:
        me = _me(conn)
        await self._end_call(conn, conversation, reason)
        self.delivery.exit(conn, conversation)
        # A lost connection's participant may be back through another node already.
        await self._depart(conversation, me, reason, held_here=reason == DISCONNECTED)

    async def _depart(self, conversation: str, me: Participant, reason: str, *, held_here: bool = False) -> None:
        """``me`` leaves the conversation for good (its connection, if any, is out already);
        ``held_here``: unless it has come back through another node meanwhile."""
        if me.role == Role.CUSTOMER and self.bots.get(conversation) is not None:
            others = await self.store.participants(conversation) or []
            if not any(p.role == Role.CUSTOMER and p.identity != me.identity for p in others):
                await self.bots.stop(conversation, "customer_left")  # before the last customer goes
        result, events = await self.conversations.leave(conversation, me.identity, reason, held_here=held_here)
        if result.left and me.role == Role.AGENT and reason == NODE_LOST and result.customers_left:
            # The agent's node died and the agent did not come back: the customer is not left
            # alone in a conversation nobody answers, it goes back to the queue.
            events += await self.conversations.hand_over(conversation, AGENT_LOST, AGENT_LOST_NOTICE)
        await self.apply(events)

    # -- media ------------------------------------------------------------------------

    async def call_message(self, conn: Connection, msg: CallMessage) -> None:
        """A client's call signaling: applied here, or sent to the conversation's home node
        when that is another (``home.py``); its answers come back to ``conn`` either way."""
        me = _me(conn)
        if isinstance(msg, messages.UpgradeReply) and msg.conversation is None and len(conn.memberships) > 1:
            conversation = target(conn, self.upgrades.conversation_of(msg.id))  # the id says which
        else:
            conversation = target(conn, msg.conversation)
        if self.homes is not None:
            if isinstance(msg, messages.Offer | messages.Upgrade | messages.UpgradeReply):
                home = await self.store.home(conversation)  # a dead or draining home is replaced here
            else:
                home = self.homes.home_of_call(conversation, me.identity) or ""
            if home and home != self.homes.node:
                self.homes.forward(home, conversation, me, conn, msg)
                return

        def send(message: dict[str, object]) -> None:
            conn.deliver(messages.encode(message), str(message["type"]))

        await self._call(conversation, me, conn, send, msg)

    async def _call(
        self,
        conversation: str,
        me: Participant,
        owner: object,
        send: Callable[[dict[str, Any]], None],
        msg: CallMessage,
    ) -> None:
        """Call signaling on the node that holds the conversation's calls; ``owner``: the
        connection (here, or a ``RemoteParty`` for one on another node)."""
        match msg:
            case messages.Offer(sdp=sdp):
                if not await self.calls.offer(conversation, me, sdp, owner=owner, send=send):
                    self.metrics.offer_collisions.inc()
                    raise Conflict("offer collision: answer the gateway's pending offer, then offer again")
            case messages.Answer(sdp=sdp):
                await self.calls.require(conversation, me.identity, owner).accept_answer(sdp)
            case messages.Candidate():
                media = self.calls.require(conversation, me.identity, owner)
                await media.add_candidate(msg.candidate, msg.sdpMid, msg.sdpMLineIndex)
            case messages.Hangup():
                self.calls.require(conversation, me.identity, owner)  # bad_request without a call
                await self.calls.close(conversation, me.identity, "hangup", owner=owner)
            case messages.Upgrade(media=media):
                await self.request_upgrade(conversation, me, media)
            case messages.UpgradeReply():
                self.publish(self.upgrades.reply(conversation, msg.id, me, msg.accept))

    async def call_request(self, origin: str, conversation: str, data: bytes) -> None:
        """Another node's call signaling for a conversation whose home is this node."""
        assert self.homes is not None
        try:
            request = read_request(data)
            msg = read_message(request.message) if request.op == Op.MESSAGE else None
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("node %s sent a call request this one cannot read: ignored", origin)
            return
        me = request.participant
        if request.op == Op.BOT:
            await self.bots.start(conversation, me)
            return
        if request.op == Op.END:
            party = self.homes.owner(origin, conversation, request)
            if party is not None:
                await self.calls.close(conversation, me.identity, request.reason, owner=party)
                self.homes.ended(conversation, me.identity)
            return
        if not isinstance(msg, CallMessage):
            return
        party = self.homes.party(origin, conversation, request)
        try:
            await self._call(conversation, me, party, party.send, msg)
        except ProtocolError as exc:
            self.metrics.error_by_code[exc.code.value].inc()
            party.send(messages.error(exc.code.value, exc.message, msg.__struct_config__.tag))  # type: ignore[arg-type]

    def deliver_to(self, conversation: str, identity: str, data: bytes, mtype: str) -> None:
        """The home node's answer for a participant connected here."""
        conn = self.delivery.local(conversation, identity)
        if conn is not None:
            conn.deliver(data, mtype)

    async def _end_call(self, conn: Connection, conversation: str, reason: str) -> None:
        """``conn``'s call in the conversation ends (it left or disconnected), here or on
        the home node."""
        me = _me(conn)
        if self.homes is None or not self.homes.end(conversation, me, conn, reason):
            await self.calls.close(conversation, me.identity, reason, owner=conn)

    def _pipeline_created(self, conversation: str, pipeline: VoicePipeline, taps: list[Subscriber]) -> None:
        self.bots.attach(conversation, pipeline, taps)

    async def request_upgrade(self, conversation: str, sender: Participant, media: str) -> None:
        """Ask everyone else in the conversation to add ``media`` (a participant or the bot asks)."""
        participants = await self.store.participants(conversation) or []
        request, events = self.upgrades.request(conversation, sender, media, participants)
        self.publish(events)
        for participant in participants:
            accept = self.bots.answers_upgrade(conversation, participant.identity, media)
            if accept is not None:
                self.publish(self.upgrades.reply(conversation, request.id, participant, accept))

    # -- the server API (gateway/api.py): the app's operations ---------------------------

    async def app_post(
        self,
        conversation: str,
        sender: Participant,
        text: str,
        meta: dict[str, Any] | None,
        customer: str | None = None,
    ) -> tuple[messages.ChatMessage, bool]:
        """The app's chat message, recorded (with ``meta`` as a ``meta`` event in the same
        batch) before everyone in the conversation gets it; the message and whether anyone
        was there. Nobody there: recorded for ``customer`` (a known one; the caller checks)
        for whoever joins next, else ``NotFound``."""
        try:
            events: list[ev.Event] = list(await self.conversations.post(conversation, sender, text))
            live = True
        except NotFound:
            if customer is None or self.records is None:
                raise
            events = self.conversations.post_unattended(conversation, customer, sender, text)
            live = False
        posted = events[-1]
        assert isinstance(posted, ev.ChatPosted)
        if meta is not None:
            body = {"message": posted.message.id, "meta": meta}
            events.append(ev.MetaRecorded(conversation=conversation, ts=posted.ts, kind="message", body=body))
        await self.apply(events)
        return posted.message, live

    async def app_close(self, conversation: str, *, recorded_open: bool = False) -> bool:
        """Everyone leaves (reason ``closed``): the bot stops, each connected participant gets
        ``left``, one in its grace time or on another process is removed. Nobody in it: its
        open record is closed if ``recorded_open`` (one the app opened with a message).
        False: neither live nor open."""
        participants = await self.store.participants(conversation)
        if not participants:
            if recorded_open:
                await self.apply(self.conversations.close_unattended(conversation))
            return recorded_open
        await self.bots.stop(conversation, ev.CLOSED_BY_APP)
        for participant in participants:
            if participant.role == Role.BOT:
                continue  # stopped above (or another process's: removed by the store below)
            away = self._away.pop((conversation, participant.identity), None)
            if away is not None:
                away.expiry.cancel()
            conn = self.delivery.local(conversation, participant.identity)
            if conn is None:
                await self._depart(conversation, participant, ev.CLOSED_BY_APP)
                continue
            await self._removed(conn, conversation, ev.CLOSED_BY_APP)
        return True

    async def node_lost(self, node: str, adopted: list[tuple[str, Participant]]) -> None:
        """A dead node's participants are this node's now (``RedisStore.adopt``): each is
        away for the grace time, as if its connection here had been lost (its client
        reconnects through any node and carries on); then it leaves with reason
        ``node_lost``. A bot's link died with the node: it leaves at once."""
        log.info("node %s is gone: %d of its participants are away here", node, len(adopted))
        grace = self.config.reconnect_grace_seconds
        for conversation, participant in adopted:
            if participant.role == Role.BOT or grace <= 0 or self._closing:
                await self._depart(conversation, participant, NODE_LOST, held_here=True)
            else:
                self._away_here(conversation, participant, grace, NODE_LOST)

    async def rebuild(self) -> int:
        """The shared store lost what this node held (Redis restarted empty, or this node was
        cut off past its expiry and reaped): every participant this node holds (connected,
        away, its bots) joins again, silently (nothing new happened to them); how many. The
        agent queue is not rebuilt: customers who waited ask again. Each connection gets
        its new join's version (the store's count began again), and what this node's calls
        send is said again to the other nodes, which records it for their ``joined``."""
        held: list[tuple[str, Participant | None, Connection | None]] = [
            (c, conn.participant, conn) for c, room in self.delivery.rooms.items() for conn in room.values()
        ]
        held += [(c, away.participant, None) for (c, _), away in self._away.items()]
        held += [(c, bot, None) for c, bot in self.bots.held()]
        count = 0
        for conversation, participant, conn in held:
            if participant is not None:
                result = await self.store.join(conversation, participant, self.conversations.limits)
                count += result.admission is Admission.ADMITTED
                if conn is not None:
                    conn.version = result.version
        for agent in self.delivery.agents.values():
            if not agent.memberships:  # in the lobby: no join above
                agent.version = await self.store.next_version()
        for event in self.calls.media_events():
            self.delivery.elsewhere(event)
        return count

    async def app_escalate(self, conversation: str, reason: str) -> bool:
        """Put a conversation in the agent queue for the app (as a bot's hand-over); False if
        nothing changed (it waits already, an agent is in it, or it has no customer)."""
        events = await self.conversations.hand_over(conversation, reason, ESCALATE_APP_NOTICE)
        await self.apply(events)
        return bool(events)

    async def queue_snapshot(self) -> dict[str, Any]:
        """The ``queue`` client message: the waiting entries with their customer cards."""
        entries = await self.store.waiting()
        return messages.queue(entries, await self.history.queue_cards(entries))

    # -- BotHost ------------------------------------------------------------------------

    async def bot_claim(self, conversation: str, bot: Participant) -> bool:
        events = await self.conversations.claim_bot(conversation, bot)
        await self.apply(events)
        return bool(events)

    async def bot_left(self, conversation: str, bot: Participant, reason: str) -> None:
        _, events = await self.conversations.leave(conversation, bot.identity, reason)
        await self.apply(events)

    async def post(self, conversation: str, sender: Participant, text: str) -> None:
        await self.apply(await self.conversations.post(conversation, sender, text))

    async def hand_over(self, conversation: str, reason: str, notice: str) -> None:
        """Put a bot conversation in the agent queue and tell the customer."""
        await self.apply(await self.conversations.hand_over(conversation, reason, notice))

    def add_voice(self, conversation: str, bot: Participant, playback: PlaybackTrack) -> Relay:
        return self.calls.router.add_virtual_source(conversation, bot, playback)

    async def remove_voice(self, conversation: str, identity: str) -> None:
        await self.calls.router.remove_virtual_source(conversation, identity)

    def pipelines(self, conversation: str) -> list[tuple[VoicePipeline, list[Subscriber]]]:
        return [(p.pipeline, p.taps) for p in self.calls.peers(conversation) if p.pipeline is not None]

    async def customer_card(self, conversation: str, customer: Participant) -> dict[str, Any]:
        """``History.card``: the customer card in the bot's ``start``."""
        return await self.history.card(conversation, customer)


def _me(conn: Connection) -> Participant:
    if conn.participant is None:  # pragma: no cover - the protocol state machine prevents it
        raise Unauthorized("join first")
    return conn.participant
