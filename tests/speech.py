"""Real speech for tests and benchmarks: espeak-ng utterances with known boundaries.

Each utterance is synthesised on its own, trimmed to where its energy starts and
ends, and placed at a known offset in silence, so the true onset and end of every
utterance are known to the sample. Noise is white noise generated with numpy at a
given SNR relative to the speech's RMS.
"""

from __future__ import annotations

import fractions
import functools
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

RATE = 16_000


@functools.cache
def speak(text: str, rate: int = RATE) -> np.ndarray:
    """espeak-ng's voice saying ``text``, as int16 mono at ``rate``, trimmed to the speech."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is missing: apt-get install espeak-ng (the README's test command does)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path)) as w:
            source_rate = w.getframerate()
            samples = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    resampled = resample(samples, source_rate, rate)
    level = np.abs(resampled.astype(np.int32))
    loud = np.nonzero(level > 0.02 * level.max())[0]
    return resampled[loud[0] : loud[-1] + 1].copy()


def resample(samples: np.ndarray, source_rate: int, rate: int) -> np.ndarray:
    if source_rate == rate:
        return samples
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = source_rate
    parts = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(parts).astype(np.int16)


@dataclass(frozen=True)
class Fixture:
    pcm: np.ndarray  # int16 mono at RATE
    #: (onset_ms, end_ms) of each utterance.
    truth: list[tuple[float, float]]


def utterances(texts: list[str], *, lead_s: float = 1.0, gap_s: float = 1.5, tail_s: float = 1.5) -> Fixture:
    parts: list[np.ndarray] = [np.zeros(int(lead_s * RATE), np.int16)]
    truth = []
    position = len(parts[0])
    for i, text in enumerate(texts):
        speech = speak(text)
        truth.append((position * 1000 / RATE, (position + len(speech)) * 1000 / RATE))
        parts.append(speech)
        position += len(speech)
        pause = np.zeros(int((gap_s if i < len(texts) - 1 else tail_s) * RATE), np.int16)
        parts.append(pause)
        position += len(pause)
    return Fixture(np.concatenate(parts), truth)


def with_noise(fixture: Fixture, snr_db: float, seed: int = 7) -> Fixture:
    """White noise at ``snr_db``."""
    return with_background(fixture, white(len(fixture.pcm), seed), snr_db)


def with_background(fixture: Fixture, background: np.ndarray, snr_db: float) -> Fixture:
    """``background`` (any level, at least as long as the fixture) under the speech at ``snr_db``."""
    speech = np.concatenate([fixture.pcm[int(a * RATE / 1000) : int(b * RATE / 1000)] for a, b in fixture.truth])
    level = rms(speech) / (10 ** (snr_db / 20))
    scaled = background[: len(fixture.pcm)].astype(np.float64) * (level / rms(background[: len(fixture.pcm)]))
    mixed = np.clip(fixture.pcm.astype(np.float64) + scaled, -32768, 32767).astype(np.int16)
    return Fixture(mixed, fixture.truth)


def noise_like(n: int, level_rms: float, seed: int = 7) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * level_rms).astype(np.int32)


def white(n: int, seed: int = 7) -> np.ndarray:
    """White noise, float64 with RMS about 1."""
    return np.random.default_rng(seed).standard_normal(n)


def hiss(n: int, seed: int = 7) -> np.ndarray:
    """Pink noise (power falling 3 dB per octave), float64 with RMS 1."""
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    frequencies = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[1:] /= np.sqrt(frequencies[1:])
    spectrum[0] = 0
    pink = np.fft.irfft(spectrum, n)
    return pink / rms(pink)


#: A I-V-vi-IV progression (C, G, Am, F) as MIDI notes, one chord a second, and a melody
#: of eighth notes over it.
_CHORDS = ((48, 60, 64, 67), (43, 59, 62, 67), (45, 60, 64, 69), (41, 60, 65, 69))
_MELODY = (72, 74, 76, 79, 77, 76, 74, 72, 71, 72, 74, 76, 72, 69, 71, 72)


def music(n: int, seed: int = 7) -> np.ndarray:
    """Piano-like music: decaying harmonic notes (chords, a bass line and a melody), RMS 1."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n + 2 * RATE, dtype=np.float64)
    beat = RATE // 4  # eighth notes at 120 bpm

    def note(start: int, midi: int, length: int, gain: float) -> None:
        t = np.arange(length) / RATE
        f = 440.0 * 2 ** ((midi - 69) / 12)
        tone = sum(np.sin(2 * np.pi * f * k * t) / k**1.5 for k in range(1, 7) if f * k < RATE / 2)
        out[start : start + length] += gain * tone * np.exp(-3.0 * t)

    for i, start in enumerate(range(0, n, RATE)):
        for midi in _CHORDS[i % len(_CHORDS)]:
            note(start, midi, RATE, 0.35)
        for k in range(4):
            s = start + 2 * k * beat + int(rng.integers(0, 80))
            note(s, _MELODY[(4 * i + k) % len(_MELODY)], 2 * beat, 0.6)
    played = out[:n]
    return played / rms(played)


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


def to_48k_stereo_frames(pcm: np.ndarray, samples_per_frame: int = 960) -> list[av.AudioFrame]:
    """What aiortc hands the gateway: 48 kHz interleaved stereo s16 frames with pts."""
    up = resample(pcm, RATE, 48_000)
    stereo = np.repeat(up, 2)
    frames = []
    for start in range(0, len(up) - samples_per_frame + 1, samples_per_frame):
        chunk = stereo[2 * start : 2 * (start + samples_per_frame)]
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = 48_000
        frame.pts = start
        frame.time_base = fractions.Fraction(1, 48_000)
        frames.append(frame)
    return frames
