"""Silero VAD behind ``VoiceDetector`` (``--vad silero``): a small learned model that hears
speech under noise and music where webrtcvad's energy GMM cannot (docs/media.md has the
figures).

The network (Silero VAD v5, from ``media.models``) takes a 512-sample window at 16 kHz,
with the 64 samples before it as context, and carries an LSTM state from one window to
the next. Our frames are 20 ms (320 samples). By default a stream runs the network once
per frame, on the latest 512 samples (windows overlap by 192): each frame's answer covers
audio up to its end, and the state moves every 20 ms. Run on consecutive windows as it
was trained (``every_frame=False``: 5 frames → 3 runs), the answer lags the frame by 0 to
28 ms and the LSTM lets go of a word's end more slowly: measured on espeak-ng speech, the
end of speech was heard 56 to 109 ms late instead of 22 to 56 ms, for the same utterances
found (``benchmarks/vad_accuracy.py``), at 0.6 times the CPU.

A frame is voiced when the probability is at least ``threshold`` (0.5): Silero's own
iterator adds hysteresis (0.35 to let go), but the segmenter has its own (the start
window, the hangover), and the extra one only delayed the end, by up to 16 ms. Pipecat
resets the recurrent state every 2 s of non-speech (music, it says, leaves the state
deaf to the speech that follows); on our fixtures (11.5 s of music or hiss, then speech)
resetting changed nothing, so the state runs on. The session is shared by every stream;
the state and the samples are per stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import models

SAMPLE_RATE = 16_000
WINDOW = 512
CONTEXT = 64


class SileroModel:
    """The network, loaded once per process (an onnxruntime session keeps no per-stream state)."""

    def __init__(self, session: Any = None) -> None:
        self.session = session if session is not None else models.session(models.SILERO_VAD)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def run(self, window: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        """One window (1 x (CONTEXT + WINDOW) float32 in [-1, 1]) → (speech probability, next state)."""
        probability, next_state = self.session.run(None, {"input": window, "state": state, "sr": self._sr})
        return float(probability[0, 0]), next_state


class SileroVad:
    """One stream's Silero VAD: ``is_speech`` per frame."""

    def __init__(self, model: SileroModel, threshold: float = 0.5, *, every_frame: bool = True) -> None:
        if not 0 < threshold < 1:
            raise ValueError("the Silero threshold is a probability in (0, 1)")
        self.model = model
        self.threshold = threshold
        self.every_frame = every_frame
        #: Context + window: the latest samples (every_frame), or the window being filled.
        self._window = np.zeros((1, CONTEXT + WINDOW), dtype=np.float32)
        self._fill = 0
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._voiced = False
        #: The latest run's probability (for benchmarks and tests), runs in all.
        self.probability = 0.0
        self.runs = 0

    def is_speech(self, pcm: bytes, sample_rate: int) -> bool:
        if sample_rate != SAMPLE_RATE:
            raise ValueError("Silero VAD runs at 16 kHz here")
        samples = np.frombuffer(pcm, dtype=np.int16)
        if self.every_frame:
            n = min(len(samples), CONTEXT + WINDOW)
            window = self._window[0]
            window[:-n] = window[n:]
            np.multiply(samples[-n:], 1 / 32768, out=window[-n:], casting="unsafe")
            self._run()
            return self._voiced
        offset = 0
        while offset < len(samples):
            n = min(WINDOW - self._fill, len(samples) - offset)
            start = CONTEXT + self._fill
            np.multiply(
                samples[offset : offset + n], 1 / 32768, out=self._window[0, start : start + n], casting="unsafe"
            )
            self._fill += n
            offset += n
            if self._fill == WINDOW:
                self._run()
                self._window[0, :CONTEXT] = self._window[0, -CONTEXT:]
                self._fill = 0
        return self._voiced

    def _run(self) -> None:
        self.probability, self._state = self.model.run(self._window, self._state)
        self.runs += 1
        self._voiced = self.probability >= self.threshold
