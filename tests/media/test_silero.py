"""Silero VAD (``--vad silero``) on real speech (espeak-ng): clean, under noise, hiss and music.

The conditions where webrtcvad finds nothing (5 dB SNR, music) are the point of it
(figures for both in docs/media.md, from benchmarks/vad_accuracy.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from media.silero import SileroModel, SileroVad
from media.vad import Segmenter, VadSettings
from tests.segmenting import frames_of, segments
from tests.speech import RATE, Fixture, hiss, music, utterances, white, with_background

TEXTS = ["I would like to book an appointment", "Tomorrow morning would be great", "Thank you very much"]
SETTINGS = VadSettings(detector="silero")
BACKGROUNDS: dict[str, Callable[[int, int], np.ndarray]] = {"white": white, "hiss": hiss, "music": music}


@pytest.fixture(scope="module")
def model() -> SileroModel:
    return SileroModel()


@pytest.fixture(scope="module", params=["clean", "white-10dB", "white-5dB", "hiss-5dB", "music-10dB"])
def condition(request: pytest.FixtureRequest) -> tuple[str, Fixture]:
    clean = utterances(TEXTS)
    if request.param == "clean":
        return request.param, clean
    kind, snr = request.param.split("-")
    return request.param, with_background(clean, BACKGROUNDS[kind](len(clean.pcm), 7), float(snr.removesuffix("dB")))


def test_one_segment_per_utterance_with_accurate_boundaries(model: SileroModel, condition: tuple[str, Fixture]) -> None:
    name, fixture = condition
    found = segments(frames_of(fixture.pcm), SETTINGS, detector=SileroVad(model))
    assert len(found) == len(fixture.truth), [(f.start, f.stop) for f in found]
    for segment, (onset, end) in zip(found, fixture.truth, strict=True):
        assert abs(segment.start - onset) <= 100, (segment.start, onset)
        assert segment.frames[0].t <= onset  # the preroll covers the onset
        assert segment.stop is not None
        # Under music a note right after the speech can sound like more of it.
        late = 500 if name.startswith("music") else 80
        assert -150 <= segment.stop.t - end <= late, (segment.stop.t, end)
        assert segment.reported_at == segment.stop.t + SETTINGS.stop_ms


@pytest.mark.parametrize("kind", ["silence", "white", "hiss", "music"])
def test_no_segment_in_ten_seconds_without_speech(model: SileroModel, kind: str) -> None:
    n = 10 * RATE
    pcm = np.zeros(n, np.int16) if kind == "silence" else (BACKGROUNDS[kind](n, 3) * 2000).astype(np.int16)
    assert segments(frames_of(pcm), SETTINGS, detector=SileroVad(model)) == []


def test_run_on_consecutive_windows_it_hears_the_same_later(model: SileroModel) -> None:
    """``every_frame=False`` runs the model on 512-sample windows back to back, as trained:
    3 runs for 5 frames, and the same utterances, the ends heard later."""
    fixture = utterances(TEXTS)
    frames = frames_of(fixture.pcm)
    consecutive = SileroVad(model, every_frame=False)
    slow = segments(frames, SETTINGS, detector=consecutive)
    fast = segments(frames, SETTINGS, detector=SileroVad(model))
    assert consecutive.runs == len(frames) * 320 // 512
    assert len(slow) == len(fast) == len(fixture.truth)
    assert sum(s.stop.t for s in slow if s.stop) > sum(f.stop.t for f in fast if f.stop)


@pytest.mark.parametrize("frame_ms", [10, 30])
def test_other_frame_sizes(model: SileroModel, frame_ms: int) -> None:
    fixture = utterances(TEXTS[:1])
    settings = VadSettings(detector="silero", frame_ms=frame_ms)
    [segment] = segments(frames_of(fixture.pcm, frame_ms), settings, detector=SileroVad(model))
    assert abs(segment.start - fixture.truth[0][0]) <= 100


def test_only_16_khz_and_a_probability_threshold(model: SileroModel) -> None:
    with pytest.raises(ValueError, match="16 kHz"):
        SileroVad(model).is_speech(bytes(320), 8000)
    with pytest.raises(ValueError, match="threshold"):
        SileroVad(model, threshold=1.5)
    with pytest.raises(ValueError, match="16 kHz"):
        VadSettings(detector="silero", sample_rate=8000)
    with pytest.raises(ValueError, match=r"media\.ears"):
        Segmenter(SETTINGS)  # the model is loaded once per process, not per stream
