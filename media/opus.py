"""Opus straight from libopus: decode to the rate the caller needs, encode without copies.

Why not PyAV's codec contexts: FFmpeg's libopus decoder always outputs 48 kHz, so
16 kHz for the VAD costs a decode at 48 kHz plus a resample (≈ 54 µs per 20 ms
frame measured, vs ≈ 22 µs for libopus decoding at 16 kHz itself: Opus decoders
produce 8, 12, 16, 24 or 48 kHz natively). Encoding through PyAV needs an
``AudioFrame`` per 20 ms and cannot set the encoder's complexity, the biggest cost
knob (≈ 240 µs per frame at 10, ≈ 130 at 5 on the reference machine).

The library is the copy of libopus bundled in PyAV's wheel (``av.libs``), or the
system's ``libopus.so.0``, called through ``ctypes`` (about 1 µs per call).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os

import av
import numpy as np

#: Rates libopus decodes to and encodes from.
RATES = (8_000, 12_000, 16_000, 24_000, 48_000)
#: The longest Opus packet is 120 ms.
MAX_FRAME_MS = 120
MAX_PACKET_BYTES = 1500
_APPLICATION_VOIP = 2048
_SET_BITRATE = 4002
_SET_COMPLEXITY = 4010
_SET_DTX = 4016


class OpusError(RuntimeError):
    """libopus is missing, or refused an input."""


@functools.cache
def library() -> ctypes.CDLL:
    """libopus: PyAV's bundled copy first (always there with its wheel), else the system's."""
    base = os.path.dirname(os.path.dirname(av.__file__))
    candidates = sorted(glob.glob(os.path.join(base, "av.libs", "libopus*")))  # manylinux wheels
    candidates += sorted(glob.glob(os.path.join(os.path.dirname(av.__file__), ".dylibs", "libopus*")))  # macOS
    system = ctypes.util.find_library("opus")
    if system:
        candidates.append(system)
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_decode.restype = ctypes.c_int
        lib.opus_decode.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int32,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_encoder_create.restype = ctypes.c_void_p
        lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_encode.restype = ctypes.c_int32
        lib.opus_encode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int32]
        lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_packet_get_nb_samples.restype = ctypes.c_int
        lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
        return lib
    raise OpusError("libopus not found: install PyAV from its wheel, or the system's libopus0")


def packet_samples(packet: bytes) -> int:
    """How many 48 kHz samples an Opus packet holds (its TOC and frame count, nothing
    decoded); ``OpusError`` if it is not a well-formed Opus packet."""
    if not 0 < len(packet) <= MAX_PACKET_BYTES:
        raise OpusError(f"an Opus packet has 1 to {MAX_PACKET_BYTES} bytes")
    n = library().opus_packet_get_nb_samples(packet, len(packet), 48_000)
    if n <= 0 or n > 48 * MAX_FRAME_MS:
        raise OpusError("not an Opus packet")
    return int(n)


class Decoder:
    """One stream's Opus decoder, mono PCM16 at ``rate``."""

    def __init__(self, rate: int = 16_000) -> None:
        if rate not in RATES:
            raise ValueError(f"rate must be one of {RATES}")
        self.rate = rate
        self._lib = library()
        error = ctypes.c_int()
        self._state = ctypes.c_void_p(self._lib.opus_decoder_create(rate, 1, ctypes.byref(error)))
        if error.value != 0 or not self._state:
            raise OpusError(f"opus_decoder_create failed ({error.value})")
        self._out = np.zeros(rate * MAX_FRAME_MS // 1000, dtype=np.int16)
        self._out_ptr = self._out.ctypes.data
        self._capacity = len(self._out)
        #: Packets libopus could not decode (corrupt or not Opus), skipped.
        self.errors = 0

    def decode(self, payload: bytes) -> np.ndarray:
        """One packet → its samples (a view into a reused buffer: copy before the next call).

        An empty payload is not Opus: libopus would conceal a lost packet with 120 ms of
        invented audio, so a client sending empty packets would get 6 frames each.
        """
        if not payload:
            self.errors += 1
            return self._out[:0]
        n = self._lib.opus_decode(self._state, payload, len(payload), self._out_ptr, self._capacity, 0)
        if n < 0:
            self.errors += 1
            return self._out[:0]
        return self._out[:n]

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            self._lib.opus_decoder_destroy(self._state)


class Encoder:
    """One stream's Opus encoder (VoIP mode) for mono PCM16 at ``rate``, 20 ms per packet."""

    def __init__(self, rate: int = 48_000, *, complexity: int = 5, bitrate: int = 32_000, dtx: bool = False) -> None:
        """``dtx``: libopus's discontinuous transmission (silence becomes 1-byte packets,
        for a sender that forwards them, not for the gateway's own DTX-by-omission)."""
        if rate not in RATES:
            raise ValueError(f"rate must be one of {RATES}")
        if not 0 <= complexity <= 10:
            raise ValueError("complexity is 0 (cheapest) to 10 (best)")
        self.rate = rate
        self.samples = rate // 50
        self._lib = library()
        error = ctypes.c_int()
        self._state = ctypes.c_void_p(self._lib.opus_encoder_create(rate, 1, _APPLICATION_VOIP, ctypes.byref(error)))
        if error.value != 0 or not self._state:
            raise OpusError(f"opus_encoder_create failed ({error.value})")
        self._lib.opus_encoder_ctl(self._state, _SET_COMPLEXITY, ctypes.c_int(complexity))
        self._lib.opus_encoder_ctl(self._state, _SET_BITRATE, ctypes.c_int(bitrate))
        if dtx:
            self._lib.opus_encoder_ctl(self._state, _SET_DTX, ctypes.c_int(1))
        self._buf = ctypes.create_string_buffer(MAX_PACKET_BYTES)

    def encode(self, pcm: np.ndarray) -> bytes:
        """20 ms of int16 mono (``samples`` values, C-contiguous) → one Opus packet."""
        if len(pcm) != self.samples or pcm.dtype != np.int16:
            raise ValueError(f"expected {self.samples} int16 samples")
        n = self._lib.opus_encode(self._state, pcm.ctypes.data, self.samples, self._buf, MAX_PACKET_BYTES)
        if n < 0:
            raise OpusError(f"opus_encode failed ({n})")
        return ctypes.string_at(self._buf, n)

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            self._lib.opus_encoder_destroy(self._state)
