"""Fan-out of one received track to many outputs, with bounded, drop-oldest queues.

``Relay`` reads its source track in one task (one reader per source, as aiortc's
``MediaRelay`` does) and pushes each frame into every subscribed ``OutputTrack``.

``OutputTrack`` is what the gateway gives an ``RTCRtpSender``: a track that lives as
long as the transceiver and whose *source* can be switched or removed at any time.
That matters because aiortc's sender loop ends for good when its track raises
``MediaStreamError``; a persistent output that simply waits while it has no source
lets routing change (an agent leaves, another joins) without renegotiation.

Queues are bounded: a slow consumer loses its oldest frames, never memory, and
never delays the reader or the other outputs. An audio output whose sender runs Opus
has no queue at all: ``direct`` (``media.outbound.DirectAudio``) sends each packet
as it is pushed.

Failures stay local: a subscriber whose ``push`` raises is skipped for that frame
(counted, logged at most once per ``FAILURE_LOG_SECONDS``) and the others still get
it; a source whose ``recv`` raises anything ends the relay as ``MediaStreamError``
does (``on_ended`` is called), with the exception logged and counted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av.frame import Frame
from av.packet import Packet

from .tasks import FailureLog, Tally, TaskOwner, cancel_and_wait
from .video import VideoPacket

log = logging.getLogger("talkgate.media.relay")

#: Frames an output may hold before dropping the oldest: 200 ms of 20 ms audio
#: frames; a single frame of video (only the latest picture matters).
QUEUE_FRAMES = {"audio": 10, "video": 1}
#: Live media must not lag: a reader that finds more than this many frames waiting
#: (it started late, or stalled) skips to the newest CATCH_UP_TO instead of keeping a
#: standing backlog, which would add its length to the latency for the rest of the call.
MAX_BACKLOG = {"audio": 3, "video": 1}
CATCH_UP_TO = {"audio": 2, "video": 1}
#: A subscriber that keeps failing is logged at most this often (it fails per frame).
FAILURE_LOG_SECONDS = 10.0
#: How long ``close()`` waits for the reader task after cancelling it.
CLOSE_SECONDS = 2.0

#: What a track's recv() yields: decoded frames, or encoded packets for pass-through.
MediaFrame: TypeAlias = "Frame | Packet[Any] | VideoPacket"


class Direct(Protocol):
    """A sender path that sends each pushed frame at once (``media.outbound``)."""

    active: bool

    def send(self, frame: Any) -> None: ...


class Subscriber(Protocol):
    """What a relay feeds: an output track, or a tap such as the voice pipeline."""

    relay: Relay | None

    def push(self, frame: MediaFrame) -> None: ...

    def clear(self) -> None: ...


class OutputTrack(MediaStreamTrack):
    """A sender's track: frames from whichever relay it is attached to, if any."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._frames: collections.deque[Frame | Packet[Any]] = collections.deque(maxlen=QUEUE_FRAMES[kind])
        self._max_backlog = MAX_BACKLOG[kind]
        self._catch_up_to = CATCH_UP_TO[kind]
        self._ready = asyncio.Event()
        #: The relay currently feeding this output (None: silent, the sender idles).
        self.relay: Relay | None = None
        #: Frames dropped because the consumer was slower than the source.
        self.dropped = 0
        #: Packets go out from push() itself (see media.outbound): audio once the sender
        #: runs Opus, video forwarded as RTP.
        self.direct: Direct | None = None

    def push(self, frame: MediaFrame) -> None:
        direct = self.direct
        if direct is not None and direct.active:
            direct.send(frame)
            return
        if isinstance(frame, VideoPacket):
            self.dropped += 1  # forwarded RTP, and this sender does not forward: aiortc cannot send it
            return
        if len(self._frames) == self._frames.maxlen:
            self.dropped += 1
        self._frames.append(frame)
        self._ready.set()

    def clear(self) -> None:
        self._frames.clear()

    async def recv(self) -> Frame | Packet[Any]:
        while not self._frames:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        if len(self._frames) > self._max_backlog:
            while len(self._frames) > self._catch_up_to:
                self._frames.popleft()
                self.dropped += 1
        return self._frames.popleft()

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.unsubscribe(self)
        super().stop()
        self._ready.set()  # wake a pending recv() so it raises


class Relay:
    """Reads one source track and copies each frame to its subscribed outputs.

    ``tasks``: the owner of the reader task (default: the relay owns it alone; either
    way ``close()`` ends it). ``reader_failures`` / ``subscriber_failures`` count a
    source that failed and a subscriber push that failed (the gateway's metrics).
    """

    class Source(Protocol):
        """What a relay reads: an aiortc track, or anything with its ``kind``, ``id`` and ``recv()``."""

        @property
        def kind(self) -> str: ...

        @property
        def id(self) -> str: ...

        async def recv(self) -> MediaFrame: ...

    def __init__(
        self,
        source: Relay.Source,
        *,
        on_ended: Callable[[Relay], None] | None = None,
        tasks: TaskOwner | None = None,
        reader_failures: Tally | None = None,
        subscriber_failures: Tally | None = None,
    ) -> None:
        self.source = source
        self.kind: str = source.kind
        self.outputs: set[Subscriber] = set()
        #: ``outputs`` as a tuple, rebuilt when it changes: deliver() iterates it with no
        #: allocation per frame, and a subscriber may (un)subscribe during a delivery.
        self._targets: tuple[Subscriber, ...] = ()
        self.frames = 0
        #: perf_counter() at which the frame now being delivered arrived (0.0: not known).
        self.arrived = 0.0
        self._on_ended = on_ended
        self._reader_failures = reader_failures
        #: Subscriber failures (push or clear raised): counted, logged rate-limited.
        self.subscriber_failures = FailureLog(
            f"relay {self.kind} {source.id}: a subscriber",
            logger=log,
            failures=subscriber_failures,
            interval=FAILURE_LOG_SECONDS,
        )
        self._tasks = tasks
        name = f"talkgate-relay-{self.kind}-{source.id}"
        run = self._run()
        self._task = tasks.spawn(run, name) if tasks is not None else asyncio.create_task(run, name=name)

    @property
    def finished(self) -> bool:
        """Has the reader task ended (source ended, or stopped and the cancel done)?"""
        return self._task.done()

    def subscribe(self, output: Subscriber) -> None:
        if output.relay is not None and output.relay is not self:
            output.relay.unsubscribe(output)
        output.relay = self
        if output not in self.outputs:
            self.outputs.add(output)
            self._targets = tuple(self.outputs)

    def unsubscribe(self, output: Subscriber, *, drop_queued: bool = True) -> None:
        """Detach an output; by default what it had queued from this source goes too."""
        if output in self.outputs:
            self.outputs.discard(output)
            self._targets = tuple(self.outputs)
        if output.relay is self:
            output.relay = None
            if drop_queued:
                self._clear(output)

    async def _run(self) -> None:
        try:
            while True:
                self.deliver(await self.source.recv())
        except MediaStreamError:
            # The source ended by itself (the remote stopped sending or closed);
            # frames already relayed are still delivered.
            pass
        except Exception as exc:
            # A source that fails ends like one that stops: outputs detached, owner told.
            log.error("relay %s %s: the source failed: %r", self.kind, self.source.id, exc, exc_info=exc)
            if self._reader_failures is not None:
                self._reader_failures.inc()
        self._ended()

    def _ended(self) -> None:
        for output in self._targets:
            self.unsubscribe(output, drop_queued=False)
        on_ended, self._on_ended = self._on_ended, None
        if on_ended is not None:
            try:
                on_ended(self)
            except Exception as exc:
                log.error("relay %s %s: on_ended failed: %r", self.kind, self.source.id, exc, exc_info=exc)

    def deliver(self, frame: MediaFrame, arrived: float = 0.0) -> None:
        """Copy one frame to every output: what the reader does, and what a push source calls.

        A push source (``media.inbound.InboundAudio``) delivers packets as they arrive,
        without a task hop; the reader task then only waits for the source to end. A
        subscriber that raises misses this frame; the others do not.
        """
        self.frames += 1
        self.arrived = arrived
        for output in self._targets:
            try:
                output.push(frame)
            except Exception as exc:
                self.subscriber_failures.failure(exc, type(output).__name__)

    def _clear(self, output: Subscriber) -> None:
        try:
            output.clear()
        except Exception as exc:
            self.subscriber_failures.failure(exc, f"{type(output).__name__}.clear")

    def flush(self) -> None:
        """Drop what every output has queued from this source (barge-in: stop *now*)."""
        for output in self._targets:
            self._clear(output)

    def stop(self) -> None:
        """Stop reading now; outputs are detached (they idle until attached elsewhere)."""
        self._on_ended = None
        for output in self._targets:
            self.unsubscribe(output)
        self._task.cancel()

    async def close(self, timeout: float = CLOSE_SECONDS) -> None:  # noqa: ASYNC109
        """``stop()`` and wait for the reader task to end (a failure is logged, not raised)."""
        self.stop()
        if self._tasks is not None:
            await self._tasks.cancel(self._task, timeout)  # the owner logs a failure as it ends
        else:
            await cancel_and_wait([self._task], log, timeout=timeout)
