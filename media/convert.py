"""Inbound conversion: decoded WebRTC audio → 16 kHz mono PCM16 frames of exactly N ms.

aiortc delivers ``av.AudioFrame``s of any size (usually 20 ms at 48 kHz, stereo, s16;
other sources send fltp or other rates). ``FrameConverter`` resamples with
libswresample (in C) and cuts the result into frames of exactly ``frame_ms`` (10, 20
or 30 ms: what webrtcvad accepts), each stamped with its stream time in ms.

Timing comes from the frames' pts, not from counting: after a gap (packet loss, a
muted sender that stopped sending) the next frame is stamped with the right time and
nothing is invented — the partial frame before the gap is completed with silence,
which is not speech. Samples are copied once, into a preallocated frame buffer; the
only per-frame allocation is the immutable ``bytes`` handed out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from . import opus

VALID_FRAME_MS = (10, 20, 30)
#: Pts jumps smaller than this many output samples are jitter, not gaps.
GAP_TOLERANCE_SAMPLES = 8


@dataclass(frozen=True, slots=True)
class PcmFrame:
    """``frame_ms`` of 16-bit little-endian mono PCM starting at stream time ``t`` (ms)."""

    pcm: bytes
    t: int


class FrameConverter:
    def __init__(self, *, frame_ms: int = 20, sample_rate: int = 16_000) -> None:
        if frame_ms not in VALID_FRAME_MS:
            raise ValueError(f"frame_ms must be one of {VALID_FRAME_MS}")
        self.frame_ms = frame_ms
        self.sample_rate = sample_rate
        self.samples_per_frame = sample_rate * frame_ms // 1000
        #: The frame being filled, and how many samples it holds.
        self._buf = np.zeros(self.samples_per_frame, dtype=np.int16)
        self._fill = 0
        #: Stream position (in output samples) of _buf[0], and of the next expected sample.
        self._frame_start = 0
        self._expected: int | None = None
        self._resampler: av.AudioResampler | None = None
        self._input_key: tuple[str, str, int] | None = None
        self._decoder: opus.Decoder | None = None
        #: Counters for tests and metrics.
        self.frames_out = 0
        self.gaps = 0

    def feed(self, frame: av.AudioFrame) -> list[PcmFrame]:
        """Convert one decoded frame; return the complete output frames it finished."""
        out: list[PcmFrame] = []
        for chunk in self._resample(frame):
            self._take(chunk.to_ndarray().reshape(-1), chunk.pts, out)
        return out

    def feed_any(self, frame: object) -> list[PcmFrame]:
        """What a relay delivers: Opus packets (``feed_packet``), decoded audio (``feed``);
        anything else (video) gives nothing."""
        if isinstance(frame, av.Packet):
            return self.feed_packet(frame)
        if isinstance(frame, av.AudioFrame):
            return self.feed(frame)
        return []

    def feed_packet(self, packet: av.Packet[Any]) -> list[PcmFrame]:
        """One Opus packet stamped in 48 kHz RTP time (``media.inbound``), decoded by
        libopus straight to the output rate: no 48 kHz decode, no resampler."""
        if self._decoder is None:
            self._decoder = opus.Decoder(self.sample_rate)
        position = (packet.pts or 0) * self.sample_rate // 48_000
        return self.feed_pcm(self._decoder.decode(bytes(packet)), position)

    def feed_pcm(self, samples: np.ndarray, position: int) -> list[PcmFrame]:
        """Samples already at the output rate (int16 mono, as decoded by ``media.opus``).

        ``position`` is the stream time of the first sample, in output samples.
        """
        out: list[PcmFrame] = []
        self._take(samples, position, out)
        return out

    def reset(self) -> None:
        """Forget the stream (a new source follows): no partial frame, a fresh timeline."""
        self._fill = 0
        self._expected = None
        self._resampler = None
        self._input_key = None
        self._decoder = None  # a new source is a new Opus stream

    def flush(self) -> list[PcmFrame]:
        """End of stream: complete the partial frame with silence."""
        out: list[PcmFrame] = []
        if self._fill:
            self._pad_and_emit(out)
        return out

    # -- internals ------------------------------------------------------------------------

    def _resample(self, frame: av.AudioFrame) -> list[av.AudioFrame]:
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if key != self._input_key:
            # A new input format needs a new resampler (its buffered tail is tiny).
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=self.sample_rate)
            self._input_key = key
        assert self._resampler is not None
        return list(self._resampler.resample(frame))

    def _take(self, samples: np.ndarray, pts: int | None, out: list[PcmFrame]) -> None:
        position = pts if pts is not None else self._expected
        if position is None:
            position = 0
        spf = self.samples_per_frame
        if not self._fill and len(samples) == spf and position == self._expected:
            # The common case (one 20 ms packet → one 20 ms frame, in step): no buffer copy.
            self._expected = position + spf
            out.append(PcmFrame(samples.tobytes(), self._frame_start * 1000 // self.sample_rate))
            self._frame_start += spf
            self.frames_out += 1
            return
        if self._expected is not None and abs(position - self._expected) > GAP_TOLERANCE_SAMPLES:
            # A gap (or a jump back): finish what we have, restart the timeline at position.
            self.gaps += 1
            if self._fill:
                self._pad_and_emit(out)
            self._frame_start = position
        elif self._expected is None:
            self._frame_start = position
        self._expected = position + len(samples)
        offset = 0
        while offset < len(samples):
            n = min(spf - self._fill, len(samples) - offset)
            self._buf[self._fill : self._fill + n] = samples[offset : offset + n]
            self._fill += n
            offset += n
            if self._fill == spf:
                self._emit(out)

    def _pad_and_emit(self, out: list[PcmFrame]) -> None:
        self._buf[self._fill :] = 0
        self._emit(out)

    def _emit(self, out: list[PcmFrame]) -> None:
        out.append(PcmFrame(self._buf.tobytes(), self._frame_start * 1000 // self.sample_rate))
        self._frame_start += self.samples_per_frame
        self._fill = 0
        self.frames_out += 1
