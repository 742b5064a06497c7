"""One conversation's link to its speech bot (native protocol).

The gateway dials the bot, as Twilio and Vonage do with media streams. A
``BotConnector`` owns everything of that link: the websocket, a reader and a writer
task, a bounded outbox, and the ``PlaybackTrack`` that carries the bot's voice to the
customer (a routed virtual source). It reconnects with backoff inside a window; when
the bot cannot be reached the conversation goes to the agent queue (``bot_unavailable``).

Barge-in happens here, with no round trip: the customer's voice pipeline calls the
connector synchronously on ``SpeechStarted``; if bot audio is queued it is cleared at
once and the bot is told ``interrupted`` with the marks that will not be played.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State

from media.convert import FrameConverter
from media.pipeline import VoicePipeline
from media.playback import PlaybackTrack
from media.relay import MediaFrame, Relay, Subscriber
from media.vad import Event, SpeechFrame, SpeechStarted, SpeechStopped

from ..messages import Participant, Role
from . import native
from .native import BotProtocol

log = logging.getLogger("talkgate.bot")

#: Backoff between connection attempts (the last value repeats).
BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0)
#: Audio frames are written straight to the bot's socket while less than this waits in
#: the transport's buffer; above it they queue in the outbox (which drops the oldest).
DIRECT_WRITE_BYTES = 64 * 1024
#: The kernel's send buffer toward the bot (Linux doubles it). Left to autotuning it grows
#: to megabytes: a minute of speech could sit in the kernel for a bot that stopped reading,
#: hiding it from the backlog limit, and stale audio would reach a bot that is merely slow.
SEND_BUFFER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class BotSettings:
    url: str
    name: str = "Assistant"
    #: How long to keep trying to reach the bot before handing over to agents.
    connect_seconds: float = 8.0
    #: Clear bot audio when the customer starts talking (no round trip to the bot).
    barge_in: bool = True
    #: Bot audio queued toward the customer at most; beyond it the bot gets an error.
    max_buffer_seconds: float = 60.0
    #: Messages waiting to be written to the bot (~10 s of 20 ms frames). A connected bot
    #: that lets this many pile up is dropped; while connecting, the oldest audio goes.
    outbox_limit: int = 500
    #: Opus encoder complexity for the bot's voice (0-10: CPU against quality).
    opus_complexity: int = 5


class BotState(enum.Enum):
    CONNECTING = "connecting"
    ACTIVE = "active"
    STOPPED = "stopped"


class BotHost(Protocol):
    """What the connector needs from the gateway (the BotManager implements it)."""

    def bot_problem(self, kind: str) -> None:
        """Count a problem: "bad_message" or "dropped_frame"."""

    def bot_frame_sent(self, arrived: float, queued: float) -> None:
        """A live speech frame was written to the bot: perf_counter() times of its RTP
        packet's arrival and of the frame leaving the voice pipeline."""

    async def bot_chat(self, conversation: str, bot: Participant, text: str) -> None: ...

    def bot_transcript(self, conversation: str, bot: Participant, text: str, final: bool) -> None: ...

    async def bot_transfer(self, conversation: str, reason: str) -> None: ...

    async def bot_upgrade(self, conversation: str, bot: Participant, media: str) -> None: ...

    async def bot_connecting(self, conversation: str) -> None: ...

    async def bot_finished(self, conversation: str, connector: BotConnector, reason: str) -> None: ...


class BotConnector:
    def __init__(
        self,
        *,
        conversation: str,
        customer: Participant,
        settings: BotSettings,
        host: BotHost,
        protocol: BotProtocol,
    ) -> None:
        self.conversation = conversation
        self.customer = customer
        self.settings = settings
        self.host = host
        self.protocol = protocol
        self.participant = Participant(identity="bot", role=Role.BOT.value, name=settings.name)
        self.playback = PlaybackTrack(
            max_seconds=settings.max_buffer_seconds,
            # The bot's rate until it announces another: Twilio's 8 kHz, else the native 16 kHz.
            rate=protocol.continuous_rate or 16_000,
            complexity=settings.opus_complexity,
        )
        #: The relay carrying the playback to the customer (set by the manager).
        self.relay: Relay | None = None
        self.state = BotState.CONNECTING
        #: (message, is audio, arrival and queueing time of a live frame or 0.0) for the
        #: bot, in order; bounded: the oldest audio goes first.
        self._outbox: collections.deque[tuple[str | bytes, bool, float, float]] = collections.deque()
        self._pipeline: VoicePipeline | None = None
        self._wake = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._rate = 16_000  # of the bot's audio, from audio.format
        self._stop_reason: str | None = None
        self._task: asyncio.Task[None] | None = None
        #: Counters for metrics and tests.
        self.dropped_frames = 0
        self.bad_messages = 0
        self.connects = 0

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"talkgate-bot-{self.conversation}")
        return self._task

    async def stop(self, reason: str) -> None:
        """Tell the bot why (``stop``), close the link, and end the task."""
        if self._stop_reason is None:
            self._stop_reason = reason
            self._send(self.protocol.stop(reason))
        if self._task is not None and not self._task.done():
            # Give the writer a moment to deliver stop; then end everything.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), 1.0)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.playback.stop()
        self.state = BotState.STOPPED

    # -- from the gateway -------------------------------------------------------------------

    def attach(self, pipeline: VoicePipeline, taps: list[Subscriber]) -> None:
        """Stream this customer's speech to the bot (and barge in on it).

        A protocol that wants continuous audio (Twilio) also gets a tap on the
        customer's audio, added to ``taps`` for the router to subscribe.
        """
        self._pipeline = pipeline
        pipeline.listeners.append(self._on_speech)
        if self.protocol.continuous_rate is not None:
            taps.append(ContinuousAudio(self, self.protocol.continuous_rate))

    def customer_chat(self, message: dict[str, Any]) -> None:
        self._send(self.protocol.chat(message))

    def _on_speech(self, event: Event) -> None:
        # Runs in the relay's reader task, once per 20 ms frame: no awaits, no JSON for frames.
        if isinstance(event, SpeechFrame):
            pipeline = self._pipeline
            if pipeline is not None and pipeline.arrived and event.t == pipeline.newest_t:
                # A live frame (not preroll): time it to the bot's socket.
                for item in self.protocol.speech_frame(event.pcm):
                    self._push(item, True, pipeline.arrived, time.perf_counter())
            else:
                self._send(self.protocol.speech_frame(event.pcm), audio=True)
        elif isinstance(event, SpeechStarted):
            if self.settings.barge_in and self.playback.playing:
                self._send(self.protocol.interrupted(self._silence()))
            self._send(self.protocol.speech_started(event.t))
        elif isinstance(event, SpeechStopped):
            self._send(self.protocol.speech_stopped(event.t, event.duration))

    # -- outbox -------------------------------------------------------------------------------

    def _send(self, items: list[str | bytes], *, audio: bool = False) -> None:
        for item in items:
            self._push(item, audio)

    def _push(self, item: str | bytes, audio: bool, arrived: float = 0.0, queued: float = 0.0) -> None:
        if self.state is BotState.STOPPED:
            return
        if audio and not self._outbox and self._write_now(item):
            if arrived:
                self.host.bot_frame_sent(arrived, queued)
            return
        if len(self._outbox) >= self.settings.outbox_limit:
            if self.state is BotState.ACTIVE:
                self._not_reading()
                return
            # Still connecting: lose the oldest audio, never the control messages.
            for i, (_, queued_audio, _, _) in enumerate(self._outbox):
                if queued_audio:
                    del self._outbox[i]
                    self.dropped_frames += 1
                    self.host.bot_problem("dropped_frame")
                    break
            else:
                self._outbox.popleft()
        self._outbox.append((item, audio, arrived, queued))
        self._wake.set()

    def _not_reading(self) -> None:
        """A connected bot let ``outbox_limit`` messages pile up (and the socket's buffers
        before them): it is not reading. Cut the link; the conversation goes to agents."""
        log.warning(
            "[%s] dropping the bot: it stopped reading (%d messages waiting)", self.conversation, len(self._outbox)
        )
        self._stop_reason = "not_reading"
        self.dropped_frames += sum(audio for _, audio, _, _ in self._outbox)
        self._outbox.clear()
        if self._ws is not None:
            self._ws.transport.abort()  # a close handshake would wait behind the unread data

    def _write_now(self, item: str | bytes) -> bool:
        """Write an audio frame to the socket from the caller's stack, if nothing queued
        must go first and the socket keeps up: no writer-task wake-up and no coroutines
        per 20 ms frame. websockets' Sans-I/O protocol frames it, as ``send`` would."""
        ws = self._ws
        if ws is None or ws.protocol.state is not State.OPEN:
            return False
        if ws.transport.get_write_buffer_size() > DIRECT_WRITE_BYTES:
            return False  # the bot is slow: the outbox's bound applies
        if isinstance(item, bytes):
            ws.protocol.send_binary(item)
        else:
            ws.protocol.send_text(item.encode())
        for data in ws.protocol.data_to_send():
            ws.transport.write(data)
        return True

    # -- the link -----------------------------------------------------------------------------

    async def _run(self) -> None:
        reason = "unavailable"
        try:
            reason = await self._connect_and_serve()
        finally:
            self.state = BotState.STOPPED
            await self.host.bot_finished(self.conversation, self, reason)

    async def _connect_and_serve(self) -> str:
        deadline = time.monotonic() + self.settings.connect_seconds
        attempt = 0
        told = False
        while self._stop_reason is None:
            try:
                ws = await connect(self.settings.url, open_timeout=2, max_size=2**20, compression=None)
            except (OSError, TimeoutError, InvalidURI, InvalidHandshake) as exc:
                log.info("[%s] bot unreachable (%s)", self.conversation, exc)
                if not told:
                    told = True
                    await self.host.bot_connecting(self.conversation)
                if time.monotonic() >= deadline:
                    return "unavailable"
                await asyncio.sleep(BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)])
                attempt += 1
                continue
            self.connects += 1
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            outcome = await self._serve(ws)
            if outcome != "lost":
                return outcome
            # The bot went away mid-conversation: try again within a fresh window.
            deadline = time.monotonic() + self.settings.connect_seconds
            attempt = 0
        return self._stop_reason or "stopped"

    async def _serve(self, ws: ClientConnection) -> str:
        self._ws = ws
        self.state = BotState.ACTIVE
        for item in reversed(self.protocol.opening()):
            self._outbox.appendleft((item, False, 0.0, 0.0))
        self._wake.set()
        writer = asyncio.create_task(self._write(ws))
        try:
            return await self._read(ws)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await ws.close()
            self._ws = None
            self.state = BotState.CONNECTING

    async def _write(self, ws: ClientConnection) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._outbox:
                    item, _, arrived, queued = self._outbox.popleft()
                    await ws.send(item)
                    if arrived:
                        self.host.bot_frame_sent(arrived, queued)
                if self._stop_reason is not None:
                    await ws.close()
                    return
        except ConnectionClosed:
            return

    async def _read(self, ws: ClientConnection) -> str:
        try:
            async for data in ws:
                try:
                    action = self.protocol.parse(data)
                except native.BotProtocolError as exc:
                    self.bad_messages += 1
                    self.host.bot_problem("bad_message")
                    log.warning("[%s] bad message from the bot: %s", self.conversation, exc)
                    self._send(self.protocol.error("bad_request", str(exc)))
                    continue
                outcome = await self._handle(action)
                if outcome is not None:
                    return outcome
        except ConnectionClosed:
            pass
        return self._stop_reason or "lost"

    def _play(self, pcm: bytes, rate: int) -> None:
        accepted = self.playback.enqueue(pcm, rate)
        if accepted < len(pcm) - len(pcm) % 2:
            self._send(
                self.protocol.error(
                    "buffer_full",
                    f"more than {self.settings.max_buffer_seconds:g} s of audio queued;"
                    f" {len(pcm) - accepted} bytes were not queued",
                )
            )

    async def _handle(self, message: native.Action) -> str | None:
        match message:
            case native.Audio():
                self._play(message.pcm, message.sample_rate or self._rate)
            case native.BotChat():
                await self.host.bot_chat(self.conversation, self.participant, message.text)
            case native.AudioFormat():
                self._rate = message.sample_rate
                self.playback.set_rate(message.sample_rate)  # encode at the bot's own rate
            case native.BotMark():
                self._mark(message.name)
            case native.Clear():
                self._send(self.protocol.cleared(self._silence()))
            case native.Transcript():
                self.host.bot_transcript(self.conversation, self.participant, message.text, message.final)
            case native.Transfer():
                await self.host.bot_transfer(self.conversation, message.reason[:200])
            case native.BotUpgrade():
                await self.host.bot_upgrade(self.conversation, self.participant, message.media)
            case native.Hangup():
                self._stop_reason = "hangup"
                return "hangup"
        return None

    def _silence(self) -> list[str]:
        """Stop the bot's voice now: its queue, and the frames already on their way out."""
        cleared = self.playback.clear()
        if self.relay is not None:
            self.relay.flush()
        return cleared

    def _mark(self, name: str) -> None:
        future = self.playback.mark(name)

        def played(done: asyncio.Future[bool]) -> None:
            if not done.cancelled() and done.result():
                self._send(self.protocol.mark(name))

        future.add_done_callback(played)


class ContinuousAudio:
    """A tap on the customer's audio for protocols that stream it all (Twilio)."""

    def __init__(self, connector: BotConnector, sample_rate: int) -> None:
        self.connector = connector
        self.relay: Relay | None = None
        self._converter = FrameConverter(frame_ms=20, sample_rate=sample_rate)

    def push(self, frame: MediaFrame) -> None:
        if self.connector.state is BotState.STOPPED:
            return
        protocol = self.connector.protocol
        for pcm in self._converter.feed_any(frame):
            self.connector._send(protocol.audio(pcm.pcm, pcm.t), audio=True)

    def clear(self) -> None:
        self._converter.reset()
