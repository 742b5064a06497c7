"""Call benchmark: how fast calls connect, and what a relayed audio call costs the gateway.

Starts ``talkgate serve`` in its own process (advertising loopback only) and drives it
from this one.

    python benchmarks/calls.py                     # 30 aiortc setups, 10 Chromium setups, 10 calls for 10 s
    python benchmarks/calls.py --json
    python benchmarks/calls.py --setups 3 --browser-setups 1 --calls 2 --seconds 2   # quick

Phases:
  setup-aiortc    a customer joins and offers audio: offer sent → answer received →
                  peer connection "connected" (client side), N times one after another
  setup-chromium  the same from the bundled talkgate.js in headless Chromium with a fake
                  microphone (window.talkgate.callTimings), N fresh pages
  relay-cpu       K conversations, customer and agent each sending a tone as pre-encoded
                  Opus: the gateway forwards 2K Opus streams (and runs each customer's
                  voice detection). Gateway CPU is read from /proc over S seconds of
                  calls minus the idle gateway's, in the same run; receivers count RTP
                  packets (they do not decode).
  video-cpu       V two-way video calls: customer and agent each send pre-encoded VP8
                  (640x480, 30 fps, a moving picture, ~0.8 Mbit/s; encoded once before the
                  run, so the clients only packetize). Receivers count pictures at the RTP
                  level (marker bits; they do not decode). Run on a gateway that forwards
                  (the default) and, side by side, on one started with --video transcode
                  (decode and encode per receiver, the old way) with T calls.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import uvloop
from aiortc.mediastreams import MediaStreamTrack

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository's tests/ helpers

from benchmarks.signaling import SECRET, pct, start_gateway
from gateway import tokens
from media import ice, opus
from tests.client import Client
from tests.conftest import until
from tests.gateway_process import RTC_LOOPBACK_ARGS, GatewayProcess
from tests.rtc_client import PatternTrack, RtcClient, ToneTrack

#: The video load: pre-encoded VP8, played in a loop (a keyframe at each start).
WIDTH, HEIGHT, FPS, LOOP_FRAMES, VIDEO_BITRATE = 640, 480, 30, 90, 800_000


def ms(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values) * 1000, 1), "p95_ms": round(pct(values, 0.95) * 1000, 1)}


async def join(url: str, identity: str, role: str, room: str) -> RtcClient:
    client = await Client.open(url)
    await client.send({"type": "join", "token": tokens.issue(SECRET, identity=identity, role=role, room=room)})
    await client.wait_for("joined")
    return RtcClient(client)


async def setup_aiortc(url: str, n: int) -> dict[str, Any]:
    to_answer, to_connected = [], []
    for i in range(n):
        rtc = await join(url, f"s{i}", "customer", f"setup-{i}")
        connected = asyncio.Event()
        rtc.pc.on(
            "connectionstatechange", lambda pc=rtc.pc, ev=connected: pc.connectionState == "connected" and ev.set()
        )
        rtc.pc.addTrack(ToneTrack(440))
        await rtc.negotiate()
        await asyncio.wait_for(connected.wait(), 10)
        to_answer.append(rtc.answered_at - rtc.offer_sent_at)
        to_connected.append(time.perf_counter() - rtc.offer_sent_at)
        await rtc.close()
    return {"setups": n, "offer_to_answer": ms(to_answer), "offer_to_connected": ms(to_connected)}


def setup_chromium(http_url: str, n: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS

    to_connected, start_to_connected = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for i in range(n):
            token = tokens.issue(SECRET, identity=f"b{i}", role="customer", room=f"browser-{i}")
            page = browser.new_page(bypass_csp=True)  # wait_for_function evaluates strings
            page.goto(f"{http_url}/?token={token}")
            page.wait_for_function("window.talkgate && window.talkgate.status === 'open'")
            page.evaluate("window.talkgate.startVoice()")
            page.wait_for_function(
                "window.talkgate.callTimings && window.talkgate.callTimings.connected", timeout=15000
            )
            t = page.evaluate("window.talkgate.callTimings")
            to_connected.append((t["connected"] - t["offerSent"]) / 1000)
            start_to_connected.append((t["connected"] - t["created"]) / 1000)
            page.close()
        browser.close()
    return {"setups": n, "offer_to_connected": ms(to_connected), "start_to_connected": ms(start_to_connected)}


def encode_opus_tone(hz: float) -> list[bytes]:
    """One second of a tone as 50 Opus packets (20 ms, 48 kHz), encoded once before the run."""
    encoder = opus.Encoder(48_000)
    t = np.arange(48_000) / 48_000
    pcm = (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)
    return [encoder.encode(pcm[i : i + 960]) for i in range(0, 48_000, 960)]


class EncodedTrack(MediaStreamTrack):
    """Pre-encoded packets in a loop at ``rate`` a second: aiortc's sender only packetizes them."""

    def __init__(self, kind: str, packets: list[bytes], rate: int, clock: int) -> None:
        super().__init__()
        self.kind = kind
        self.packets = packets
        self.rate = rate
        self.clock = clock
        self._n = 0
        self._t0: float | None = None

    async def recv(self) -> av.Packet[Any]:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        else:
            await asyncio.sleep(self._t0 + self._n / self.rate - now)
        packet = av.Packet(self.packets[self._n % len(self.packets)])
        packet.pts, packet.time_base = self._n * (self.clock // self.rate), fractions.Fraction(1, self.clock)
        self._n += 1
        return packet


def count_rtp(rtc: RtcClient, counts: dict[RtcClient, int], kind: str) -> None:
    """Count what arrives at the RTP level instead of decoding it: packets of audio, or
    pictures of video (marker bits)."""
    counts[rtc] = 0

    def wrap(receiver: Any) -> None:
        async def handle(packet: Any, arrival_time_ms: int) -> None:
            if kind == "audio" or packet.marker:
                counts[rtc] += 1

        receiver._handle_rtp_packet = handle

    def on_track(track: Any) -> None:
        if track.kind == kind:
            wrap(next(t.receiver for t in rtc.pc.getTransceivers() if t.receiver.track is track))

    rtc.pc.on("track", on_track)


async def media_cpu(gw: GatewayProcess, calls: int, seconds: float, kind: str, packets: list[bytes]) -> dict[str, Any]:
    """``calls`` two-way calls sending pre-encoded ``kind``; gateway CPU per call and what arrives."""
    rate, clock = (50, 48_000) if kind == "audio" else (FPS, 90_000)
    idle_s = min(seconds, 3)
    cpu0 = gw.cpu_seconds()
    await asyncio.sleep(idle_s)
    idle = (gw.cpu_seconds() - cpu0) / idle_s
    parties: list[RtcClient] = []
    counts: dict[RtcClient, int] = {}
    for i in range(calls):
        for identity, role in ((f"{kind}-c{i}", "customer"), (f"{kind}-a{i}", "agent")):
            rtc = await join(gw.ws_url, identity, role, f"{kind}-{i}")
            count_rtp(rtc, counts, kind)
            rtc.pc.addTrack(EncodedTrack(kind, packets, rate, clock))
            await rtc.negotiate()
            parties.append(rtc)
    await until(lambda: min(counts.values()) >= rate, timeout=30)  # every receiver gets media
    counts0 = dict(counts)
    cpu0, t0 = gw.cpu_seconds(), time.perf_counter()
    await asyncio.sleep(seconds)
    wall = time.perf_counter() - t0
    busy = (gw.cpu_seconds() - cpu0) / wall
    rates = sorted((counts[rtc] - counts0[rtc]) / wall for rtc in parties)
    await asyncio.gather(*(rtc.close() for rtc in parties))
    per_call = (busy - idle) / calls
    return {
        "calls": calls,
        "seconds": seconds,
        "gateway_cpu_idle_pct": round(idle * 100, 2),
        "gateway_cpu_pct": round(busy * 100, 2),
        "cpu_pct_per_call": round(per_call * 100, 2),
        "calls_per_core": round(1 / per_call, 1) if per_call > 0 else None,
        "sent_per_s": rate,
        "received_per_s_min": round(rates[0], 1),
        "received_per_s_median": round(statistics.median(rates), 1),
    }


def encode_vp8_loop() -> list[bytes]:
    """LOOP_FRAMES pictures of a moving gradient and a sweeping bar, VP8 at VIDEO_BITRATE (libvpx)."""

    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    codec.time_base = fractions.Fraction(1, FPS)
    codec.bit_rate = VIDEO_BITRATE
    codec.gop_size = LOOP_FRAMES
    codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames: list[bytes] = []
    for i in range(LOOP_FRAMES):
        image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
        image[..., 0] = (x + 4 * i) % 256
        image[..., 1] = (y + 2 * i) % 256
        image[:, (i * 7) % WIDTH : (i * 7) % WIDTH + 40, 2] = 255
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        frames += [bytes(p) for p in codec.encode(frame)]
    frames += [bytes(p) for p in codec.encode(None)]
    return frames[:LOOP_FRAMES]


async def handover_latency(gw: GatewayProcess, n: int) -> dict[str, Any]:
    """A customer sees agent 1's camera; agent 1 hangs up, agent 2 calls with a camera:
    agent 2's offer answered → the customer decodes agent 2's first picture (aiortc
    clients that encode a small moving picture and decode what they get). The time
    includes agent 2's ICE and DTLS set-up and the keyframe the gateway asks for."""
    latencies = []
    for i in range(n):
        room = f"handover-{i}"
        customer = await join(gw.ws_url, f"hc{i}", "customer", room)
        first = await join(gw.ws_url, f"ha{i}", "agent", room)
        second: RtcClient | None = None
        try:
            for rtc in (customer, first):
                rtc.pc.addTrack(PatternTrack(320, 240))
                await rtc.negotiate()
            await customer.hears("video", frames=10, timeout=10)
            await first.client.send({"type": "hangup"})
            await customer.wait_for("media", identity=f"ha{i}", video=False)
            second = await join(gw.ws_url, f"hb{i}", "agent", room)
            second.pc.addTrack(PatternTrack(320, 240))
            before = customer.received_video_frames()
            await second.negotiate()
            answered = time.perf_counter()
            await until(functools.partial(newer_picture, customer, before), timeout=10)  # polls every 20 ms
            latencies.append(time.perf_counter() - answered)
        finally:
            for rtc in (customer, first, *([second] if second else [])):
                await rtc.close()
    return {"handovers": n, "answer_to_first_picture": ms(latencies)}


def newer_picture(rtc: RtcClient, before: int) -> bool:
    return rtc.received_video_frames() > before


async def video_side_by_side(args: argparse.Namespace) -> dict[str, Any]:
    frames = await asyncio.to_thread(encode_vp8_loop)
    result: dict[str, Any] = {"bits_per_second": round(sum(map(len, frames)) * 8 / (len(frames) / FPS))}
    modes = [("forward", args.video_calls), ("transcode", args.transcode_calls)]
    if args.record:
        modes.insert(1, ("forward+record", args.video_calls))
    for mode, calls in modes:
        if not calls:
            continue
        with tempfile.TemporaryDirectory(prefix="talkgate-calls-") as folder:
            extra = ["--video", mode.split("+")[0], *(["--record", folder] if mode.endswith("record") else [])]
            gw = start_gateway(rate=10_000, burst=10_000, extra=[*RTC_LOOPBACK_ARGS, *extra])
            try:
                result[mode] = await media_cpu(gw, calls, args.seconds, "video", frames)
            finally:
                gw.stop()
            if mode.endswith("record"):
                result[mode].update(await asyncio.to_thread(recorded, Path(folder)))
    return result


def recorded(folder: Path) -> dict[str, Any]:
    """The files a --record gateway wrote (it finished them when it stopped)."""
    files = list(folder.rglob("*.*"))
    return {"recorded_files": len(files), "recorded_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ice.use_host_addresses(["127.0.0.1"])
    gw = start_gateway(rate=10_000, burst=10_000, extra=RTC_LOOPBACK_ARGS)
    result: dict[str, Any] = {"benchmark": "calls"}
    try:
        result["setup_aiortc"] = await setup_aiortc(gw.ws_url, args.setups)
        if args.browser_setups:
            result["setup_chromium"] = await asyncio.to_thread(setup_chromium, gw.url, args.browser_setups)
        result["relay_cpu"] = await media_cpu(gw, args.calls, args.seconds, "audio", encode_opus_tone(440))
    finally:
        gw.stop()
    if args.video_calls or args.transcode_calls:
        result["video_cpu"] = await video_side_by_side(args)
    if args.handovers:
        gw = start_gateway(rate=10_000, burst=10_000, extra=RTC_LOOPBACK_ARGS)
        try:
            result["video_handover"] = await handover_latency(gw, args.handovers)
        finally:
            gw.stop()
    return result


def print_table(r: dict[str, Any]) -> None:
    a = r["setup_aiortc"]
    print(
        f"aiortc client ({a['setups']} setups): offer→answer median {a['offer_to_answer']['median_ms']} ms"
        f" p95 {a['offer_to_answer']['p95_ms']} ms; offer→connected median {a['offer_to_connected']['median_ms']} ms"
        f" p95 {a['offer_to_connected']['p95_ms']} ms"
    )
    if c := r.get("setup_chromium"):
        print(
            f"Chromium ({c['setups']} setups): offer→connected median {c['offer_to_connected']['median_ms']} ms"
            f" p95 {c['offer_to_connected']['p95_ms']} ms; startVoice()→connected median"
            f" {c['start_to_connected']['median_ms']} ms p95 {c['start_to_connected']['p95_ms']} ms"
        )
    cpu = r["relay_cpu"]
    print(
        f"relay ({cpu['calls']} two-way audio calls, {cpu['seconds']} s): gateway CPU {cpu['gateway_cpu_pct']} %"
        f" (idle {cpu['gateway_cpu_idle_pct']} %) → {cpu['cpu_pct_per_call']} % of a core per call,"
        f" ≈{cpu['calls_per_core']} calls per core; packets received per receiver:"
        f" min {cpu['received_per_s_min']}/s, median {cpu['received_per_s_median']}/s of {cpu['sent_per_s']}/s"
    )
    if h := r.get("video_handover"):
        print(
            f"video hand-over ({h['handovers']}): agent 2's answer → the customer's first picture of agent 2:"
            f" median {h['answer_to_first_picture']['median_ms']} ms, p95 {h['answer_to_first_picture']['p95_ms']} ms"
        )
    video = r.get("video_cpu", {})
    for mode in ("forward", "forward+record", "transcode"):
        if v := video.get(mode):
            print(
                f"video {mode} ({v['calls']} two-way 640x480 VP8 calls at {v['sent_per_s']} fps,"
                f" {video['bits_per_second'] / 1000:.0f} kbit/s each way, {v['seconds']} s): gateway CPU"
                f" {v['gateway_cpu_pct']} % → {v['cpu_pct_per_call']} % of a core per call; pictures received"
                f" per receiver: min {v['received_per_s_min']}, median {v['received_per_s_median']} fps"
                + (f"; {v['recorded_files']} files, {v['recorded_mb']} MB" if "recorded_files" in v else "")
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", type=int, default=30)
    parser.add_argument("--browser-setups", type=int, default=10, help="0 skips Chromium")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--video-calls", type=int, default=10, help="two-way video calls forwarded (0: skip)")
    parser.add_argument("--transcode-calls", type=int, default=2, help="the same with --video transcode (0: skip)")
    parser.add_argument("--record", action="store_true", help="also the forwarded calls with --record, side by side")
    parser.add_argument("--handovers", type=int, default=5, help="video hand-overs to a second agent, timed (0: skip)")
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        outcome = runner.run(run(arguments))
    print(json.dumps(outcome) if arguments.json else "", end="\n" if arguments.json else "")
    if not arguments.json:
        print_table(outcome)
