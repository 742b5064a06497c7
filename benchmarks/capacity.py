"""Capacity: the most voice-bot sessions one gateway core holds, talkgate and the baseline side by side.

For each target, ``loadtest.run`` is repeated with N stepping up (a fresh target
process each time, pinned to one core; the generator and bot on the other) until a
step fails; then the gap between the last step that held and the first that failed
is halved ``--refine`` times. A step *holds* when, in its measurement window,

    event-loop lag p99 < 20 ms   and   speech-frame loss < 0.5 %   and   every session was set up.

``--shape`` is loadtest.py's: ``echo`` (the bot answers, the default), ``listen`` (it
never does; the baseline runs ``--no-playback``) or ``both`` (the search for each).

``--plot FILE.png`` draws, after the search, CPU % of one core and loop-lag p99
against sessions, a line per target (and shape), from every step's run; with
``--from-json`` it redraws (and reprints the table) from saved ``--json`` output
instead of running anything.

    python benchmarks/capacity.py                                 # a few minutes on 2 cores
    python benchmarks/capacity.py --shape listen --json > listen.json
    python benchmarks/capacity.py --from-json echo.json listen.json --plot capacity.png
    python benchmarks/capacity.py --steps 5,10 --duration 3 --refine 0 --json   # smoke

``--bot-audio opus``: talkgate's bot answers in Opus packets, which it sends on
unencoded (a bot with an Opus TTS); the baseline's still answers in PCM, so no ratio is
printed for that pair (it would not compare like with like).
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
    kind: str,
    steps: list[int],
    duration: float,
    refine: int,
    recording: loadtest.Recording,
    shape: str = "echo",
    bot_audio: str = "pcm",
) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []

    async def step(n: int) -> bool:
        result = await loadtest.run(kind, n, duration, n / 25, recording, shape=shape, bot_audio=bot_audio)
        result["holds"] = holds(result)
        runs.append(result)
        print(f"{name(result):>14} {shape:>6} N={n:<4} {summary(result)}", file=sys.stderr, flush=True)
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
    return {
        "target": kind,
        "shape": shape,
        "bot_audio": bot_audio,
        "capacity": best,
        "first_failing": failed,
        "runs": runs,
    }


def name(result: dict[str, Any]) -> str:
    """The target, marked ``+opus`` where the bot answered in Opus packets (``--bot-audio``)."""
    return str(result["target"]) + ("+opus" if result.get("bot_audio") == "opus" else "")


def shape_of(result: dict[str, Any]) -> str:
    """A result's shape; output saved before there were shapes is the echo shape."""
    return str(result.get("shape", "echo"))


def summary(r: dict[str, Any]) -> str:
    lag = r["loop_lag"] or {}
    echo = r["bot_audio_to_client"] or {}
    return (
        f"{'holds ' if r['holds'] else 'FAILS '} cpu {r['cpu_percent']:5.1f}%  lag p99 {lag.get('p99_ms', '-')} ms"
        f"  loss {r['loss_percent']}%  stopped p50 {r['speech_end_to_stopped']['p50_ms']} ms"
        f"  echo p50 {echo.get('p50_ms', '-')} ms  generator {r['generator_cpu_percent']}%"
    )


def ratios(results: list[dict[str, Any]]) -> dict[str, float]:
    """talkgate's capacity over the baseline's, per shape where both were searched."""
    found = {(name(r), shape_of(r)): r["capacity"] for r in results}  # like for like: no +opus
    return {
        shape: round(found[("talkgate", shape)] / found[("baseline", shape)], 2)
        for shape in dict.fromkeys(shape_of(r) for r in results)
        if found.get(("talkgate", shape)) is not None and found.get(("baseline", shape))
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'target':>14} {'shape':>6} {'N':>5} {'holds':>5} {'CPU %':>6} {'%/sess':>7} {'lag p50':>8} {'lag p99':>8}"
        f" {'loss %':>7} {'stop p50':>9} {'stop p99':>9} {'echo p50':>9} {'echo p99':>9} {'rtp→bot p99':>12}"
        f" {'gen CPU':>8}"
    ]
    for result in results:
        for r in sorted(result["runs"], key=lambda r: r["sessions"]):
            lag = r["loop_lag"] or {}
            path = r.get("rtp_to_bot") or {}
            echo = r["bot_audio_to_client"] or {}
            lines.append(
                f"{name(r):>14} {shape_of(r):>6} {r['sessions']:>5} {'yes' if r['holds'] else 'no':>5}"
                f" {r['cpu_percent']:>6} {r['cpu_percent_per_session']:>7} {lag.get('p50_ms', '-'):>8}"
                f" {lag.get('p99_ms', '-'):>8} {r['loss_percent']!s:>7} {r['speech_end_to_stopped']['p50_ms']!s:>9}"
                f" {r['speech_end_to_stopped']['p99_ms']!s:>9} {echo.get('p50_ms', '-')!s:>9}"
                f" {echo.get('p99_ms', '-')!s:>9} {path.get('p99_ms', '-')!s:>12} {r['generator_cpu_percent']:>8}"
            )
    lines.append("")
    for result in results:
        lines.append(f"capacity {name(result):>14} ({shape_of(result)}): {result['capacity']} sessions on one core")
    for shape, ratio in ratios(results).items():
        lines.append(f"ratio talkgate / baseline ({shape}): {ratio:.2f}")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    """CPU % of one core and loop-lag p99 against sessions, from every step's run.

    Where the core fills up and where the loop starts to lag, per target: colour by
    target, line style by shape, hollow markers on the steps that failed. matplotlib
    (the ``bench`` extra) is imported here so the search itself does without it, and
    drawn on an Agg canvas: no display, no pyplot state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

    shapes = list(dict.fromkeys(shape_of(r) for r in results))
    kinds = list(dict.fromkeys(name(r) for r in results))
    figure = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(figure)
    cpu_axes, lag_axes = figure.subplots(1, 2)
    for result in results:
        runs = sorted(result["runs"], key=lambda r: r["sessions"])
        shape = shape_of(result)
        style = {
            "color": f"C{kinds.index(name(result))}",
            "linestyle": ("-", "--")[shapes.index(shape) % 2],
            "marker": ("o", "s")[shapes.index(shape) % 2],
        }
        label = name(result) if len(shapes) == 1 else f"{name(result)} ({shape})"
        label += f": capacity {result['capacity']}"
        lagging = [r for r in runs if r["loop_lag"] is not None]
        cpu_axes.plot([r["sessions"] for r in runs], [r["cpu_percent"] for r in runs], label=label, **style)
        lag_axes.plot(
            [r["sessions"] for r in lagging], [r["loop_lag"]["p99_ms"] for r in lagging], label=label, **style
        )
        hollow = {**style, "linestyle": "", "markerfacecolor": "white", "markeredgecolor": style["color"]}
        failed = [r for r in runs if not r["holds"]]
        cpu_axes.plot([r["sessions"] for r in failed], [r["cpu_percent"] for r in failed], **hollow)
        failed_lag = [r["loop_lag"]["p99_ms"] for r in failed if r["loop_lag"] is not None]
        lag_axes.plot([r["sessions"] for r in failed if r["loop_lag"] is not None], failed_lag, **hollow)
    cpu_axes.axhline(100, color="grey", linestyle=":", linewidth=1)
    cpu_axes.set_ylim(bottom=0)
    cpu_axes.set(xlabel="sessions", ylabel="target CPU, % of one core", title="CPU (target process)")
    lag_axes.axhline(MAX_LAG_P99_MS, color="grey", linestyle=":", linewidth=1)
    lag_axes.set_yscale("log")
    lag_axes.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 1, 2, 5, 10, 20, 50… ms
    lag_axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    lag_axes.yaxis.set_minor_formatter(NullFormatter())
    lag_axes.set(xlabel="sessions", ylabel="event-loop lag p99, ms (log)", title="Event-loop lag p99")
    failed_marker = Line2D([], [], linestyle="", marker="o", markerfacecolor="white", markeredgecolor="grey")
    for axes, limit in ((cpu_axes, "one core"), (lag_axes, f"holds below {MAX_LAG_P99_MS:g} ms")):
        axes.grid(True, alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        handles, labels = axes.get_legend_handles_labels()
        limit_line = Line2D([], [], color="grey", linestyle=":")
        axes.legend([*handles, failed_marker, limit_line], [*labels, "step failed", limit], fontsize="small")
    figure.suptitle(f"Voice-bot sessions on one core: {', '.join(kinds)} ({', '.join(shapes)})")
    figure.savefig(path, dpi=100)


def load(paths: list[str]) -> list[dict[str, Any]]:
    """The results of saved runs: each file holds what ``--json`` printed (its last line)."""
    results: list[dict[str, Any]] = []
    for path in paths:
        results += json.loads(Path(path).read_text().strip().splitlines()[-1])["results"]
    return results


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    ice.use_host_addresses(["127.0.0.1"])
    recording = loadtest.Recording.build()
    steps = [int(n) for n in args.steps.split(",")]
    results = []
    for shape in loadtest.SHAPES if args.shape == "both" else [args.shape]:
        for kind in ("talkgate", "baseline"):
            baseline_steps = [n for n in steps if n <= (args.baseline_max or n)]
            results.append(
                await find_capacity(
                    kind,
                    steps if kind == "talkgate" else baseline_steps,
                    args.duration,
                    args.refine,
                    recording,
                    shape,
                    args.bot_audio if kind == "talkgate" else "pcm",
                )
            )
    out: dict[str, Any] = {"shape": args.shape, "results": results, "ratios": ratios(results)}
    if args.shape != "both" and args.shape in out["ratios"]:
        out["ratio"] = out["ratios"][args.shape]  # as before there were shapes
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="25,50,100,150,200,250,300")
    parser.add_argument("--duration", type=float, default=10.0, help="Measured seconds per step.")
    parser.add_argument("--refine", type=int, default=2, help="Halvings between the last hold and the first failure.")
    parser.add_argument("--baseline-max", type=int, default=0, help="Skip baseline steps above this (0: none).")
    parser.add_argument(
        "--shape", choices=[*loadtest.SHAPES, "both"], default="echo", help="loadtest.py's: the bot answers or not."
    )
    parser.add_argument(
        "--bot-audio",
        choices=["pcm", "opus"],
        default="pcm",
        help="loadtest.py's: talkgate's bot answers in PCM or in Opus packets (the baseline's in PCM)",
    )
    parser.add_argument("--plot", metavar="FILE.png", help="Draw CPU and loop-lag p99 against sessions.")
    parser.add_argument(
        "--from-json", nargs="+", metavar="FILE", help="Run nothing: table (and --plot) from saved --json output."
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.from_json:
        results = load(args.from_json)
        out: dict[str, Any] = {"results": results, "ratios": ratios(results)}
    else:
        loadtest.pin_generator()
        out = uvloop.run(main_async(args))
    print(table(out["results"]), file=sys.stderr if args.json else sys.stdout)
    if args.plot:
        plot(out["results"], args.plot)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
