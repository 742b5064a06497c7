"""The gateway's bot links: which conversation has one, starting and stopping them.

``BotManager`` owns every ``BotConnector`` and its task, and is the connectors' host:
what a bot asks for (chat, transcript, transfer, upgrade) becomes a conversation
operation through the narrow ``BotHost`` interface the broker implements, so the
manager never reaches into the broker's store, router or connections. What the bot
may say to a conversation is rate-limited here; excess is an error to the bot, never
a flood toward the customer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from media.pipeline import VoicePipeline
from media.playback import PlaybackTrack
from media.relay import Relay, Subscriber
from media.tasks import TaskOwner, cancel_and_wait, report_failure

from .. import events as ev
from ..config import Config
from ..errors import NotFound
from ..messages import SYSTEM, Participant
from ..metrics import Metrics
from .connector import BotConnector, BotSettings
from .native import BotProtocol, NativeProtocol
from .twilio import TwilioProtocol

log = logging.getLogger("talkgate.bot")


#: After a shutdown's time is up and the links are cut, how long their tasks may take.
ABORT_GRACE = 0.5


class BotHost(Protocol):
    """What the bot manager needs from the gateway (the broker implements it)."""

    async def bot_claim(self, conversation: str, bot: Participant) -> bool:
        """Make the bot a participant if the conversation has a customer and no agent."""

    async def bot_left(self, conversation: str, bot: Participant, reason: str) -> None: ...

    async def post(self, conversation: str, sender: Participant, text: str) -> None: ...

    def publish(self, events: list[ev.Event]) -> None: ...

    async def hand_over(self, conversation: str, reason: str, notice: str) -> None: ...

    async def request_upgrade(self, conversation: str, sender: Participant, media: str) -> None: ...

    def add_voice(self, conversation: str, bot: Participant, playback: PlaybackTrack) -> Relay:
        """Route the bot's playback to the conversation's callers."""

    async def remove_voice(self, conversation: str, identity: str) -> None: ...

    def pipelines(self, conversation: str) -> list[tuple[VoicePipeline, list[Subscriber]]]:
        """The voice pipelines (and tap lists) of the conversation's callers here."""

    async def customer_card(self, conversation: str, customer: Participant) -> dict[str, Any]:
        """What the records know of the customer: profile and earlier conversations."""


class BotManager:
    def __init__(self, config: Config, metrics: Metrics, host: BotHost, tasks: TaskOwner) -> None:
        self.config = config
        self.host = host
        self.metrics = metrics
        self._tasks = tasks
        self.settings = (
            BotSettings(
                url=config.bot_url,
                name=config.bot_name,
                connect_seconds=config.bot_connect_seconds,
                barge_in=config.bot_barge_in,
                max_buffer_seconds=config.bot_max_buffer_seconds,
                # One message per speech frame: the backlog in frames, at least a few.
                outbox_limit=max(8, round(config.bot_max_backlog_seconds * 1000 / config.bot_frame_ms)),
                opus_complexity=config.opus_complexity,
                rate_per_second=config.bot_rate_per_second,
                rate_burst=config.bot_rate_burst,
                secret=config.bot_secret,
                barge_in_min_ms=config.bot_barge_in_min_ms,
                barge_in_hold_ms=config.bot_barge_in_hold_ms,
            )
            if config.bot_url
            else None
        )
        #: conversation -> its bot link
        self._links: dict[str, BotConnector] = {}
        #: every connector's task, finished ones drop out
        self._link_tasks: set[asyncio.Task[None]] = set()
        self.metrics.bots.set_function(lambda: len(self._links))

    def get(self, conversation: str) -> BotConnector | None:
        return self._links.get(conversation)

    def __len__(self) -> int:
        return len(self._links)

    async def start(self, conversation: str, customer: Participant) -> None:
        """Dial the bot for a conversation that has a customer and no agent."""
        if self.settings is None or conversation in self._links:
            return
        vad = self.config.vad_settings()
        protocol: BotProtocol
        if self.config.bot_protocol == "twilio":
            protocol = TwilioProtocol(conversation, customer, vad.sample_rate, vad.frame_ms)
        else:
            card = await self.host.customer_card(conversation, customer)
            if self.settings is None or conversation in self._links:
                return  # started meanwhile
            protocol = NativeProtocol(
                conversation, customer, vad.sample_rate, vad.frame_ms, card, message_ms=self.config.bot_frame_ms
            )
        bot = BotConnector(
            conversation=conversation,
            customer=customer,
            settings=self.settings,
            host=self,
            protocol=protocol,
        )
        self._links[conversation] = bot
        # The bot is a participant: the customer sees it join, and can call it.
        if not await self.host.bot_claim(conversation, bot.participant):
            if self._links.get(conversation) is bot:
                del self._links[conversation]
            return
        bot.relay = self.host.add_voice(conversation, bot.participant, bot.playback)
        bot.playback.start(bot.relay.deliver)  # packets pushed from the loop's timer, no task per packet
        for pipeline, taps in self.host.pipelines(conversation):
            bot.attach(pipeline, taps)
        task = bot.start()
        self._link_tasks.add(task)
        task.add_done_callback(self._link_tasks.discard)

    def attach(self, conversation: str, pipeline: VoicePipeline, taps: list[Subscriber]) -> None:
        """A caller's voice pipeline appeared: the conversation's bot listens to it."""
        bot = self._links.get(conversation)
        if bot is not None:
            bot.attach(pipeline, taps)

    def call_ended(self, conversation: str, reason: str) -> None:
        """The customer's voice call ended: the conversation's bot is told."""
        bot = self._links.get(conversation)
        if bot is not None:
            bot.end_call(reason)

    async def stop(self, conversation: str, reason: str) -> None:
        bot = self._links.pop(conversation, None)
        if bot is not None:
            await bot.stop(reason)
            await self._leave(conversation, bot, reason)

    def stop_soon(self, conversation: str, reason: str) -> None:
        """Stop the bot without making the caller wait (an agent accepting must not block
        on a bot that takes its time to say goodbye)."""
        if conversation in self._links:
            self._tasks.spawn(self.stop(conversation, reason), f"stop bot {conversation}")

    async def _leave(self, conversation: str, bot: BotConnector, reason: str) -> None:
        bot.detach()
        await self.host.remove_voice(conversation, bot.participant.identity)
        await self.host.bot_left(conversation, bot.participant, reason)

    def held(self) -> list[tuple[str, Participant]]:
        """(conversation, bot participant) of every link this node holds."""
        return [(conversation, bot.participant) for conversation, bot in self._links.items()]

    def answers_upgrade(self, conversation: str, identity: str, media: str) -> bool | None:
        """The bot's own answer to an upgrade request addressed to it (None: not the bot)."""
        bot = self._links.get(conversation)
        if bot is None or identity != bot.participant.identity:
            return None
        return media == "audio"  # it talks; it cannot see

    async def close(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109 (a bound on the bots' goodbyes)
        """Shutdown: every bot gets ``stop`` (shutdown), all at once; links still open after
        ``timeout`` seconds are cut. Returns within about ``timeout`` + ``ABORT_GRACE``
        however many bots there are."""
        stops = {
            asyncio.ensure_future(self.stop(conversation, "shutdown")): link
            for conversation, link in list(self._links.items())
        }
        if stops:
            done, pending = await asyncio.wait(stops, timeout=timeout)
            for task in done:
                report_failure(task, logger=log)
            for task in pending:
                stops[task].abort()
            if pending:  # cut links end promptly; what still runs is cancelled (failures logged)
                await asyncio.wait(pending, timeout=ABORT_GRACE)
                await cancel_and_wait(pending, log, "bot stop", timeout=ABORT_GRACE)
        await cancel_and_wait(self._link_tasks, log, "bot link", timeout=ABORT_GRACE)

    # -- the connectors' host -----------------------------------------------------------

    def bot_problem(self, kind: str) -> None:
        if kind == "bad_message":
            self.metrics.bot_bad_messages.inc()
        elif kind == "dropped_frame":
            self.metrics.bot_dropped_frames.inc()
        elif kind == "rate_limited":
            self.metrics.bot_rate_limited.inc()
        elif kind == "task_failure":
            self.metrics.task_failures_by_owner["bot"].inc()
        elif kind == "playback_step":
            self.metrics.playback_step_failures.inc()
        elif kind == "dropped_mark":
            self.metrics.bot_dropped_marks.inc()

    def bot_frame_sent(self, arrived: float, queued: float) -> None:
        now = time.perf_counter()
        self.metrics.pipeline_to_bot.observe(now - queued)
        self.metrics.rtp_to_bot.observe(now - arrived)

    async def bot_chat(self, conversation: str, bot: Participant, text: str) -> None:
        with contextlib.suppress(NotFound):  # the conversation ended meanwhile
            await self.host.post(conversation, bot, text)

    def bot_transcript(self, conversation: str, bot: Participant, text: str, final: bool, speaker: Participant) -> None:
        transcript = ev.TranscriptPosted(
            conversation=conversation, ts=ev.now_ms(), sender=bot, text=text, final=final, speaker=speaker
        )
        self.host.publish([transcript])

    async def bot_transfer(self, conversation: str, reason: str) -> None:
        await self.host.hand_over(conversation, reason, "Connecting you with a person. An agent will join shortly.")

    async def bot_upgrade(self, conversation: str, bot: Participant, media: str) -> None:
        with contextlib.suppress(NotFound):  # the customer left meanwhile
            await self.host.request_upgrade(conversation, bot, media)

    async def bot_connecting(self, conversation: str) -> None:
        await self.bot_chat(conversation, SYSTEM, "Connecting you…")

    async def bot_finished(self, conversation: str, connector: BotConnector, reason: str) -> None:
        if self._links.get(conversation) is not connector:
            return  # stopped by the gateway, which cleans up itself
        del self._links[conversation]
        await self._leave(conversation, connector, reason)
        if reason in ("unavailable", "not_reading"):
            (self.metrics.bot_unavailable if reason == "unavailable" else self.metrics.bot_not_reading).inc()
            await self.host.hand_over(
                conversation, f"bot_{reason}", "Our assistant is unavailable right now. An agent will join shortly."
            )
