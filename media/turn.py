"""End of turn (``--turn-detection smart``): is the speaker done, or only pausing?

A fixed hangover waits 500 ms after every pause, and still cuts off a speaker who pauses
longer in mid-sentence. Pipecat's Smart Turn v3 (BSD-2-Clause; ``media.models``) hears
the last ≤ 8 s of a segment and gives the probability that the turn is complete, from its
words and their melody. The segmenter asks at each pause of ``pause_ms`` (``TurnCheck``);
a complete turn ends at once, an incomplete one waits up to ``turn_max_silence_ms``.

- ``log_mel``: Whisper's features (80 log-mel bands, 25 ms windows every 10 ms, 8 s), in
  numpy: no model hub, no transformers.
- ``SmartTurn``: features + the network, synchronous (≈ 50 ms of CPU on this machine).
- ``TurnWorker``: runs it off the event loop for every stream of a process: one thread
  (one core), a bounded number of questions waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import models
from .tasks import FailureLog, Tally, Timer

if TYPE_CHECKING:
    from .vad import TurnCheck

log = logging.getLogger("talkgate.media.turn")

SAMPLE_RATE = 16_000
#: The model hears the last 8 s (shorter audio is padded with silence in front).
WINDOW_SAMPLES = 8 * SAMPLE_RATE
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 80


def _slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Hz → mel on the Slaney scale (linear below 1 kHz, logarithmic above), as Whisper uses."""
    mel = 3.0 * hz / 200.0
    log_region = hz >= 1000.0
    mel[log_region] = 15.0 + np.log(hz[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mel


def _slaney_hz(mel: np.ndarray) -> np.ndarray:
    hz = 200.0 * mel / 3.0
    log_region = mel >= 15.0
    hz[log_region] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel[log_region] - 15.0))
    return hz


def _mel_filters() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1) triangular filters, area-normalised (Slaney), 0 to 8 kHz."""
    edges = _slaney_hz(np.linspace(0.0, float(_slaney_mel(np.array([SAMPLE_RATE / 2]))[0]), N_MELS + 2))
    bins = np.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    slopes = edges[None, :] - bins[:, None]
    down = -slopes[:, :-2] / np.diff(edges)[:-1]
    up = slopes[:, 2:] / np.diff(edges)[1:]
    filters = np.maximum(0.0, np.minimum(down, up)) * (2.0 / (edges[2:] - edges[:-2]))
    return np.ascontiguousarray(filters.T)


MEL_FILTERS = _mel_filters()
#: Periodic Hann (torch.hann_window), float64 as the reference computes.
HANN = np.hanning(N_FFT + 1)[:-1]


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Whisper's input features for 8 s of 16 kHz audio (float, any level) → (80, 800) float32.

    As transformers' ``WhisperFeatureExtractor`` (``do_normalize=True``) computes them, the
    way Smart Turn was trained: the waveform scaled to zero mean and unit variance, a
    centred STFT (reflect-padded), power through the mel filters, log10, floored 8 below
    the peak, then mapped to about [-1, 1].
    """
    if audio.shape != (WINDOW_SAMPLES,):
        raise ValueError(f"log_mel takes exactly {WINDOW_SAMPLES} samples")
    x = audio.astype(np.float32)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:-1]  # 800 frames
    power = np.abs(np.fft.rfft(frames * HANN, axis=-1)) ** 2
    mel = np.log10(np.maximum(MEL_FILTERS @ power.T, 1e-10))
    mel = np.maximum(mel, mel.max() - 8.0)
    features: np.ndarray = ((mel + 4.0) / 4.0).astype(np.float32)
    return features


def last_window(pcm: bytes) -> np.ndarray:
    """The last 8 s of PCM16 as float32 in [-1, 1], silence in front when shorter."""
    samples = np.frombuffer(pcm, dtype=np.int16)[-WINDOW_SAMPLES:]
    audio = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
    audio[WINDOW_SAMPLES - len(samples) :] = samples
    audio *= 1 / 32768
    return audio


class SmartTurn:
    """Smart Turn v3.2 (CPU build, int8): PCM16 at 16 kHz in, P(the turn is complete) out."""

    def __init__(self, session: Any = None) -> None:
        self.session = session if session is not None else models.session(models.SMART_TURN)

    def probability(self, pcm: bytes) -> float:
        features = log_mel(last_window(pcm))[None]
        (probability,) = self.session.run(None, {"input_features": features})
        return float(probability[0, 0])


#: The segmenter's answer: complete (True), not yet (False), no answer (None: hangover).
Answer = Callable[["TurnCheck", bool | None], None]


class TurnWorker:
    """Decides turns off the event loop, for every stream of a process.

    The model takes ≈ 50 ms of CPU: run on the loop, each decision would stall every
    call of the process for as long. One worker thread runs them (onnxruntime releases
    the GIL, one core: a gateway that has two cores still has one for the loop); at most
    ``max_waiting`` questions wait, more are answered "no answer" at once and counted, and
    their streams fall back to the hangover: an overloaded gateway behaves as with
    ``--turn-detection silence``, never later. A question whose speaker went on talking
    before its turn came is skipped. ``close`` drops what waits.
    """

    def __init__(
        self,
        model: SmartTurn,
        *,
        threshold: float = 0.5,
        max_waiting: int = 4,
        timer: Timer | None = None,
        overloaded: Tally | None = None,
        failures: Tally | None = None,
    ) -> None:
        if not 0 < threshold < 1:
            raise ValueError("the end-of-turn threshold is a probability in (0, 1)")
        self.model = model
        self.threshold = threshold
        self.max_waiting = max_waiting
        #: Observes the CPU-seconds of each decision (features + model), in the worker.
        self.timer = timer
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="talkgate-turn")
        self.waiting = 0
        #: Questions answered "no answer" because too many waited (also counted in ``overloaded``).
        self.dropped = 0
        self._overloaded = overloaded
        self.failures = FailureLog("end-of-turn model", logger=log, failures=failures)
        self._closed = False

    def ask(self, check: TurnCheck, answer: Answer) -> None:
        """Decide ``check`` in the worker; ``answer`` is called on the event loop."""
        loop = asyncio.get_running_loop()
        if self._closed or self.waiting >= self.max_waiting:
            self.dropped += 1
            if self._overloaded is not None:
                self._overloaded.inc()
            loop.call_soon(answer, check, None)
            return
        self.waiting += 1
        future = loop.run_in_executor(self._executor, self._decide, check)
        future.add_done_callback(lambda done: self._done(done, check, answer))

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _decide(self, check: TurnCheck) -> float | None:
        # In the worker thread.
        if check.withdrawn:
            return None
        started = time.thread_time()
        probability = self.model.probability(check.pcm)
        if self.timer is not None:
            self.timer.observe(time.thread_time() - started)
        return probability

    def _done(self, done: asyncio.Future[float | None], check: TurnCheck, answer: Answer) -> None:
        self.waiting -= 1
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            self.failures.failure(exc, "decision")
            answer(check, None)
            return
        probability = done.result()
        check.probability = probability
        answer(check, None if probability is None else probability >= self.threshold)
