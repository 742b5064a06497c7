"""The vectorised audio level equals aiortc's original on real frames."""

from __future__ import annotations

import numpy as np
from av import AudioFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from media import audiolevel


def frame(samples: np.ndarray, layout: str) -> AudioFrame:
    f = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout=layout)
    f.sample_rate = 48_000
    return f


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["mono", "stereo"]),
    st.sampled_from([0, 1, 30, 1000, 32767]),
    st.integers(min_value=0, max_value=2**32 - 1),
)
def test_matches_aiortc(layout: str, amplitude: int, seed: int) -> None:
    channels = 2 if layout == "stereo" else 1
    rng = np.random.default_rng(seed)
    samples = rng.integers(-amplitude, amplitude + 1, size=960 * channels).astype(np.int16)
    f = frame(samples, layout)
    assert audiolevel.compute_audio_level_dbov(f) == audiolevel.original(f)


def test_silence_and_full_scale() -> None:
    assert audiolevel.compute_audio_level_dbov(frame(np.zeros(960, np.int16), "mono")) == -127
    assert audiolevel.compute_audio_level_dbov(frame(np.full(960, 32767, np.int16), "mono")) == 0
