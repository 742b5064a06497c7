"""One conversation's link to its speech bot (native protocol).

The gateway dials the bot, as Twilio and Vonage do with media streams. A
``BotConnector`` owns everything of that link: the websocket, a reader and a writer
task, a bounded outbox, and the ``PlaybackTrack`` that carries the bot's voice to the
customer (a routed virtual source). It reconnects with backoff inside a window; when
the bot cannot be reached the conversation goes to the agent queue (``bot_unavailable``).

Barge-in happens here, with no round trip, for any bot (``Barge``): the customer's
voice pipeline calls the connector synchronously on ``SpeechStarted``; if the bot is
being played it is **held** at once (silent from the next 20 ms slot, its queue kept).
Speech that stays voiced for ``barge_in_min_ms`` **interrupts**: the held audio is
dropped, the bot is told (``interrupted`` with the marks that will not be played and
how much was heard; a Twilio bot gets those marks echoed, as Twilio does on ``clear``),
and audio the bot goes on sending is **discarded** until it sends ``clear`` (or, native,
a ``mark``: what follows is a new answer), at most ``barge_in_hold_ms``. Shorter sound
(a cough, a "mm") is a false interruption: playback resumes where it stopped, nothing
lost.

Its tasks belong to one ``TaskOwner`` (a failure is logged and reported to the host as
the ``task_failure`` problem); ``attach`` hooks it into the customer's voice pipeline
once, and ``detach`` (also done when the link ends) takes it out again.
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
from media.playback import MAX_MARKS, PlaybackTrack, opus_slots
from media.relay import MediaFrame, Relay, Subscriber
from media.tasks import TaskOwner
from media.vad import Event, SpeechFrame, SpeechPaused, SpeechStarted, SpeechStopped

from ..messages import Participant, Role
from ..protocol import TokenBucket
from . import link_token, native
from .frames import MaskKeys, client_frame
from .native import BotProtocol

log = logging.getLogger("talkgate.bot")

#: Backoff between connection attempts (the last value repeats).
BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0)
#: Audio frames are written straight to the bot's socket while less than this waits in
#: the transport's buffer; above it they queue in the outbox (which drops the oldest).
DIRECT_WRITE_BYTES = 64 * 1024
#: Bot messages handled in a row before the reader lets the loop run other work.
READ_BURST = 16
#: The kernel's send buffer toward the bot (Linux doubles it). Left to autotuning it grows
#: to megabytes: a minute of speech could sit in the kernel for a bot that stopped reading,
#: hiding it from the backlog limit, and stale audio would reach a bot that is merely slow.
SEND_BUFFER_BYTES = 64 * 1024
#: How long ``stop`` lets the writer deliver ``stop`` to the bot; then how long it waits
#: for the cancelled tasks.
STOP_GRACE_SECONDS = 1.0
CLOSE_SECONDS = 2.0
#: Longer mark names are refused (``bad_request``): a pending mark holds its name, and
#: a bot's message may be 1 MiB.
MAX_MARK_NAME_CHARS = 256
#: A pause this long after too little speech over a held bot resumes it (ms).
BARGE_PAUSE_MS = 200


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
    #: Marks waiting for their audio to play, at most; one more drops the oldest.
    max_marks: int = MAX_MARKS
    #: What the bot may say to the conversation (chat, transcript, transfer, upgrade): a
    #: token bucket, so a runaway bot gets ``rate_limited`` errors instead of flooding the
    #: customer's outbox (which would disconnect the customer).
    rate_per_second: float = 20.0
    rate_burst: int = 60
    #: ``--bot-secret``: each connection attempt carries a fresh signed token
    #: (``link_token``) in its ``Authorization`` header; "" sends none.
    secret: str = ""
    #: Voiced speech over the bot for this long interrupts it; shorter resumes it.
    barge_in_min_ms: int = 300
    #: After an interruption, the bot's audio is dropped until its ``clear`` (or, native,
    #: a ``mark``), at most this long.
    barge_in_hold_ms: int = 2000


#: Errors sent to a bot: a burst, then at most this many a second (the rest are counted
#: and the next error says how many).
ERROR_BURST = 20
ERROR_RATE = 2.0
#: Bot messages that reach the conversation's participants: rate-limited.
_TO_CONVERSATION = (native.BotChat, native.Transcript, native.Transfer, native.BotUpgrade)


class BotState(enum.Enum):
    CONNECTING = "connecting"
    ACTIVE = "active"
    STOPPED = "stopped"


class Barge(enum.Enum):
    """Where a barge-in stands (see the module's docstring)."""

    NONE = "none"
    #: The customer started speaking over the bot: it is held while that is decided.
    HELD = "held"
    #: Interrupted: what the bot still sends of its old answer is dropped.
    DISCARDING = "discarding"


class BotHost(Protocol):
    """What the connector needs from the gateway (the BotManager implements it)."""

    def bot_problem(self, kind: str) -> None:
        """Count a problem: "bad_message", "dropped_frame", "dropped_mark" (``max_marks``
        were pending: the oldest was dropped), "task_failure" (one of the link's tasks
        raised) or "playback_step" (a 20 ms playback step raised; the voice went on)."""

    def bot_frame_sent(self, arrived: float, queued: float) -> None:
        """A live speech frame was written to the bot: perf_counter() times of its RTP
        packet's arrival and of the frame leaving the voice pipeline."""

    async def bot_chat(self, conversation: str, bot: Participant, text: str) -> None: ...

    def bot_transcript(
        self, conversation: str, bot: Participant, text: str, final: bool, speaker: Participant
    ) -> None: ...

    async def bot_transfer(self, conversation: str, reason: str) -> None: ...

    async def bot_upgrade(self, conversation: str, bot: Participant, media: str) -> None: ...

    async def bot_connecting(self, conversation: str) -> None: ...

    async def bot_finished(self, conversation: str, connector: BotConnector, reason: str) -> None: ...


class _Problems:
    """A ``Tally`` for media objects that reports each count as a host problem."""

    def __init__(self, host: BotHost, kind: str) -> None:
        self.host = host
        self.kind = kind

    def inc(self, amount: float = 1) -> None:
        for _ in range(int(amount)):
            self.host.bot_problem(self.kind)


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
            max_marks=settings.max_marks,
            on_mark_dropped=self._mark_dropped,
            step_failures=_Problems(host, "playback_step"),
        )
        #: Every task of this link (the link itself, its writer); failures logged and counted.
        self.tasks = TaskOwner(f"bot {conversation}", log, failures=_Problems(host, "task_failure"))
        #: The relay carrying the playback to the customer (set by the manager).
        self.relay: Relay | None = None
        self.state = BotState.CONNECTING
        #: (message, is audio, arrival and queueing time of a live frame or 0.0) for the
        #: bot, in order; bounded: the oldest audio goes first.
        self._outbox: collections.deque[tuple[str | bytes, bool, float, float]] = collections.deque()
        #: Where ``attach`` hooked in (undone by ``detach``): the customer's voice pipeline,
        #: and the continuous-audio tap with the list the router subscribes from.
        self._pipeline: VoicePipeline | None = None
        self._tap: ContinuousAudio | None = None
        self._taps: list[Subscriber] | None = None
        self._wake = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._mask_keys = MaskKeys()
        self._rate = 16_000  # of the bot's audio, from audio.format
        self._stop_reason: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._bucket = TokenBucket(settings.rate_per_second, settings.rate_burst, time.monotonic())
        self._error_bucket = TokenBucket(ERROR_RATE, ERROR_BURST, time.monotonic())
        self._errors_suppressed = 0
        #: The barge-in state, the onset and the end of the last voiced frame of the speech
        #: that caused it (stream ms), and when discarding ends (loop time).
        self.barge = Barge.NONE
        self._barge_onset = 0
        self._barge_voiced_until = 0
        self._discard_until = 0.0
        #: Counters for metrics and tests.
        self.rate_limited = 0
        self.dropped_frames = 0
        self.bad_messages = 0
        self.marks_dropped = 0
        self.connects = 0
        self.interruptions = 0
        self.false_interruptions = 0

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Start the link's task (owned by ``self.tasks``; ``stop`` ends it)."""
        self._task = self.tasks.spawn(self._run(), f"talkgate-bot-{self.conversation}")
        return self._task

    async def stop(self, reason: str) -> None:
        """Tell the bot why (``stop``), close the link, end every task, ``detach``."""
        if self._stop_reason is None:
            self._stop_reason = reason
            self._send(self.protocol.stop(reason))
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            # Give the writer a moment to deliver stop (a failure is the owner's to log).
            await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
        await self.tasks.close(CLOSE_SECONDS)
        self.playback.stop()
        self.detach()
        self.state = BotState.STOPPED

    def abort(self) -> None:
        """Cut the link now, without a goodbye or a close handshake (a shutdown whose time
        is up: the bot did not take its ``stop``)."""
        if self._stop_reason is None:
            self._stop_reason = "shutdown"
        if self._ws is not None:
            self._ws.transport.abort()

    # -- from the gateway -------------------------------------------------------------------

    def attach(self, pipeline: VoicePipeline, taps: list[Subscriber]) -> None:
        """Stream this customer's speech to the bot (and barge in on it).

        A protocol that wants continuous audio (Twilio) also gets a tap on the
        customer's audio, added to ``taps`` for the router to subscribe. Idempotent:
        attaching again to the same pipeline changes nothing; to another one (the
        customer's new call) moves the listener and the tap there.
        """
        if self.state is BotState.STOPPED:
            return
        previous = self._pipeline
        if previous is not None and previous is not pipeline:
            self.end_call("replaced")  # a new call without the old one's end: end it first
        if self._pipeline is not pipeline or self._taps is not taps:
            self.detach()
        if previous is not pipeline and self._ws is not None:
            # The call with the bot begins (sent by ``_serve`` instead if the link is not up yet).
            self._send(self.protocol.call_started())
        self._pipeline = pipeline
        if self._on_speech not in pipeline.listeners:
            pipeline.listeners.append(self._on_speech)
        if self.protocol.continuous_rate is not None:
            if self._tap is None:
                self._tap = ContinuousAudio(self, self.protocol.continuous_rate)
            self._taps = taps
            if self._tap not in taps:
                taps.append(self._tap)

    def detach(self) -> None:
        """Undo ``attach``: the listener leaves the pipeline, the tap its list and relay.

        Idempotent; ``stop`` and the end of the link call it too.
        """
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            with contextlib.suppress(ValueError):
                pipeline.listeners.remove(self._on_speech)
        tap, taps, self._taps = self._tap, self._taps, None
        if tap is not None:
            if taps is not None:
                with contextlib.suppress(ValueError):
                    taps.remove(tap)
            if tap.relay is not None:
                tap.relay.unsubscribe(tap)

    def end_call(self, reason: str) -> None:
        """The customer's call with the bot ended: the bot hears of it (``call.ended``, or a
        Twilio stream's ``stop``), what it was saying is dropped, its speech is no longer
        listened to. Nothing if no call was attached."""
        if self._pipeline is None:
            return
        self._silence()
        self.barge = Barge.NONE
        self.playback.resume()
        self.detach()
        ended = self.protocol.call_ended(reason)  # the protocol's state moves on either way
        if self._ws is not None:
            self._send(ended)

    @property
    def in_call(self) -> bool:
        """The customer is in a voice call with the bot (its speech is attached)."""
        return self._pipeline is not None

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
            if self.barge is Barge.HELD:
                self._decide(event)
        elif isinstance(event, SpeechStarted):
            if self.settings.barge_in and self.playback.talking and not self.playback.held:
                self._hold(event.t)
            self._send(self.protocol.speech_started(event.t))
        elif isinstance(event, SpeechPaused):
            self._send(self.protocol.speech_paused(event.t))
        elif isinstance(event, SpeechStopped):
            if self.barge is Barge.HELD:
                self._resume()  # ended before it was long enough to interrupt
            self._send(self.protocol.speech_stopped(event.t, event.duration))

    # -- barge-in -------------------------------------------------------------------------

    def _hold(self, onset: int) -> None:
        self.playback.hold()
        if self.relay is not None:
            self.relay.flush()  # the frames already on their way out too
        self.barge = Barge.HELD
        self._barge_onset = self._barge_voiced_until = onset

    def _decide(self, frame: SpeechFrame) -> None:
        """Each frame of the speech over a held bot: long enough voiced, interrupt; a pause
        after too little (``BARGE_PAUSE_MS``), resume."""
        frame_ms = self._pipeline.settings.frame_ms if self._pipeline is not None else 20
        if frame.voiced:
            self._barge_voiced_until = max(self._barge_voiced_until, frame.t + frame_ms)
            if self._barge_voiced_until - self._barge_onset >= self.settings.barge_in_min_ms:
                self._interrupt()
        elif frame.t + frame_ms - self._barge_voiced_until >= BARGE_PAUSE_MS:
            self._resume()

    def _resume(self) -> None:
        self.barge = Barge.NONE
        self.playback.resume()
        self.false_interruptions += 1

    def _interrupt(self) -> None:
        if not self.playback.queued_samples:
            # The bot had just finished and sent nothing more: nothing to interrupt, and its
            # next answer must not be taken for the rest of this one.
            self.barge = Barge.NONE
            self.playback.resume()
            return
        heard = self.playback.heard_ms
        marks = self._silence()
        self.playback.resume()  # nothing is queued now: the bot's next answer plays
        self.barge = Barge.DISCARDING
        self._discard_until = time.monotonic() + self.settings.barge_in_hold_ms / 1000
        self.interruptions += 1
        self._send(self.protocol.interrupted(marks, heard))

    def _discarding(self) -> bool:
        """Whether bot audio arriving now belongs to the interrupted answer."""
        if self.barge is Barge.DISCARDING and time.monotonic() >= self._discard_until:
            self.barge = Barge.NONE
        return self.barge is Barge.DISCARDING

    # -- outbox -------------------------------------------------------------------------------

    def _error(self, code: str, message: str) -> None:
        """Tell the bot what went wrong; past a burst, at most ``ERROR_RATE`` a second. A bot
        that floods (marks, over-rate chat, garbage) must not get a reply per message, or the
        replies would fill the outbox and look like a bot that stopped reading."""
        if not self._error_bucket.take(time.monotonic()):
            self._errors_suppressed += 1
            return
        if self._errors_suppressed:
            message = f"{message} ({self._errors_suppressed} more errors were not reported)"
            self._errors_suppressed = 0
        self._send(self.protocol.error(code, message))

    def _send(self, items: list[str | bytes], *, audio: bool = False) -> None:
        for item in items:
            self._push(item, audio)

    def _push(self, item: str | bytes, audio: bool, arrived: float = 0.0, queued: float = 0.0) -> None:
        if self.state is BotState.STOPPED:
            return
        if not self._outbox and self._stop_reason is None and self._write_now(item):
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
        """Write a message to the socket from the caller's stack, if nothing queued must go
        first and the socket keeps up: no writer-task wake-up and no coroutines per 20 ms
        frame (``_write``'s ``ws.send`` writes its message before it may wait, so what it
        sent is already ahead). ``frames.client_frame`` lays the frame out."""
        ws = self._ws
        protocol = ws.protocol if ws is not None else None
        if protocol is None or protocol.state is not State.OPEN or protocol.expect_continuation_frame:
            return False
        if protocol.extensions:  # pragma: no cover - links open with compression=None
            return False
        assert ws is not None
        if ws.transport.get_write_buffer_size() > DIRECT_WRITE_BYTES:
            return False  # the bot is slow: the outbox's bound applies
        ws.transport.write(client_frame(item, self._mask_keys))
        return True

    # -- the link -----------------------------------------------------------------------------

    async def _run(self) -> None:
        reason = "unavailable"
        try:
            reason = await self._connect_and_serve()
        finally:
            self.state = BotState.STOPPED
            self.detach()
            await self.host.bot_finished(self.conversation, self, reason)

    async def _connect_and_serve(self) -> str:
        deadline = time.monotonic() + self.settings.connect_seconds
        attempt = 0
        told = False
        while self._stop_reason is None:
            try:
                headers = {}
                if self.settings.secret:
                    token = link_token.issue(
                        self.settings.secret,
                        url=self.settings.url,
                        conversation=self.conversation,
                        customer=self.customer.identity,
                    )
                    headers["Authorization"] = f"Bearer {token}"
                ws = await connect(
                    self.settings.url,
                    additional_headers=headers,
                    open_timeout=2,
                    # A bot that does not answer the close handshake costs at most this.
                    close_timeout=STOP_GRACE_SECONDS,
                    max_size=2**20,
                    compression=None,
                )
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
        opening = self.protocol.opening()
        if self._pipeline is not None:
            opening += self.protocol.call_started()  # a call began before the link was up
        for item in reversed(opening):
            self._outbox.appendleft((item, False, 0.0, 0.0))
        self._wake.set()
        writer = self.tasks.spawn(self._write(ws), f"talkgate-bot-writer-{self.conversation}")

        # A writer that fails (the owner logs it) ends the link: the reader would wait forever.
        def writer_ended(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                ws.transport.abort()

        writer.add_done_callback(writer_ended)
        try:
            return await self._read(ws)
        finally:
            await self.tasks.cancel(writer, CLOSE_SECONDS)
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
        handled = 0
        try:
            async for data in ws:
                handled += 1
                try:
                    action = self.protocol.parse(data)
                except native.BotProtocolError as exc:
                    self._bad_message(str(exc))
                    continue
                outcome = await self._handle(action)
                if outcome is not None:
                    return outcome
                if self._outbox or handled % READ_BURST == 0:
                    # Reading never yields while data is buffered. Replies queued: let the
                    # writer run before the next message (a flood of replies would look like
                    # a bot that stopped reading); and a burst (a TTS answer sent at once,
                    # an Opus packet per message) must not hold the loop for everyone else.
                    await asyncio.sleep(0)
        except ConnectionClosed:
            pass
        return self._stop_reason or "lost"

    def _bad_message(self, problem: str) -> None:
        self.bad_messages += 1
        self.host.bot_problem("bad_message")
        log.warning("[%s] bad message from the bot: %s", self.conversation, problem)
        self._error("bad_request", problem)

    def _malformed(self, audio: native.Audio) -> str | None:
        """What is wrong with the bot's binary audio (None: playable, or empty: nothing)."""
        data = audio.pcm
        if not data or audio.sample_rate is not None:  # nothing; or decoded by the protocol
            return None
        if not self.playback.passthrough:
            return f"binary audio is PCM16: an even number of bytes, not {len(data)}" if len(data) % 2 else None
        try:
            opus_slots(data)
        except ValueError as exc:
            return f"binary audio is one Opus packet (audio.format said opus): {exc}"
        return None

    def _play(self, data: bytes, rate: int) -> None:
        """Queue the bot's audio in the format it announced: PCM16, or one Opus packet."""
        if not data:
            return
        if self.playback.passthrough:
            if not self.playback.enqueue_opus(data):
                self._error(
                    "buffer_full",
                    f"more than {self.settings.max_buffer_seconds:g} s of audio queued; this packet was not queued",
                )
            return
        accepted = self.playback.enqueue(data, rate)
        if accepted < len(data):
            self._error(
                "buffer_full",
                f"more than {self.settings.max_buffer_seconds:g} s of audio queued;"
                f" {len(data) - accepted} bytes were not queued",
            )

    def _set_format(self, message: native.AudioFormat) -> None:
        """PCM at the bot's own rate (encoded at that rate), or Opus packets passed through.
        PCM's rate may change at any time (later audio is resampled); PCM and Opus do not
        mix in the queue, so the encoding changes only while nothing is queued."""
        opus = message.encoding == "opus"
        if opus != self.playback.passthrough and not (
            self.playback.set_passthrough() if opus else self.playback.set_rate(message.rate)
        ):
            self._bad_message(
                f"audio.format: the encoding changes only while nothing is queued (send clear first);"
                f" still {'pcm_s16le' if opus else 'opus'}"
            )
            return
        if not opus:
            self._rate = message.rate
            self.playback.set_rate(message.rate)  # encode at the bot's own rate (once nothing is queued)

    async def _handle(self, message: native.Action) -> str | None:
        if isinstance(message, _TO_CONVERSATION) and not self._bucket.take(time.monotonic()):
            self.rate_limited += 1
            self.host.bot_problem("rate_limited")
            if self.rate_limited == 1 or self.rate_limited % 100 == 0:
                log.warning("[%s] the bot is over its message rate (%d refused)", self.conversation, self.rate_limited)
            self._error(
                "rate_limited",
                f"more than {self.settings.rate_per_second:g} messages a second to the conversation; "
                "this one was not delivered",
            )
            return None
        match message:
            case native.Audio() if (problem := self._malformed(message)) is not None:
                self._bad_message(problem)
            case native.Audio() if self._pipeline is None:
                self.host.bot_problem("bad_message")  # counted: a Twilio stream has no error channel
                self._error(
                    "no_call", "no voice call with the customer: audio plays only between call.started and call.ended"
                )
            case native.Audio() if self._discarding():
                pass  # the rest of the interrupted answer
            case native.Audio():
                self._play(message.pcm, message.sample_rate or self._rate)
            case native.BotChat():
                await self.host.bot_chat(self.conversation, self.participant, message.text)
            case native.AudioFormat():
                self._set_format(message)
            case native.BotMark():
                if self.barge is Barge.DISCARDING and self.protocol.name == "native":
                    self.barge = Barge.NONE  # the interrupted answer ends here: what follows is new
                self._mark(message.name)
            case native.Clear():
                if self.barge is not Barge.NONE:
                    self.barge = Barge.NONE
                    self.playback.resume()
                self._send(self.protocol.cleared(self._silence()))
            case native.Transcript():
                speaker = self.customer if message.speaker == "customer" else self.participant
                self.host.bot_transcript(self.conversation, self.participant, message.text, message.final, speaker)
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
        if len(name) > MAX_MARK_NAME_CHARS:
            log.warning("[%s] bad message from the bot: a mark name of %d characters", self.conversation, len(name))
            self.bad_messages += 1
            self.host.bot_problem("bad_message")
            self._error("bad_request", f"a mark name has at most {MAX_MARK_NAME_CHARS} characters")
            return
        future = self.playback.mark(name)

        def played(done: asyncio.Future[bool]) -> None:
            if not done.cancelled() and done.result():
                self._send(self.protocol.mark(name))

        future.add_done_callback(played)

    def _mark_dropped(self, name: str) -> None:
        """``max_marks`` were pending: the oldest, ``name``, will never be reported played."""
        self.marks_dropped += 1
        self.host.bot_problem("dropped_mark")
        self._send(self.protocol.cleared([name]))  # Twilio echoes it, as for a clear
        self._error(
            "too_many_marks",
            f"more than {self.settings.max_marks} marks pending; the oldest, {name!r}, will not be reported",
        )


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
