"""A vectorised replacement for aiortc's per-frame audio level (RFC 6464/6465).

aiortc's ``rtp.compute_audio_level_dbov`` sums the squares of every sample of every
outgoing audio frame in a Python loop (1,920 iterations for a 20 ms stereo frame).
Profiling the gateway relaying calls showed it as two thirds of all busy CPU. This
numpy version returns the same value for the same frame (tested against the
original) in a few microseconds; ``install()`` puts it where aiortc's sender looks
it up (``aiortc.rtp.compute_audio_level_dbov``, resolved at each call).
"""

from __future__ import annotations

import math

import aiortc.rtp
import numpy as np
from av import AudioFrame

MAX_SAMPLE_VALUE = 32767
MIN_AUDIO_LEVEL = -127

original = aiortc.rtp.compute_audio_level_dbov


def compute_audio_level_dbov(frame: AudioFrame) -> int:
    """The same computation as aiortc's (whole first plane read as int16), vectorised."""
    samples = np.frombuffer(memoryview(frame.planes[0]), dtype=np.int16).astype(np.int64)
    # Integer sum of squares: exact, and no BLAS (np.dot on floats would wake
    # OpenBLAS's spinning worker threads for a 2,000-element vector).
    energy = int(np.square(samples).sum())
    rms = math.sqrt(energy / (frame.samples * MAX_SAMPLE_VALUE * MAX_SAMPLE_VALUE))
    if rms <= 0:
        return MIN_AUDIO_LEVEL
    return round(min(max(20 * math.log10(rms), MIN_AUDIO_LEVEL), 0))


def install() -> None:
    aiortc.rtp.compute_audio_level_dbov = compute_audio_level_dbov
