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

- with ``turn_detection="smart"`` a pause does not end the turn by itself: the segmenter
  asks whether the turn is over (``TurnCheck``, taken with ``take_turn_check``), and the
  answer (``turn_decided``) ends it at once, or lets it wait up to
  ``turn_max_silence_ms``; the model runs elsewhere (``media.turn``).

The detector is behind ``VoiceDetector`` (one method): ``WebRtcVad`` here, or Silero
(``media.silero``) without touching callers.
"""

from __future__ import annotations

import collections
import ctypes
import enum
import functools
import math
from dataclasses import dataclass
from typing import Any, Protocol

import _webrtcvad
import webrtcvad

from .convert import VALID_FRAME_MS, PcmFrame


class VoiceDetector(Protocol):
    def is_speech(self, pcm: bytes, sample_rate: int) -> bool:
        """Is this one frame (10, 20 or 30 ms of PCM16 mono) voiced?"""


class WebRtcVad:
    """Google's WebRTC VAD (a GMM over band energies; 2 to 4 µs per 20 ms frame).

    Without its own hangover: after speech, webrtcvad reports 3 more frames voiced (5 after
    140 ms of speech; 60 to 100 ms at 20 ms frames, in mode 3) whatever they hold, which the
    segmenter's hangover (``stop_ms``) then started counting from. That was most of the
    end-of-speech delay beyond ``stop_ms``. The library's C core says which frames those
    are (``2 + frames left`` instead of ``1``), and the ``webrtcvad`` wrapper folds them into
    True; so the core's per-rate function is called through ctypes, on the wrapper's own
    instance, and only its genuine decisions count (``raw``). Should the symbols be missing
    from a future wheel, it falls back to the wrapper (with the old tail); so does
    ``hangover=True`` (for comparisons).
    """

    def __init__(self, aggressiveness: int = 3, *, hangover: bool = False) -> None:
        if not 0 <= aggressiveness <= 3:
            raise ValueError("aggressiveness is 0 (least) to 3 (most aggressive at rejecting non-speech)")
        self._vad = webrtcvad.Vad(aggressiveness)
        core = None if hangover else _core()
        #: The C instance behind the wrapper, and the core's VAD per sample rate (None: fall back).
        self._instance = ctypes.c_void_p(_capsule_pointer(self._vad._vad, b"WebRtcVadPtr")) if core else None
        self._calc = core
        #: The decisions come without webrtcvad's hangover.
        self.raw = core is not None

    def is_speech(self, pcm: bytes, sample_rate: int) -> bool:
        if self._calc is None:
            return bool(self._vad.is_speech(pcm, sample_rate))
        samples = len(pcm) // 2
        if sample_rate not in self._calc or samples * 100 not in (sample_rate, 2 * sample_rate, 3 * sample_rate):
            raise ValueError("webrtcvad takes 10, 20 or 30 ms frames at 8, 16, 32 or 48 kHz")
        return bool(self._calc[sample_rate](self._instance, pcm, samples) == 1)


@functools.cache
def _core() -> dict[int, Any] | None:
    """``WebRtcVad_CalcVad{8,16,32,48}khz`` from the wrapper's extension module, or None."""
    try:
        library = ctypes.CDLL(_webrtcvad.__file__)
        calc = {rate: getattr(library, f"WebRtcVad_CalcVad{rate // 1000}khz") for rate in (8000, 16000, 32000, 48000)}
    except (OSError, AttributeError):
        return None
    for function in calc.values():
        function.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        function.restype = ctypes.c_int
    return calc


def _capsule_pointer(capsule: object, name: bytes) -> int:
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    get.restype = ctypes.c_void_p
    pointer = get(capsule, name)
    if not pointer:
        raise RuntimeError("webrtcvad's instance has no pointer")
    return int(pointer)


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
    #: The detector: "webrtc" (``WebRtcVad``) or "silero" (``media.silero``, made by
    #: ``media.ears.Ears``: its model is loaded once per process), and Silero's threshold.
    detector: str = "webrtc"
    silero_threshold: float = 0.5
    #: "silence": a segment ends after ``stop_ms`` of silence. "smart": at each pause of
    #: ``pause_ms`` the segmenter asks whether the turn is over (``TurnCheck``); yes ends
    #: it at once, no waits up to ``turn_max_silence_ms``, no answer falls back to ``stop_ms``.
    turn_detection: str = "silence"
    turn_max_silence_ms: int = 2000
    #: The question goes out this long before the pause is ``pause_ms`` long, its audio
    #: made up to a ``pause_ms`` pause with the pause's own last ``turn_early_ms`` (so the
    #: model hears what it would hear then); the answer counts only once the pause really
    #: is ``pause_ms`` long. The model's ≈ 50 ms of CPU then overlaps the pause instead of
    #: following it. 0: ask at ``pause_ms``.
    turn_early_ms: int = 80
    #: The end-of-turn model's probability from which a turn counts as complete.
    turn_threshold: float = 0.5

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
        if self.detector not in ("webrtc", "silero"):
            raise ValueError("the detector is webrtc or silero")
        if self.detector == "silero" and self.sample_rate != 16_000:
            raise ValueError("Silero VAD runs at a 16 kHz sample_rate here")
        if self.turn_max_silence_ms < self.frame_ms:
            raise ValueError("turn_max_silence_ms must be at least one frame")
        if self.turn_detection not in ("silence", "smart"):
            raise ValueError("turn_detection is silence or smart")
        if not 0 < self.silero_threshold < 1 or not 0 < self.turn_threshold < 1:
            raise ValueError("silero_threshold and turn_threshold are probabilities in (0, 1)")
        if self.smart and not 0 < self.pause_ms < self.turn_max_silence_ms:
            raise ValueError("with smart turn detection, 0 < pause_ms < turn_max_silence_ms (it asks at each pause)")
        if self.smart and (not 0 <= self.turn_early_ms <= self.pause_ms // 2 or self.turn_early_ms % self.frame_ms):
            raise ValueError("turn_early_ms is whole frames, at most half of pause_ms")
        if self.smart and self.sample_rate != 16_000:
            raise ValueError("the end-of-turn model hears 16 kHz audio: sample_rate must be 16000")

    @property
    def smart(self) -> bool:
        return self.turn_detection == "smart"


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
    #: Ended by the end-of-turn model (a complete turn), not by silence.
    turn: bool = False


Event = SpeechStarted | SpeechFrame | SpeechPaused | SpeechStopped


@dataclass(slots=True, eq=False)
class TurnCheck:
    """The segmenter's question at a pause (``--turn-detection smart``): is the turn over?

    Not an event: the pipeline hands it to the end-of-turn model and gives the answer
    back (``Segmenter.turn_decided``); the segment stays open meanwhile.
    """

    #: The segment's audio up to now (its last ``TURN_AUDIO_MS`` at most), preroll included.
    pcm: bytes
    t: int  # stream ms where the voice stopped
    asked: int  # stream ms at the end of the frame that raised it (``turn_early_ms`` before the pause)
    #: The speaker went on (or the segment ended) before the answer: it no longer matters.
    withdrawn: bool = False
    #: The model's answer, once it has one (for metrics and benchmarks).
    probability: float | None = None


class SegmentState(enum.Enum):
    QUIET = "quiet"
    STARTING = "starting"  # some voiced frames, not enough yet
    SPEAKING = "speaking"
    STOPPING = "stopping"  # in the hangover after the last voiced frame


_NO_EVENTS: tuple[Event, ...] = ()
#: The end-of-turn model hears at most this much of a segment.
TURN_AUDIO_MS = 8000


class Segmenter:
    def __init__(self, settings: VadSettings | None = None, detector: VoiceDetector | None = None) -> None:
        self.settings = s = settings or VadSettings()
        if detector is None and s.detector != "webrtc":
            raise ValueError("a Silero detector comes from media.ears.Ears (its model is loaded once per process)")
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
        #: Smart turns: the segment's recent audio (what the model hears), the question
        #: raised by the last ``feed`` and not yet taken, the one awaiting its answer; and for
        #: the current pause: asked already, answered complete before it was ``pause_ms``
        #: long, fallen back to the hangover (no answer).
        self._turn_audio: collections.deque[bytes] = collections.deque(maxlen=TURN_AUDIO_MS // s.frame_ms)
        self._asking: TurnCheck | None = None
        self._pending: TurnCheck | None = None
        self._asked = self._complete = self._fallback = False
        self._smart = s.smart  # read every frame

    @property
    def speaking(self) -> bool:
        return self.state in (SegmentState.SPEAKING, SegmentState.STOPPING)

    def take_turn_check(self) -> TurnCheck | None:
        """The question the last ``feed`` raised, if any (smart turn detection): hand it to the
        end-of-turn model and its answer to ``turn_decided``."""
        check, self._asking = self._asking, None
        return check

    def turn_decided(self, check: TurnCheck, complete: bool | None) -> tuple[Event, ...]:
        """The answer to ``check``: complete ends the segment now; not complete keeps waiting
        (up to ``turn_max_silence_ms``); None (no answer: overloaded, failed) falls back to the
        hangover. An answer that no longer matters (the speaker went on) changes nothing."""
        if check is not self._pending or check.withdrawn or not self.speaking:
            return _NO_EVENTS
        self._pending = None
        quiet = (self._next_t or 0) - self._voiced_until
        if complete:
            if quiet >= self.settings.pause_ms:
                return (self._stop(turn=True),)
            self._complete = True  # asked early: the stop waits for a pause_ms pause
        elif complete is None:
            self._fallback = True
            if quiet >= self.settings.stop_ms:
                return (self._stop(),)
        return _NO_EVENTS

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
        self._withdraw()
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
        if self._smart:
            self._turn_audio.extend(f.pcm for f in self._recent if f.t >= self._started_at - s.preroll_ms)
        self._recent.clear()
        self._window.clear()
        self.state = SegmentState.SPEAKING
        self._paused = False
        return events

    def _in_speech(self, frame: PcmFrame, voiced: bool) -> list[Event]:
        s = self.settings
        events: list[Event] = [SpeechFrame(frame.pcm, frame.t, voiced)]
        if self._smart:
            self._turn_audio.append(frame.pcm)
        if voiced:
            self._voiced_until = frame.t + s.frame_ms
            self.state = SegmentState.SPEAKING
            if self._paused or self._asked:
                self._paused = self._asked = self._complete = self._fallback = False
                self._withdraw()  # the speaker went on: the pause's question no longer matters
            return events
        quiet = frame.t + s.frame_ms - self._voiced_until
        if self._smart:
            if self._complete and quiet >= s.pause_ms:
                events.append(self._stop(turn=True))
                return events
            if not self._asked and quiet >= s.pause_ms - s.turn_early_ms:
                self._asked = True
                self._asking = self._pending = self._question(frame.t + s.frame_ms)
        limit = s.turn_max_silence_ms if self._smart and not self._fallback else s.stop_ms
        if quiet >= limit:
            events.append(self._stop())
            return events
        self.state = SegmentState.STOPPING
        if 0 < s.pause_ms <= quiet and not self._paused:
            self._paused = True
            events.append(SpeechPaused(self._voiced_until))
        return events

    def _question(self, now: int) -> TurnCheck:
        """The segment's audio for the model, made up to a ``pause_ms`` pause if asked early."""
        early = self.settings.turn_early_ms // self.settings.frame_ms
        tail = list(self._turn_audio)[-early:] if early else []
        return TurnCheck(b"".join([*self._turn_audio, *tail]), self._voiced_until, now)

    def _withdraw(self) -> None:
        if self._pending is not None:
            self._pending.withdrawn = True
        self._pending = self._asking = None

    def _stop(self, *, turn: bool = False) -> SpeechStopped:
        self.state = SegmentState.QUIET
        self._withdraw()
        self._turn_audio.clear()
        self._paused = self._asked = self._complete = self._fallback = False
        return SpeechStopped(self._voiced_until, self._voiced_until - self._started_at, turn)
