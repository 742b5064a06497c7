"""The gateway's bot links: which conversation has one, starting and stopping them.

``BotManager`` owns every ``BotConnector`` and its task (awaited in ``close()``), and is
the connectors' ``BotHost``: what a bot asks for (chat, transcript, transfer, upgrade)
becomes a broker operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from .. import messages
from ..errors import NotFound
from ..messages import Participant, Role
from .connector import BotConnector, BotSettings
from .native import NativeProtocol
from .twilio import TwilioProtocol

if TYPE_CHECKING:
    from ..broker import Broker


class BotManager:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        config = broker.config
        self.settings = (
            BotSettings(
                url=config.bot_url,
                name=config.bot_name,
                connect_seconds=config.bot_connect_seconds,
                barge_in=config.bot_barge_in,
                max_buffer_seconds=config.bot_max_buffer_seconds,
                # One message per speech frame: the backlog in frames, at least a few.
                outbox_limit=max(8, round(config.bot_max_backlog_seconds * 1000 / config.vad_frame_ms)),
                opus_complexity=config.opus_complexity,
            )
            if config.bot_url
            else None
        )
        #: conversation -> its bot link
        self._links: dict[str, BotConnector] = {}
        #: every connector's task, finished ones drop out
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics = broker.metrics
        self.metrics.bots.set_function(lambda: len(self._links))

    def get(self, conversation: str) -> BotConnector | None:
        return self._links.get(conversation)

    def __len__(self) -> int:
        return len(self._links)

    async def start(self, conversation: str, customer: Participant) -> None:
        """Dial the bot for a conversation that has a customer and no agent."""
        if self.settings is None or conversation in self._links:
            return
        participants = await self.broker.store.participants(conversation) or []
        if any(p.role == Role.AGENT for p in participants):
            return
        vad = self.broker.config.vad_settings()
        protocol_class = TwilioProtocol if self.broker.config.bot_protocol == "twilio" else NativeProtocol
        bot = BotConnector(
            conversation=conversation,
            customer=customer,
            settings=self.settings,
            host=self,
            protocol=protocol_class(conversation, customer, vad.sample_rate, vad.frame_ms),
        )
        self._links[conversation] = bot
        # The bot is a participant: the customer sees it join, and can call it.
        await self.broker.store.add_participant(conversation, bot.participant)
        self.broker.broadcast(conversation, messages.participant_event("joined", conversation, bot.participant))
        bot.relay = self.broker.router.add_virtual_source(conversation, bot.participant, bot.playback)
        bot.playback.start(bot.relay.deliver)  # packets pushed from the loop's timer, no task per packet
        for media in self.broker.router.peers(conversation):
            if media.pipeline is not None:
                bot.attach(media.pipeline, media.taps)
        self.broker.router.reconcile(conversation)
        task = bot.start()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, conversation: str, reason: str) -> None:
        bot = self._links.pop(conversation, None)
        if bot is not None:
            await bot.stop(reason)
            await self._leave(conversation, bot)

    async def _leave(self, conversation: str, bot: BotConnector) -> None:
        await self.broker.router.remove_virtual_source(conversation, bot.participant.identity)
        result = await self.broker.store.remove_participant(conversation, bot.participant.identity)
        if result.left and not result.conversation_removed:
            self.broker.broadcast(conversation, messages.participant_event("left", conversation, bot.participant))

    def answers_upgrade(self, conversation: str, identity: str, media: str) -> bool | None:
        """The bot's own answer to an upgrade request addressed to it (None: not the bot)."""
        bot = self._links.get(conversation)
        if bot is None or identity != bot.participant.identity:
            return None
        return media == "audio"  # it talks; it cannot see

    async def close(self) -> None:
        """Server shutdown: every bot gets ``stop`` (shutdown) and every bot task ends."""
        for conversation in list(self._links):
            await self.stop(conversation, "shutdown")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def bot_problem(self, kind: str) -> None:
        if kind == "bad_message":
            self.metrics.bot_bad_messages.inc()
        elif kind == "dropped_frame":
            self.metrics.bot_dropped_frames.inc()

    def bot_frame_sent(self, arrived: float, queued: float) -> None:
        now = time.perf_counter()
        self.metrics.pipeline_to_bot.observe(now - queued)
        self.metrics.rtp_to_bot.observe(now - arrived)

    async def bot_chat(self, conversation: str, bot: Participant, text: str) -> None:
        await self.broker.post(conversation, bot, text)

    def bot_transcript(self, conversation: str, bot: Participant, text: str, final: bool) -> None:
        self.broker.broadcast(conversation, {"type": "transcript", "from": bot.as_dict(), "text": text, "final": final})

    async def bot_transfer(self, conversation: str, reason: str) -> None:
        await self.broker.hand_over(conversation, reason, "Connecting you with a person. An agent will join shortly.")

    async def bot_upgrade(self, conversation: str, bot: Participant, media: str) -> None:
        with contextlib.suppress(NotFound):  # the customer left meanwhile
            await self.broker.request_upgrade(conversation, bot, media)

    async def bot_connecting(self, conversation: str) -> None:
        await self.broker.post(conversation, messages.SYSTEM, "Connecting you…")

    async def bot_finished(self, conversation: str, connector: BotConnector, reason: str) -> None:
        if self._links.get(conversation) is not connector:
            return  # stopped by the gateway, which cleans up itself
        del self._links[conversation]
        await self._leave(conversation, connector)
        if reason in ("unavailable", "not_reading"):
            (self.metrics.bot_unavailable if reason == "unavailable" else self.metrics.bot_not_reading).inc()
            await self.broker.hand_over(
                conversation, f"bot_{reason}", "Our assistant is unavailable right now. An agent will join shortly."
            )
