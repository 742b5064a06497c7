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

    python benchmarks/bot_latency.py               # 8 utterances
    python benchmarks/bot_latency.py --utterances 1 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from websockets.asyncio.server import ServerConnection, serve

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository's tests/ helpers

from benchmarks.signaling import SECRET, pct
from gateway import tokens
from media import ice
from tests.client import Client
from tests.gateway_process import RTC_LOOPBACK_ARGS, GatewayProcess
from tests.rtc_client import LOUD, RtcClient, SpeechTrack
from tests.speech import utterances

TEXTS = ["I would like to book an appointment", "Tomorrow at nine please", "Yes that works for me"]


class EchoBot:
    """The echo bot's behaviour, with timestamps."""

    def __init__(self) -> None:
        self.stopped_at: list[float] = []
        #: When the first loud 20 ms of each echo is due to play (send time + its offset).
        self.loud_due_at: list[float] = []

    async def handle(self, ws: ServerConnection) -> None:
        segment: list[bytes] = []
        async for data in ws:
            if isinstance(data, bytes):
                segment.append(data)
                continue
            message = json.loads(data)
            if message["type"] == "speech.started":
                segment = []
            elif message["type"] == "speech.stopped":
                self.stopped_at.append(time.perf_counter())
                audio = b"".join(segment)
                frames = np.frombuffer(audio, dtype="<i2")[: len(audio) // 640 * 320].reshape(-1, 320)
                rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
                first_loud = int(np.argmax(rms >= LOUD))
                self.loud_due_at.append(time.perf_counter() + first_loud * 0.02)
                for i in range(0, len(audio), 3200):
                    await ws.send(audio[i : i + 3200])


def ms(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values) * 1000, 1), "p95_ms": round(pct(values, 0.95) * 1000, 1)}


async def run(n: int) -> dict[str, Any]:
    ice.use_host_addresses(["127.0.0.1"])
    bot = EchoBot()
    async with serve(bot.handle, "127.0.0.1", 0, max_size=2**22) as bot_server:
        bot_url = f"ws://127.0.0.1:{bot_server.sockets[0].getsockname()[1]}/"
        gw = GatewayProcess(
            "serve", "--port", "0", *RTC_LOOPBACK_ARGS, "--bot-url", bot_url, env={"TALKGATE_SECRET": SECRET}
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
        finally:
            gw.stop()
    return {
        "benchmark": "bot_latency",
        "utterances": n,
        "segments_at_bot": len(bot.stopped_at),
        "speech_end_to_speech_stopped": ms(to_stopped),
        "beyond_stop_ms": ms([t - 0.5 for t in to_stopped]),
        "bot_audio_to_client": ms(to_client),
        "echoes_heard": len(to_client),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(arguments.utterances))
    if not arguments.json:
        s, b, c = result["speech_end_to_speech_stopped"], result["beyond_stop_ms"], result["bot_audio_to_client"]
        print(
            f"{result['utterances']} utterances, {result['segments_at_bot']} segments at the bot,"
            f" {result['echoes_heard']} echoes heard\n"
            f"  end of speech → speech.stopped at the bot: median {s['median_ms']} ms, p95 {s['p95_ms']} ms"
            f" (beyond the 500 ms hangover: median {b['median_ms']} ms, p95 {b['p95_ms']} ms)\n"
            f"  bot audio due → heard at the client: median {c['median_ms']} ms, p95 {c['p95_ms']} ms"
        )
    print(json.dumps(result))
