"""μ-law against the G.711 reference (Python's audioop implements the G.711 tables)."""

from __future__ import annotations

import warnings

import numpy as np

from media.g711 import ulaw_decode, ulaw_encode

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


def test_encoding_every_16_bit_sample_matches_the_reference() -> None:
    pcm = np.arange(-32768, 32768, dtype="<i2").tobytes()
    assert ulaw_encode(pcm) == audioop.lin2ulaw(pcm, 2)


def test_decoding_every_code_matches_the_reference() -> None:
    codes = bytes(range(256))
    assert ulaw_decode(codes) == audioop.ulaw2lin(codes, 2)


def test_round_trip_of_codes_is_exact() -> None:
    codes = bytes(range(256))
    again = ulaw_encode(ulaw_decode(codes))
    # μ-law has two zeros (0x7F is -0, 0xFF is +0); every other code survives exactly.
    assert [c for c in range(256) if again[c] != codes[c]] == [0x7F]
