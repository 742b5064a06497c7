"""Bot latency on loopback: end of speech → ``speech.stopped`` at the bot, and bot audio → client.

A gateway subprocess dials an echo bot that runs in this process (so its receive and
send times are on this process's clock); an aiortc customer in this process speaks
espeak-ng utterances with long pauses and listens to the echo.

- speech end → speech.stopped at the bot: the wall time the bot gets ``speech.stopped``
  minus the wall time the utterance's last sample was sent. It is about ``stop_ms``
  (the hangover, 500 ms by default) plus detection; the rest is the gateway's part.
- bot audio → client: when the echo's first loud 20 ms is due (the bot sends the whole
  segment at once; its first ``k`` frames are the quiet preroll, played first) minus
  when the customer's peer connection decodes its first loud frame. Includes the
  gateway's playback, Opus encode, RTP, aiortc's jitter buffer and decode at the client.

- barge-in: the bot is talking (a long tone, sent at ``call.started``) when the
  customer starts to speak: from the first sample of the customer's speech (as their
  track sends it) to the bot's voice going quiet at the customer. Includes the VAD's
  onset detection, the gateway's hold, and the way back (jitter buffer, decode).

- ``--vad silero`` / ``--turn-detection smart`` run the gateway with those options
  (docs/media.md): with smart turns, end of speech → speech.stopped is the pause (200 ms)
  plus the model's decision instead of the 500 ms hangover.

    python benchmarks/bot_latency.py               # 8 utterances
    python benchmarks/bot_latency.py --utterances 1 --json
    python benchmarks/bot_latency.py --turn-detection smart --barge-ins 0
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository's tests/ helpers

from benchmarks.signaling import SECRET, pct
from gateway import tokens
from media import ice
from media.g711 import ulaw_encode
from tests.client import Client
from tests.gateway_process import RTC_LOOPBACK_ARGS, GatewayProcess
from tests.rtc_client import LOUD, RtcClient, SpeechTrack
from tests.speech import utterances

TEXTS = ["I would like to book an appointment.", "Tomorrow at nine please.", "Yes that works for me."]


class EchoBot:
    """The echo bot's behaviour, with timestamps; in barge-in rooms it talks first."""

    def __init__(self) -> None:
        self.interrupted_at: list[float] = []
        self.interrupted = asyncio.Event()
        self.stopped_at: list[float] = []
        #: When the first loud 20 ms of each echo is due to play (send time + its offset).
        self.loud_due_at: list[float] = []

    async def handle(self, ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):  # the customer may be gone mid-echo
            await self._serve(ws)

    async def _serve(self, ws: ServerConnection) -> None:
        segment: list[bytes] = []
        timed = True  # the latency room (barge-in rooms are measured differently)
        async for data in ws:
            if isinstance(data, bytes):
                segment.append(data)
                continue
            message = json.loads(data)
            if message["type"] == "start" and message["conversation"].startswith("barge"):
                timed = False
            elif message["type"] == "call.started" and not timed:
                t = np.arange(16_000 * 10) / 16_000
                await ws.send((8000 * np.sin(2 * np.pi * 500 * t)).astype("<i2").tobytes())  # a long answer
            elif message["type"] == "interrupted":
                self.interrupted_at.append(time.perf_counter())
                self.interrupted.set()
            elif message["type"] == "speech.started":
                segment = []
            elif message["type"] == "speech.stopped" and timed:
                self.stopped_at.append(time.perf_counter())
                audio = b"".join(segment)
                frames = np.frombuffer(audio, dtype="<i2")[: len(audio) // 640 * 320].reshape(-1, 320)
                rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
                first_loud = int(np.argmax(rms >= LOUD))
                self.loud_due_at.append(time.perf_counter() + first_loud * 0.02)
                for i in range(0, len(audio), 3200):
                    await ws.send(audio[i : i + 3200])


class PacingTwilioBot:
    """A Twilio Media Streams bot as third-party frameworks behave: it streams its answer
    in real time (20 ms of μ-law every 20 ms, from each ``start``) and never sends
    ``clear`` (its own VAD is not listening). Only the gateway's barge-in can silence it."""

    def __init__(self) -> None:
        self.interrupted = asyncio.Event()  # unused: a Twilio bot hears of nothing

    async def handle(self, ws: ServerConnection) -> None:
        pacing: asyncio.Task[None] | None = None
        try:
            async for data in ws:
                message = json.loads(data)
                if message.get("event") == "start":
                    pacing = asyncio.create_task(self._answer(ws, message["streamSid"]))
                elif message.get("event") == "stop" and pacing is not None:
                    pacing.cancel()
        except ConnectionClosed:
            pass
        finally:
            if pacing is not None:
                pacing.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await pacing

    async def _answer(self, ws: ServerConnection, sid: str) -> None:
        t = np.arange(160) / 8000
        frame = base64.b64encode(ulaw_encode((8000 * np.sin(2 * np.pi * 500 * t)).astype("<i2").tobytes())).decode()
        start = time.monotonic()
        for k in range(500):  # 10 s
            await ws.send(json.dumps({"event": "media", "streamSid": sid, "media": {"payload": frame}}))
            await asyncio.sleep(max(0.0, start + (k + 1) * 0.02 - time.monotonic()))


def ms(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values) * 1000, 1), "p95_ms": round(pct(values, 0.95) * 1000, 1)}


async def barge_in(gw: GatewayProcess, bot: EchoBot | PacingTwilioBot, i: int) -> float:
    """One interruption: seconds from the customer's speech onset to quiet at the customer."""
    client = await Client.open(gw.ws_url)
    await client.send(
        {"type": "join", "token": tokens.issue(SECRET, identity=f"b{i}", role="customer", room=f"barge-{i}")}
    )
    await client.wait_for("joined")
    customer = RtcClient(client)
    fixture = utterances([TEXTS[0]], lead_s=2.0, tail_s=1.0)  # the bot talks for 2 s, then the customer
    track = SpeechTrack(fixture.pcm)
    customer.pc.addTrack(track)
    await customer.negotiate()
    bot.interrupted.clear()
    async with asyncio.timeout(15):
        # monotonic and perf_counter are the same clock here (CLOCK_MONOTONIC on Linux).
        onset = await track.started() + fixture.truth[0][0] / 1000
        if isinstance(bot, EchoBot):
            await bot.interrupted.wait()  # the speech did interrupt the bot
        received = next(r for r in customer.received if r.kind == "audio")
        while not any(t >= onset for t in received.quiet_onsets):
            received.onset.clear()
            await received.onset.wait()
    quiet = next(t for t in received.quiet_onsets if t >= onset)
    await customer.close()
    return quiet - onset


async def run(n: int, barge_ins: int, ears: list[str]) -> dict[str, Any]:
    ice.use_host_addresses(["127.0.0.1"])
    bot = EchoBot()
    async with serve(bot.handle, "127.0.0.1", 0, max_size=2**22) as bot_server:
        bot_url = f"ws://127.0.0.1:{bot_server.sockets[0].getsockname()[1]}/"
        gw = GatewayProcess(
            *("serve", "--port", "0", *RTC_LOOPBACK_ARGS, "--bot-url", bot_url, *ears),
            env={"TALKGATE_SECRET": SECRET},
        )
        try:
            texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
            fixture = utterances(texts, lead_s=1.0, gap_s=4.0, tail_s=4.0)
            client = await Client.open(gw.ws_url)
            await client.send(
                {"type": "join", "token": tokens.issue(SECRET, identity="c", role="customer", room="lat")}
            )
            await client.wait_for("joined")
            customer = RtcClient(client)
            track = SpeechTrack(fixture.pcm)
            customer.pc.addTrack(track)
            await customer.negotiate()
            # The track's clock: sample k is sent at t0 + k / rate (it paces itself).
            t0_wall = await track.started()
            t0_perf = time.perf_counter() - (time.monotonic() - t0_wall)
            await asyncio.sleep(len(fixture.pcm) / 16_000 + 0.5)
            ends = [t0_perf + end / 1000 for _, end in fixture.truth]
            stopped = bot.stopped_at[: len(ends)]
            to_stopped = [s - e for s, e in zip(stopped, ends, strict=True)]
            onsets = next(r for r in customer.received if r.kind == "audio").loud_onsets
            to_client = []
            for due in bot.loud_due_at:
                arrival = next((t for t in onsets if t >= due - 0.01), None)
                if arrival is not None:
                    to_client.append(arrival - due)
            await customer.close()
            to_quiet = [await barge_in(gw, bot, i) for i in range(barge_ins)]
        finally:
            gw.stop()
    twilio_quiet: list[float] = []
    if not barge_ins:
        return summary(n, bot, ears, to_stopped, to_client, to_quiet, twilio_quiet)
    twilio_bot = PacingTwilioBot()
    async with serve(twilio_bot.handle, "127.0.0.1", 0, max_size=2**22) as twilio_server:
        twilio_url = f"ws://127.0.0.1:{twilio_server.sockets[0].getsockname()[1]}/"
        gw = GatewayProcess(
            *("serve", "--port", "0", *RTC_LOOPBACK_ARGS, "--bot-url", twilio_url, "--bot-protocol", "twilio", *ears),
            env={"TALKGATE_SECRET": SECRET},
        )
        try:
            twilio_quiet = [await barge_in(gw, twilio_bot, i) for i in range(barge_ins)]
        finally:
            gw.stop()
    return summary(n, bot, ears, to_stopped, to_client, to_quiet, twilio_quiet)


def summary(
    n: int,
    bot: EchoBot,
    ears: list[str],
    to_stopped: list[float],
    to_client: list[float],
    to_quiet: list[float],
    twilio_quiet: list[float],
) -> dict[str, Any]:
    return {
        "benchmark": "bot_latency",
        "gateway_options": " ".join(ears),
        "utterances": n,
        "segments_at_bot": len(bot.stopped_at),
        "speech_end_to_speech_stopped": ms(to_stopped),
        "beyond_stop_ms": ms([t - 0.5 for t in to_stopped]),
        "bot_audio_to_client": ms(to_client),
        "echoes_heard": len(to_client),
        "barge_ins": len(to_quiet),
        "speech_onset_to_quiet_at_client": ms(to_quiet) if to_quiet else None,
        "twilio_pacing_bot_speech_onset_to_quiet_at_client": ms(twilio_quiet) if twilio_quiet else None,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--barge-ins", type=int, default=5)
    parser.add_argument("--vad", choices=["webrtc", "silero"], default="webrtc")
    parser.add_argument("--turn-detection", choices=["silence", "smart"], default="silence")
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    options = ["--vad", arguments.vad, "--turn-detection", arguments.turn_detection]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(arguments.utterances, arguments.barge_ins, options))
    if not arguments.json:
        s, b, c = result["speech_end_to_speech_stopped"], result["beyond_stop_ms"], result["bot_audio_to_client"]
        print(
            f"{result['utterances']} utterances ({result['gateway_options']}), {result['segments_at_bot']} segments"
            f" at the bot, {result['echoes_heard']} echoes heard\n"
            f"  end of speech → speech.stopped at the bot: median {s['median_ms']} ms, p95 {s['p95_ms']} ms"
            f" (beyond the 500 ms hangover: median {b['median_ms']} ms, p95 {b['p95_ms']} ms)\n"
            f"  bot audio due → heard at the client: median {c['median_ms']} ms, p95 {c['p95_ms']} ms"
        )
        native, twilio = (
            result["speech_onset_to_quiet_at_client"],
            result["twilio_pacing_bot_speech_onset_to_quiet_at_client"],
        )
        if native and twilio:
            print(
                f"  barge-in ({result['barge_ins']}): the customer's speech onset → bot quiet at the client:"
                f" median {native['median_ms']} ms, p95 {native['p95_ms']} ms (native echo bot);"
                f" median {twilio['median_ms']} ms, p95 {twilio['p95_ms']} ms"
                " (Twilio bot streaming in real time, never clearing)"
            )
    print(json.dumps(result))
