"""Capacity: the most voice-bot sessions one gateway core holds, talkgate and the baseline side by side.

For each target, ``loadtest.run`` is repeated with N stepping up (a fresh target
process each time, pinned to one core; the generator and bot on the other) until a
step fails; then the gap between the last step that held and the first that failed
is halved ``--refine`` times. A step *holds* when, in its measurement window,

    event-loop lag p99 < 20 ms   and   speech-frame loss < 0.5 %   and   every session was set up.

    python benchmarks/capacity.py                                 # a few minutes on 2 cores
    python benchmarks/capacity.py --steps 5,10 --duration 3 --refine 0 --json   # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks import loadtest
from media import ice

MAX_LAG_P99_MS = 20.0
MAX_LOSS_PERCENT = 0.5


def holds(result: dict[str, Any]) -> bool:
    lag = result["loop_lag"]
    loss = result["loss_percent"]
    return (
        result["established"] == result["sessions"]
        and lag is not None
        and lag["p99_ms"] < MAX_LAG_P99_MS
        and loss is not None
        and loss < MAX_LOSS_PERCENT
    )


async def find_capacity(
    kind: str, steps: list[int], duration: float, refine: int, recording: loadtest.Recording
) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []

    async def step(n: int) -> bool:
        result = await loadtest.run(kind, n, duration, n / 25, recording)
        result["holds"] = holds(result)
        runs.append(result)
        print(f"{kind:>9} N={n:<4} {summary(result)}", file=sys.stderr, flush=True)
        return bool(result["holds"])

    best, failed = 0, None
    for n in steps:
        if await step(n):
            best = n
        else:
            failed = n
            break
    for _ in range(refine):
        if failed is None or failed - best <= max(5, best // 20):
            break
        middle = (best + failed) // 2
        if await step(middle):
            best = middle
        else:
            failed = middle
    return {"target": kind, "capacity": best, "first_failing": failed, "runs": runs}


def summary(r: dict[str, Any]) -> str:
    lag = r["loop_lag"] or {}
    return (
        f"{'holds ' if r['holds'] else 'FAILS '} cpu {r['cpu_percent']:5.1f}%  lag p99 {lag.get('p99_ms', '-')} ms"
        f"  loss {r['loss_percent']}%  stopped p50 {r['speech_end_to_stopped']['p50_ms']} ms"
        f"  echo p50 {r['bot_audio_to_client']['p50_ms']} ms  generator {r['generator_cpu_percent']}%"
    )


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'target':>9} {'N':>5} {'holds':>5} {'CPU %':>6} {'%/sess':>7} {'lag p50':>8} {'lag p99':>8} {'loss %':>7}"
        f" {'stop p50':>9} {'stop p99':>9} {'echo p50':>9} {'echo p99':>9} {'rtp→bot p99':>12} {'gen CPU':>8}"
    ]
    for result in results:
        for r in sorted(result["runs"], key=lambda r: r["sessions"]):
            lag = r["loop_lag"] or {}
            path = r.get("rtp_to_bot") or {}
            lines.append(
                f"{r['target']:>9} {r['sessions']:>5} {'yes' if r['holds'] else 'no':>5} {r['cpu_percent']:>6}"
                f" {r['cpu_percent_per_session']:>7} {lag.get('p50_ms', '-'):>8} {lag.get('p99_ms', '-'):>8}"
                f" {r['loss_percent']!s:>7} {r['speech_end_to_stopped']['p50_ms']!s:>9}"
                f" {r['speech_end_to_stopped']['p99_ms']!s:>9} {r['bot_audio_to_client']['p50_ms']!s:>9}"
                f" {r['bot_audio_to_client']['p99_ms']!s:>9} {path.get('p99_ms', '-')!s:>12}"
                f" {r['generator_cpu_percent']:>8}"
            )
    lines.append("")
    for result in results:
        lines.append(f"capacity {result['target']:>9}: {result['capacity']} sessions on one core")
    if len(results) == 2 and results[1]["capacity"]:
        lines.append(f"ratio talkgate / baseline: {results[0]['capacity'] / results[1]['capacity']:.2f}")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    ice.use_host_addresses(["127.0.0.1"])
    recording = loadtest.Recording.build()
    steps = [int(n) for n in args.steps.split(",")]
    results = []
    for kind in ("talkgate", "baseline"):
        baseline_steps = [n for n in steps if n <= (args.baseline_max or n)]
        results.append(
            await find_capacity(
                kind, steps if kind == "talkgate" else baseline_steps, args.duration, args.refine, recording
            )
        )
    out: dict[str, Any] = {"results": results}
    if results[1]["capacity"]:
        out["ratio"] = round(results[0]["capacity"] / results[1]["capacity"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="25,50,100,150,200,250,300")
    parser.add_argument("--duration", type=float, default=10.0, help="Measured seconds per step.")
    parser.add_argument("--refine", type=int, default=2, help="Halvings between the last hold and the first failure.")
    parser.add_argument("--baseline-max", type=int, default=0, help="Skip baseline steps above this (0: none).")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    loadtest.pin_generator()
    out = uvloop.run(main_async(args))
    print(table(out["results"]), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
