"""The inbound voice path per packet, as the gateway runs it, against the C work it calls.

One customer's audio, every layer the gateway puts a received packet through, on a
real aiortc receiver stack (ICE gatherer, DTLS transport, RTP receiver; no sockets, no
handshake: the SRTP keys are set directly): SRTP datagram → ``FastRtp`` (unprotect,
parse) → ``InboundAudio`` (codec check, RTCP statistics, reorder, stamp) → ``Relay`` →
``VoicePipeline`` (libopus at 16 kHz, 20 ms frames, webrtcvad, segmentation, the
gateway's latency histogram) → the bot connector's work per speech frame (the native
protocol's message, laid out as a masked websocket frame; the socket write itself is
left out: it is a system call, measured by loadtest.py). The input is real speech:
espeak-ng utterances with silences between them, Opus-encoded up front as a browser
sends it (48 kHz).

Measured in the same run, on the same packets:

- total: per packet, that whole path;
- C work: SRTP unprotect, libopus decode at 16 kHz, webrtcvad; their sum is the floor;
- Python around it: total minus C work, the part the gateway's own code decides.

    python benchmarks/pipeline.py            # 7 repetitions of ~13 s of speech, median
    python benchmarks/pipeline.py --repeat 1 --json
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pylibsrtp
import webrtcvad
from aiortc import RTCCertificate, RTCDtlsTransport, RTCIceGatherer, RTCIceTransport, RTCRtpReceiver
from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository's packages and tests/ helpers

from gateway.bot.frames import MaskKeys, client_frame
from gateway.metrics import AUDIO_BUCKETS, FrameHistogram
from media import opus
from media.inbound import FastRtp, InboundAudio, install_demux
from media.pipeline import VoicePipeline
from media.relay import Relay
from media.vad import SpeechFrame, SpeechStarted
from tests.speech import to_48k_stereo_frames, utterances

TEXTS = [
    "Hello, I would like to book an appointment for next week",
    "Tuesday afternoon would work best for me",
    "Could you also send me a confirmation by text message",
    "Thank you, that is everything",
]
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48_000, channels=2, payloadType=111)
SSRC = 0x1234ABCD
KEY = bytes(range(16)) + bytes(range(100, 112))  # AES-128-GCM: 16 bytes of key, 12 of salt


def opus_packets(pcm16k: np.ndarray) -> list[bytes]:
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = 48_000
    encoder.layout = "stereo"
    encoder.format = "s16"
    encoder.bit_rate = 32_000
    encoder.time_base = fractions.Fraction(1, 48_000)
    packets = []
    for frame in to_48k_stereo_frames(pcm16k):
        packets += [bytes(p) for p in encoder.encode(frame)]
    return packets


def srtp_session(direction: int) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(key=KEY, ssrc_type=direction, srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM)
    policy.allow_repeat_tx = True
    policy.window_size = 1024
    return pylibsrtp.Session(policy)


def datagrams(payloads: list[bytes]) -> list[bytes]:
    """Each payload as the browser's SRTP datagram (an audio-level extension, as Chrome sends)."""
    tx = srtp_session(pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    extensions = HeaderExtensionsMap()
    level = RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:ssrc-audio-level")
    extensions.configure(RTCRtpParameters(headerExtensions=[level]))
    out = []
    for i, payload in enumerate(payloads):
        packet = RtpPacket(payload_type=111, sequence_number=i & 0xFFFF, timestamp=i * 960, ssrc=SSRC, payload=payload)
        packet.extensions.audio_level = (False, 40)
        out.append(tx.protect(packet.serialize(extensions)))
    return out


class Customer:
    """One received stream wired as the gateway wires a customer talking to a bot."""

    def __init__(self) -> None:
        install_demux()
        self.dtls = RTCDtlsTransport(RTCIceTransport(RTCIceGatherer()), [RTCCertificate.generateCertificate()])
        self.dtls._rx_srtp = srtp_session(pylibsrtp.Policy.SSRC_ANY_INBOUND)
        self.receiver = RTCRtpReceiver("audio", self.dtls)
        self.receiver._RTCRtpReceiver__codecs = {111: OPUS}  # type: ignore[attr-defined]
        self.relay = Relay(_Silent())
        InboundAudio(self.receiver, self.relay.deliver)
        self.pipeline = VoicePipeline()
        self.pipeline.timer = FrameHistogram("bench_seconds", "bench", AUDIO_BUCKETS, CollectorRegistry())
        self.relay.subscribe(self.pipeline)
        self.keys = MaskKeys()
        self.sent: list[bytes] = []
        self.segments = 0
        self.pipeline.listeners.append(self._on_speech)

    def _on_speech(self, event: object) -> None:
        # What BotConnector._on_speech does per event, up to the socket write.
        if isinstance(event, SpeechFrame):
            self.sent.append(client_frame(event.pcm, self.keys))
            if len(self.sent) > 100:
                self.sent.clear()
        elif isinstance(event, SpeechStarted):
            self.segments += 1

    async def start(self, first: bytes) -> None:
        """The first packet takes aiortc's path, which routes the SSRC past it."""
        plain = RtpPacket.parse(self.dtls._rx_srtp.unprotect(first))
        await self.receiver._handle_rtp_packet(plain, 0)

    async def close(self) -> None:
        await self.relay.close()


class _Silent:
    kind = "audio"
    id = "bench"

    async def recv(self) -> Any:
        await asyncio.Event().wait()


def per_packet_us(seconds: float, packets: int) -> float:
    return seconds / packets * 1e6


async def run_once(payloads: list[bytes], sessions: int = 1) -> dict[str, float]:
    wire = datagrams(payloads)
    n = len(wire) - 1
    customers = [Customer() for _ in range(sessions)]
    for customer in customers:
        await customer.start(wire[0])
    receivers = [FastRtp.of(customer.dtls).data_received for customer in customers]
    t0 = time.perf_counter()
    for data in wire[1:]:
        for receive in receivers:  # round robin: each session's state is cold again, as in a busy gateway
            receive(data, 1)
    total = time.perf_counter() - t0
    assert all(FastRtp.of(c.dtls).packets == n for c in customers), "every packet took the fast path"
    segments = customers[0].segments
    for customer in customers:
        await customer.close()
    n *= sessions

    # The C work alone, on the same input.
    rxs = [srtp_session(pylibsrtp.Policy.SSRC_ANY_INBOUND) for _ in range(sessions)]
    t0 = time.perf_counter()
    for data in wire[1:]:
        for rx in rxs:
            rx.unprotect(data)
    srtp = time.perf_counter() - t0

    keep = opus.Decoder(16_000)
    pcm = [keep.decode(payload).tobytes() for payload in payloads[1:]]  # the VAD's input, untimed
    decoders = [opus.Decoder(16_000) for _ in range(sessions)]
    t0 = time.perf_counter()
    for payload in payloads[1:]:
        for decoder in decoders:
            decoder.decode(payload)
    decode = time.perf_counter() - t0

    vads = [webrtcvad.Vad(3) for _ in range(sessions)]
    t0 = time.perf_counter()
    for frame in pcm:
        for vad in vads:
            vad.is_speech(frame, 16_000)
    vad_time = time.perf_counter() - t0

    c_work = per_packet_us(srtp + decode + vad_time, n)
    return {
        "total_us": per_packet_us(total, n),
        "srtp_us": per_packet_us(srtp, n),
        "opus_decode_16k_us": per_packet_us(decode, n),
        "webrtcvad_us": per_packet_us(vad_time, n),
        "c_work_us": c_work,
        "segments": segments,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    fixture = utterances(TEXTS, lead_s=0.5, gap_s=1.2, tail_s=1.0)
    payloads = opus_packets(fixture.pcm)
    runs = [await run_once(payloads, args.sessions) for _ in range(args.repeat)]
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    total, c_work = median["total_us"], median["c_work_us"]
    return {
        "benchmark": "pipeline",
        "sessions": args.sessions,
        "packets": (len(payloads) - 1) * args.sessions,
        "audio_seconds": round(len(payloads) * 0.02, 2),
        "repeat": args.repeat,
        "utterances": len(TEXTS),
        "segments_found": int(median["segments"]),
        "us_per_packet": round(total, 2),
        "us_per_packet_runs": [round(r["total_us"], 2) for r in runs],
        "realtime_streams_per_core": round(1e6 / total / 50),
        "c_work_us_per_packet": round(c_work, 2),
        "srtp_us": round(median["srtp_us"], 2),
        "opus_decode_16k_us": round(median["opus_decode_16k_us"], 2),
        "webrtcvad_us": round(median["webrtcvad_us"], 2),
        "python_us_per_packet": round(total - c_work, 2),
        "ratio_total_to_c": round(total / c_work, 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--sessions", type=int, default=1, help="Streams fed in turn, a packet each (cold caches, as under load)."
    )
    parser.add_argument("--json", action="store_true", help="only the JSON line")
    arguments = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})  # one core: no migrations in the middle of a run
    result = asyncio.run(main(arguments))
    if not arguments.json:
        print(
            f"{result['packets']} packets ({result['audio_seconds']} s of speech, {result['utterances']} utterances,"
            f" {result['segments_found']} segments found), median of {result['repeat']}:\n"
            f"  total {result['us_per_packet']} µs per 20 ms packet ≈ {result['realtime_streams_per_core']}"
            f" real-time streams per core (runs: {result['us_per_packet_runs']})\n"
            f"  C work {result['c_work_us_per_packet']} µs (SRTP {result['srtp_us']}, Opus decode at 16 kHz"
            f" {result['opus_decode_16k_us']}, webrtcvad {result['webrtcvad_us']})\n"
            f"  Python around it {result['python_us_per_packet']} µs; ratio total/C = {result['ratio_total_to_c']}"
        )
    print(json.dumps(result))
