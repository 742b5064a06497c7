"""The inbound voice pipeline of one speaker: decoded frames → 16 kHz frames → VAD → events.

``VoicePipeline`` subscribes to a ``Relay`` like an output does, but instead of
queueing frames it converts and segments each one at once, in the relay's reader
task: no extra task, queue or copy per frame. Events go to

- listeners: plain callables run synchronously (cheap things: a ``speaking`` flag); one
  that raises is counted and logged (rate-limited) and the others still get the event;
- ``events()``: a bounded async stream for a consumer with I/O of its own (the bot
  connector). If that consumer falls behind by ``max_events``, the oldest *audio
  frames* are dropped and counted; starts and stops are never dropped.

With smart turn detection the segmenter asks at each pause whether the turn is over;
the pipeline hands the question to the process's ``TurnWorker`` and gives the answer back
to the segmenter when it comes (on the event loop, between frames), dispatching the
``SpeechStopped`` it may cause like any other event.

It knows nothing of conversations or websockets.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from .convert import FrameConverter
from .tasks import FailureLog, Tally, Timer
from .vad import Event, Segmenter, SpeechFrame, TurnCheck, VadSettings, VoiceDetector

if TYPE_CHECKING:
    from .relay import MediaFrame, Relay
    from .turn import TurnWorker

Listener = Callable[[Event], None]

log = logging.getLogger("talkgate.media.pipeline")


class VoicePipeline:
    def __init__(
        self,
        settings: VadSettings | None = None,
        *,
        detector: VoiceDetector | None = None,
        turns: TurnWorker | None = None,
        max_events: int = 1000,
        listener_failures: Tally | None = None,
    ) -> None:
        self.settings = settings or VadSettings()
        if self.settings.smart and turns is None:
            raise ValueError("smart turn detection needs a TurnWorker (media.ears.Ears makes one per process)")
        self.converter = FrameConverter(frame_ms=self.settings.frame_ms, sample_rate=self.settings.sample_rate)
        self.segmenter = Segmenter(self.settings, detector)
        #: Decides this stream's turns (the process's worker; None: turns end on silence).
        self.turns = turns
        #: The relay feeding this pipeline (set by Relay.subscribe).
        self.relay: Relay | None = None
        self.listeners: list[Listener] = []
        self._events: collections.deque[Event] = collections.deque()
        self._max_events = max_events
        self._ready = asyncio.Event()
        #: Events are queued only once someone iterates events().
        self._consuming = False
        self._closed = False
        #: Speech frames dropped because the async consumer fell behind.
        self.dropped = 0
        #: When the input now being processed arrived (0.0: not known), and the stream
        #: time of the newest frame: listeners use them to time live frames.
        self.arrived = 0.0
        self.newest_t = -1
        #: Observes RTP arrival → frame out of the pipeline, per input (the gateway's metrics).
        self.timer: Timer | None = None
        #: Listener calls that raised (that listener missed that event; the others did not).
        self.listener_failures = FailureLog("voice pipeline listener", logger=log, failures=listener_failures)

    @property
    def speaking(self) -> bool:
        return self.segmenter.speaking

    # -- the relay subscriber interface -----------------------------------------------------

    def push(self, frame: MediaFrame) -> None:
        frames = self.converter.feed_any(frame)
        self.arrived = arrived = self.relay.arrived if self.relay is not None else 0.0
        for pcm in frames:
            self.newest_t = pcm.t
            for event in self.segmenter.feed(pcm):
                self._dispatch(event)
            if self.turns is not None and (check := self.segmenter.take_turn_check()) is not None:
                self.turns.ask(check, self._turn_decided)
        if arrived and self.timer is not None:
            self.timer.observe(time.perf_counter() - arrived)

    def clear(self) -> None:
        """The source changed: close an open segment, start a fresh timeline."""
        for event in self.segmenter.flush():
            self._dispatch(event)
        self.converter.reset()

    # -- consumers ----------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Every event from now on, in order, until ``close()``."""
        self._consuming = True
        while True:
            while self._events:
                yield self._events.popleft()
            if self._closed:
                return
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        if self.relay is not None:
            self.relay.unsubscribe(self)
        for event in self.segmenter.flush():
            self._dispatch(event)
        self._closed = True
        self._ready.set()

    def _turn_decided(self, check: TurnCheck, complete: bool | None) -> None:
        if self._closed:
            return
        for event in self.segmenter.turn_decided(check, complete):
            self._dispatch(event)

    def _dispatch(self, event: Event) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception as exc:
                self.listener_failures.failure(exc, getattr(listener, "__qualname__", type(listener).__name__))
        if not self._consuming or self._closed:
            return
        if len(self._events) >= self._max_events:
            self._drop_oldest_frame()
        self._events.append(event)
        self._ready.set()

    def _drop_oldest_frame(self) -> None:
        for i, queued in enumerate(self._events):
            if isinstance(queued, SpeechFrame):
                del self._events[i]
                self.dropped += 1
                return
