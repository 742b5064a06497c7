"""Voice activity detection: frames in, speech segments out (sans-I/O).

``Segmenter`` turns a stream of ``PcmFrame``s into ``SpeechStarted``, ``SpeechFrame``
and ``SpeechStopped`` events with hysteresis, like Pipecat's analyzer
(QUIET → STARTING → SPEAKING → STOPPING):

- speech starts when at least ``start_ratio`` of the last ``start_ms`` of frames are
  voiced (one click or cough-length blip does not start a segment);
- it stops after ``stop_ms`` without a voiced frame (the hangover: pauses between
  words must not cut a sentence in two); gaps in the stream count as silence;
- a segment begins with ``preroll_ms`` of audio from before its start, so a listener
  hears the first syllable that the detector needed a few frames to be sure of;
- the first ``warmup_ms`` of a stream cannot start speech: webrtcvad calls steady
  noise voiced until its noise model has adapted (measured: 80 ms of white noise).

The detector is behind ``VoiceDetector`` (one method), so another model (Silero via
onnxruntime, say) can replace webrtcvad without touching callers.
"""

from __future__ import annotations

import collections
import enum
import math
from dataclasses import dataclass
from typing import Protocol

import webrtcvad

from .convert import VALID_FRAME_MS, PcmFrame


class VoiceDetector(Protocol):
    def is_speech(self, pcm: bytes, sample_rate: int) -> bool:
        """Is this one frame (10, 20 or 30 ms of PCM16 mono) voiced?"""


class WebRtcVad:
    """Google's WebRTC VAD (a GMM over band energies; about 1 to 2 µs per frame)."""

    def __init__(self, aggressiveness: int = 3) -> None:
        if not 0 <= aggressiveness <= 3:
            raise ValueError("aggressiveness is 0 (least) to 3 (most aggressive at rejecting non-speech)")
        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, pcm: bytes, sample_rate: int) -> bool:
        return bool(self._vad.is_speech(pcm, sample_rate))


@dataclass(frozen=True, slots=True)
class VadSettings:
    aggressiveness: int = 3
    frame_ms: int = 20
    sample_rate: int = 16_000
    #: Voiced audio needed before speech counts as started.
    start_ms: int = 60
    #: Share of the frames in that window that must be voiced.
    start_ratio: float = 0.8
    #: Silence that ends a segment (the hangover).
    stop_ms: int = 500
    #: A pause this long inside a segment is announced (``SpeechPaused``): a hint that the
    #: turn may be over, ahead of the hangover. 0, or not below ``stop_ms``: no hint.
    pause_ms: int = 200
    #: Audio from before the start that a segment carries.
    preroll_ms: int = 200
    #: At the start of a stream webrtcvad calls steady noise voiced for ~80 ms while
    #: its noise model adapts; frames this early feed the detector but start nothing.
    warmup_ms: int = 120

    def __post_init__(self) -> None:
        if self.frame_ms not in VALID_FRAME_MS:
            raise ValueError(f"frame_ms must be one of {VALID_FRAME_MS}")
        if self.sample_rate not in (8000, 16000, 32000, 48000):
            raise ValueError("sample_rate must be 8, 16, 32 or 48 kHz")
        if not 0 < self.start_ratio <= 1:
            raise ValueError("start_ratio must be in (0, 1]")
        if self.pause_ms < 0:
            raise ValueError("pause_ms must not be negative")
        if min(self.start_ms, self.stop_ms) < self.frame_ms or min(self.preroll_ms, self.warmup_ms) < 0:
            raise ValueError("start_ms and stop_ms must be at least one frame; preroll_ms, warmup_ms not negative")


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    t: int  # stream ms of the first voiced frame


@dataclass(frozen=True, slots=True)
class SpeechFrame:
    pcm: bytes
    t: int
    #: The detector called this frame voiced (False: a pause inside the segment, or its
    #: hangover); preroll frames count as voiced. What a barge-in decision looks at.
    voiced: bool = True


@dataclass(frozen=True, slots=True)
class SpeechPaused:
    """The speaker has been quiet for ``pause_ms`` (once per pause): they may have finished
    (``SpeechStopped`` follows after the rest of the hangover) or may go on."""

    t: int  # stream ms where the last voiced frame ended


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    t: int  # stream ms where the last voiced frame ended
    duration: int  # ms from SpeechStarted.t to t


Event = SpeechStarted | SpeechFrame | SpeechPaused | SpeechStopped


class SegmentState(enum.Enum):
    QUIET = "quiet"
    STARTING = "starting"  # some voiced frames, not enough yet
    SPEAKING = "speaking"
    STOPPING = "stopping"  # in the hangover after the last voiced frame


_NO_EVENTS: tuple[Event, ...] = ()


class Segmenter:
    def __init__(self, settings: VadSettings | None = None, detector: VoiceDetector | None = None) -> None:
        self.settings = s = settings or VadSettings()
        self.detector = detector or WebRtcVad(s.aggressiveness)
        self.state = SegmentState.QUIET
        self._window_frames = max(1, s.start_ms // s.frame_ms)
        self._needed = math.ceil(s.start_ratio * self._window_frames)
        #: Voiced flags of the last start_ms of contiguous frames.
        self._window: collections.deque[bool] = collections.deque(maxlen=self._window_frames)
        #: Recent frames, enough for the preroll and the start window.
        self._recent: collections.deque[PcmFrame] = collections.deque(
            maxlen=(s.preroll_ms + s.start_ms) // s.frame_ms + 1
        )
        self._next_t: int | None = None
        self._warm_after: int | None = None
        self._started_at = 0
        self._voiced_until = 0
        #: The current pause has been announced (``SpeechPaused``).
        self._paused = False

    @property
    def speaking(self) -> bool:
        return self.state in (SegmentState.SPEAKING, SegmentState.STOPPING)

    def feed(self, frame: PcmFrame) -> tuple[Event, ...] | list[Event]:
        """One frame in; the events it causes out (usually none or one SpeechFrame)."""
        s = self.settings
        voiced = self.detector.is_speech(frame.pcm, s.sample_rate)
        if self._warm_after is None:
            self._warm_after = frame.t + s.warmup_ms
        if frame.t < self._warm_after:
            voiced = False  # the detector is still adapting to this stream's noise
        contiguous = self._next_t is None or frame.t == self._next_t
        self._next_t = frame.t + s.frame_ms
        if self.speaking:
            return self._in_speech(frame, voiced)
        if not contiguous:
            self._window.clear()  # a start window must be continuous audio
        self._window.append(voiced)
        self._recent.append(frame)
        voiced_count = sum(self._window)
        if voiced_count >= self._needed and len(self._window) == self._window_frames:
            return self._start()
        self.state = SegmentState.STARTING if voiced_count else SegmentState.QUIET
        return _NO_EVENTS

    def flush(self) -> tuple[Event, ...]:
        """End of stream: close an open segment."""
        if not self.speaking:
            return _NO_EVENTS
        return (self._stop(),)

    def _start(self) -> list[Event]:
        s = self.settings
        # The onset: the first voiced frame of the window that triggered.
        window_start = len(self._recent) - self._window_frames
        onset = next(i for i in range(window_start, len(self._recent)) if self._window[i - window_start])
        self._started_at = self._recent[onset].t
        self._voiced_until = self._recent[-1].t + s.frame_ms
        events: list[Event] = [SpeechStarted(self._started_at)]
        events.extend(SpeechFrame(f.pcm, f.t) for f in self._recent if f.t >= self._started_at - s.preroll_ms)
        self._recent.clear()
        self._window.clear()
        self.state = SegmentState.SPEAKING
        self._paused = False
        return events

    def _in_speech(self, frame: PcmFrame, voiced: bool) -> list[Event]:
        s = self.settings
        events: list[Event] = [SpeechFrame(frame.pcm, frame.t, voiced)]
        if voiced:
            self._voiced_until = frame.t + s.frame_ms
            self.state = SegmentState.SPEAKING
            self._paused = False
            return events
        quiet = frame.t + s.frame_ms - self._voiced_until
        if quiet >= s.stop_ms:
            events.append(self._stop())
            return events
        self.state = SegmentState.STOPPING
        if 0 < s.pause_ms <= quiet and not self._paused:
            self._paused = True
            events.append(SpeechPaused(self._voiced_until))
        return events

    def _stop(self) -> SpeechStopped:
        self.state = SegmentState.QUIET
        return SpeechStopped(self._voiced_until, self._voiced_until - self._started_at)
