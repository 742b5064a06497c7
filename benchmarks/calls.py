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
  relay-cpu       K conversations, customer and agent each sending a tone: the gateway
                  decodes 2K streams and re-encodes 2K. Gateway CPU is read from /proc
                  over S seconds of calls and over S seconds idle, in the same run.
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

import uvloop

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository's tests/ helpers

from benchmarks.signaling import SECRET, pct, start_gateway
from gateway import tokens
from media import ice
from tests.client import Client
from tests.gateway_process import RTC_LOOPBACK_ARGS, GatewayProcess
from tests.rtc_client import RtcClient, ToneTrack


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


async def relay_cpu(gw: GatewayProcess, calls: int, seconds: float) -> dict[str, Any]:
    cpu0 = gw.cpu_seconds()
    await asyncio.sleep(seconds)
    idle = (gw.cpu_seconds() - cpu0) / seconds
    parties: list[RtcClient] = []
    for i in range(calls):
        for identity, role, hz in ((f"c{i}", "customer", 440), (f"a{i}", "agent", 880)):
            rtc = await join(gw.ws_url, identity, role, f"cpu-{i}")
            rtc.pc.addTrack(ToneTrack(hz))
            await rtc.negotiate()
            parties.append(rtc)
    await asyncio.gather(*(rtc.hears("audio", frames=25, timeout=20) for rtc in parties))
    frames0 = sum(r.frames for rtc in parties for r in rtc.received)
    cpu0, t0 = gw.cpu_seconds(), time.perf_counter()
    await asyncio.sleep(seconds)
    wall = time.perf_counter() - t0
    busy = (gw.cpu_seconds() - cpu0) / wall
    frames = sum(r.frames for rtc in parties for r in rtc.received) - frames0
    await asyncio.gather(*(rtc.close() for rtc in parties))
    per_call = (busy - idle) / calls
    return {
        "calls": calls,
        "seconds": seconds,
        "gateway_cpu_idle_pct": round(idle * 100, 2),
        "gateway_cpu_pct": round(busy * 100, 2),
        "cpu_pct_per_call": round(per_call * 100, 2),
        "calls_per_core": round(1 / per_call, 1) if per_call > 0 else None,
        "frames_received_per_s": round(frames / wall, 1),
        "frames_expected_per_s": 2 * calls * 50,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ice.use_host_addresses(["127.0.0.1"])
    gw = start_gateway(rate=10_000, burst=10_000, extra=RTC_LOOPBACK_ARGS)
    try:
        result: dict[str, Any] = {"benchmark": "calls"}
        result["setup_aiortc"] = await setup_aiortc(gw.ws_url, args.setups)
        if args.browser_setups:
            result["setup_chromium"] = await asyncio.to_thread(setup_chromium, gw.url, args.browser_setups)
        result["relay_cpu"] = await relay_cpu(gw, args.calls, args.seconds)
        return result
    finally:
        gw.stop()


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
        f" ≈{cpu['calls_per_core']} calls per core; frames received {cpu['frames_received_per_s']}/s"
        f" of {cpu['frames_expected_per_s']}/s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", type=int, default=30)
    parser.add_argument("--browser-setups", type=int, default=10, help="0 skips Chromium")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        outcome = runner.run(run(arguments))
    print(json.dumps(outcome) if arguments.json else "", end="\n" if arguments.json else "")
    if not arguments.json:
        print_table(outcome)
