"""Drive a ``Segmenter`` over a whole fixture, as the pipeline does, and keep what it said.

End-of-turn questions are answered at once (synchronously) by ``turn``; the time a real
model takes is for the benchmarks to add (``Segment.decided_at``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from media.convert import PcmFrame
from media.vad import Segmenter, SpeechFrame, SpeechPaused, SpeechStarted, SpeechStopped, VadSettings, VoiceDetector
from tests.speech import RATE

SETTINGS = VadSettings()


def frames_of(pcm: np.ndarray, frame_ms: int = 20) -> list[PcmFrame]:
    n = RATE * frame_ms // 1000
    return [PcmFrame(pcm[i : i + n].tobytes(), i * 1000 // RATE) for i in range(0, len(pcm) - n + 1, n)]


@dataclass
class Segment:
    start: int
    frames: list[SpeechFrame] = field(default_factory=list)
    stop: SpeechStopped | None = None
    #: Where each announced pause began (``SpeechPaused.t``).
    pauses: list[int] = field(default_factory=list)
    #: Stream ms at which the stop was reported (the end of the frame that caused it).
    reported_at: int = 0
    #: Each end-of-turn question's pause start and the model's probability.
    decisions: list[tuple[int, float]] = field(default_factory=list)
    #: CPU seconds the model took on the question that ended the segment (0: none did),
    #: and the stream ms at which that question was asked.
    decision_seconds: float = 0.0
    asked_at: int = 0
    #: The stream ended inside it (closed by ``flush``): it never ended by itself.
    unended: bool = False

    def decided_at(self) -> float:
        """When the stop would have been reported with a model that takes the CPU time it
        took here: not before the frame that reported it, nor before the answer."""
        return max(self.reported_at, self.asked_at + self.decision_seconds * 1000)


def segments(
    frames: list[PcmFrame],
    settings: VadSettings = SETTINGS,
    *,
    detector: VoiceDetector | None = None,
    turn: Callable[[bytes], float] | None = None,
) -> list[Segment]:
    """The segments found in ``frames``; with ``settings.smart``, ``turn`` answers each question.
    A segment still open at the end is closed there (``flush``): one that never ended counts."""
    segmenter = Segmenter(settings, detector)
    found: list[Segment] = []
    current = Segment(start=-1)
    for i, frame in enumerate(frames):
        events = list(segmenter.feed(frame))
        check = segmenter.take_turn_check()
        if check is not None:
            assert turn is not None, "smart turn detection needs a model"
            started = time.thread_time()
            probability = turn(check.pcm)
            current.decision_seconds = time.thread_time() - started
            current.asked_at = check.asked
            current.decisions.append((check.t, probability))
            events += segmenter.turn_decided(check, probability >= settings.turn_threshold)
        if i == len(frames) - 1 and segmenter.speaking:
            events += segmenter.flush()
            current.unended = True
        for event in events:
            if isinstance(event, SpeechStarted):
                current = Segment(start=event.t)
            elif isinstance(event, SpeechFrame):
                current.frames.append(event)
            elif isinstance(event, SpeechPaused):
                current.pauses.append(event.t)
            else:
                current.stop = event
                current.reported_at = frame.t + settings.frame_ms
                if not event.turn:
                    current.decision_seconds, current.asked_at = 0.0, 0
                found.append(current)
    return found
