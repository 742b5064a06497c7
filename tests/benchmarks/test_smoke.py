"""Each benchmark runs briefly in the suite so it never rots (figures are not asserted: CI is noisy)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import pytest
from PIL import Image  # Pillow comes with matplotlib

from benchmarks import loadtest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def run_benchmark(script: str, *args: str, timeout: float = 180) -> dict[str, Any]:
    """Run a benchmark with --json; its last output line is the JSON result."""
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def test_signaling_benchmark_runs_and_reports_every_figure() -> None:
    result = run_benchmark(
        "signaling.py",
        *("--joins", "20", "--concurrency", "5", "--fanout", "5", "--messages", "10"),
        *("--load-conversations", "5", "--load-rate", "50", "--load-seconds", "1"),
        *("--database", "memory,memory+api,sqlite,postgresql"),
    )
    assert not result["skipped"], result["skipped"]  # tests/run installs PostgreSQL
    assert set(result["medians"]) == {"memory", "memory+api", "sqlite", "postgresql"}
    assert [name for name, (run,) in result["runs"].items() if run["api"]] == ["memory+api"]
    for database, (run,) in result["runs"].items():
        assert run["join_latency"]["joins"] == 20, database
        assert run["join_latency"]["join_to_joined"]["median_ms"] > 0
        assert run["join_rate"]["joins_per_s"] > 0
        fanout = run["fanout"]
        assert fanout["deliveries"] == 5 * 10  # every chat reached every participant, sender included
        assert fanout["delivery"]["p95_ms"] >= fanout["delivery"]["median_ms"] > 0
        load = run["load"]
        assert load["deliveries"] == 2 * load["messages"] == 2 * 5 * 10  # both participants, every message
        assert load["echo"]["p95_ms"] >= load["echo"]["median_ms"] > 0


def test_calls_benchmark_runs_and_reports_every_figure() -> None:
    result = run_benchmark(
        "calls.py",
        *("--setups", "2", "--browser-setups", "1", "--calls", "1", "--seconds", "2"),
        *("--video-calls", "1", "--transcode-calls", "1", "--record", "--handovers", "1"),
    )
    assert result["setup_aiortc"]["offer_to_connected"]["median_ms"] > 0
    assert result["setup_chromium"]["offer_to_connected"]["median_ms"] > 0
    relay = result["relay_cpu"]
    assert relay["received_per_s_min"] > 0.5 * relay["sent_per_s"]  # audio really flowed
    for mode in ("forward", "forward+record", "transcode"):
        video = result["video_cpu"][mode]
        assert video["received_per_s_min"] > 0.5 * video["sent_per_s"], mode  # pictures really arrived
        assert video["cpu_pct_per_call"] is not None
    assert result["video_cpu"]["forward+record"]["recorded_files"] == 2  # each side's camera
    assert result["video_handover"]["answer_to_first_picture"]["median_ms"] > 0


def test_pipeline_benchmark_runs_the_gateways_inbound_path_and_finds_the_utterances() -> None:
    result = run_benchmark("pipeline.py", "--repeat", "1")
    assert result["segments_found"] == result["utterances"]  # the VAD worked on the real speech
    for key in ("us_per_packet", "c_work_us_per_packet", "srtp_us", "opus_decode_16k_us", "webrtcvad_us"):
        assert result[key] > 0, key
    assert abs(result["ratio_total_to_c"] - result["us_per_packet"] / result["c_work_us_per_packet"]) < 0.02


def test_vad_accuracy_benchmark_runs_both_detectors_and_both_turn_modes() -> None:
    result = run_benchmark("vad_accuracy.py", "--quick")
    assert set(result["vad"]) == {"clean", "white 5 dB"}
    for row in result["vad"].values():
        assert set(row) == {"webrtc", "webrtc+hangover", "silero", "silero/512"}
        assert all(r["cpu_us_per_frame"] > 0 and r["expected"] == 2 for r in row.values())
    assert result["vad"]["clean"]["silero"]["found"] == 2  # the model ran on the real speech
    turn = result["turn"]
    assert turn["decisions"] > 0 and turn["cpu_ms_per_decision_median"] > 0
    clean = turn["by_condition"]["clean"]
    assert clean["silence"]["ended_by_model"] == 0 and clean["silence"]["end_to_stopped_median_ms"] >= 500


def test_bot_latency_benchmark_runs_and_hears_the_echo() -> None:
    result = run_benchmark("bot_latency.py", "--utterances", "1", "--barge-ins", "1")
    assert result["segments_at_bot"] == 1 and result["echoes_heard"] == 1
    assert result["barge_ins"] == 1 and result["speech_onset_to_quiet_at_client"]["median_ms"] > 0
    assert result["twilio_pacing_bot_speech_onset_to_quiet_at_client"]["median_ms"] > 0
    assert result["speech_end_to_speech_stopped"]["median_ms"] > 0
    assert result["bot_audio_to_client"]["median_ms"] > 0


def test_loadtest_runs_talkgate_and_the_baseline_side_by_side() -> None:
    result = run_benchmark("loadtest.py", "--sessions", "3", "--duration", "5", "--breakdown", "--bot-audio", "opus")
    talkgate, baseline = result["results"]
    # --bot-audio opus: talkgate's bot answers in Opus packets, sent on unencoded; the
    # baseline, which cannot pass them through, still gets PCM.
    assert (talkgate["bot_audio"], baseline["bot_audio"]) == ("opus", "pcm")
    # --breakdown timed talkgate's packet path (the baseline has none): every packet took it,
    # each was unprotected, decoded and judged once, and the parts fit in the whole.
    parts = talkgate["breakdown"]
    assert parts["packets"] > 100 and "breakdown" not in baseline
    for name in ("srtp", "decode", "vad"):
        assert 0.9 <= parts[name]["calls"] <= 1.0 and parts[name]["us"] > 0, name
    inside = sum(parts[name]["us"] for name in ("srtp", "decode", "vad", "bot_write"))
    assert inside < parts["in_path"]["us"] < parts["cpu_us"]
    assert parts["voice_encode"]["calls"] == 0  # the bot's voice went out unencoded (tests/bot: it is heard)
    assert (talkgate["target"], baseline["target"]) == ("talkgate", "baseline")
    for r in (talkgate, baseline):
        assert r["established"] == 3, r["errors"]
        assert r["segments"] >= 1 and r["frames_received"] > 0  # speech reached the bot through the target
        assert r["loss_percent"] is not None and r["loop_lag"]["count"] > 0
        assert r["cpu_percent"] > 0 and r["setup"]["p50_ms"] > 0
        assert r["speech_end_to_stopped"]["p50_ms"] > 0
        assert r["shape"] == "echo" and r["client_rtp_packets"] > 0  # the echo shape is the default
    assert talkgate["rtp_to_bot"]["count"] > 0  # talkgate's own audio-path histogram


def test_loadtest_listen_shape_sends_nothing_back_and_tables_cpu_per_session() -> None:
    """``--shape both``: each target listening (a bot that never answers; the baseline with
    ``--no-playback``) and echoing, in alternating order, and CPU per session side by side."""
    result = run_benchmark("loadtest.py", "--shape", "both", "--sessions", "3", "--duration", "4")
    runs = [(r["target"], r["shape"]) for r in result["results"]]
    assert runs == [("talkgate", "echo"), ("baseline", "echo"), ("baseline", "listen"), ("talkgate", "listen")]
    for r in result["results"]:
        assert r["established"] == 3, (r["target"], r["shape"], r["errors"])
        assert r["segments"] >= 1 and r["frames_received"] > 0  # the bot got speech in both shapes
        assert r["loss_percent"] is not None and r["cpu_percent_per_session"] > 0
        if r["shape"] == "listen":
            # Sessions established with nothing coming back (talkgate's offer of the bot's
            # voice declined, the baseline without its reply track); no echo to time.
            assert r["client_rtp_packets"] == 0, r["target"]
            assert r["bot_audio_to_client"] is None and r["echoes_timed"] is None
        else:
            assert r["client_rtp_packets"] > 0 and r["bot_audio_to_client"] is not None
    rows = result["per_session"]
    assert [(row["sessions"], row["shape"]) for row in rows] == [(3, "echo"), (3, "listen")]
    assert all(row["talkgate"] > 0 and row["baseline"] > 0 and row["talkgate_to_baseline"] > 0 for row in rows)


def test_loadtest_plan_alternates_which_target_goes_first() -> None:
    """Within each shape, talkgate and the baseline take turns going first across sessions counts."""
    assert loadtest.plan([50, 100], ["echo", "listen"], ["talkgate", "baseline"]) == [
        (50, "echo", "talkgate"),
        (50, "echo", "baseline"),
        (50, "listen", "baseline"),
        (50, "listen", "talkgate"),
        (100, "listen", "talkgate"),
        (100, "listen", "baseline"),
        (100, "echo", "baseline"),
        (100, "echo", "talkgate"),
    ]
    assert loadtest.plan([50], ["echo"], ["talkgate"]) == [(50, "echo", "talkgate")]


async def test_the_pacer_sends_each_stream_on_its_own_20_ms_grid_never_early() -> None:
    """loadtest's customers are paced by one task: every stream's packets in order, from
    its own offset in the recording, stamped 20 ms apart, none sent before it is due."""
    recording = loadtest.Recording([bytes([i]) for i in range(5)], [], 100, [False] * 5, [False] * 5)
    sent: dict[str, list[tuple[float, bytes, int | None]]] = {"a": [], "b": []}
    pacer = loadtest.Pacer()
    task = asyncio.create_task(pacer.run())
    try:
        speeches = {}
        for name, offset in (("a", 0), ("b", 3)):

            def send(packet: av.Packet[Any], log: list[tuple[float, bytes, int | None]] = sent[name]) -> None:
                log.append((time.perf_counter(), bytes(packet), packet.pts))

            speech = speeches[name] = loadtest.Speech(recording, offset, send)
            pacer.add(speech)
            await asyncio.sleep(0.007)  # the streams' grids apart
        await asyncio.sleep(0.15)
        speeches["a"].stopped = True
        stopped_at = len(sent["a"])
        await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(sent["a"]) == stopped_at  # a stopped stream sends no more
    for name, offset in (("a", 0), ("b", 3)):
        t0 = speeches[name].t0
        assert t0 is not None and len(sent[name]) >= 4, sent[name]
        for i, (at, payload, pts) in enumerate(sent[name]):
            assert payload == bytes([(offset + i) % 5]) and pts == 960 * i
            assert at >= t0 + i * 0.020  # never ahead of real time


def test_capacity_steps_both_targets_and_reports_a_ratio() -> None:
    result = run_benchmark("capacity.py", "--steps", "2", "--duration", "3", "--refine", "0")
    talkgate, baseline = result["results"]
    assert [r["sessions"] for r in talkgate["runs"]] == [2] == [r["sessions"] for r in baseline["runs"]]
    assert all(isinstance(r["holds"], bool) for r in talkgate["runs"] + baseline["runs"])
    assert talkgate["capacity"] in (0, 2) and baseline["capacity"] in (0, 2)
    assert {r["shape"] for r in talkgate["runs"] + baseline["runs"]} == {"echo"}  # the default


def test_capacity_listen_shape_and_plot_after_the_search_and_from_saved_json(tmp_path: Path) -> None:
    """``--shape listen`` reaches every step; ``--plot`` draws after the search, and
    ``--from-json`` redraws from the saved output (and prints its table) without running.

    3 sessions for 4 s: their (fixed) offsets put two utterance ends well inside the
    window, so the bot's frames are counted even when setup is slow (2 sessions for 3 s
    had one end on the window's edge)."""
    drawn = tmp_path / "search.png"
    result = run_benchmark(
        "capacity.py", *("--shape", "listen", "--steps", "3", "--duration", "4", "--refine", "0", "--plot", str(drawn))
    )
    assert [(r["target"], r["shape"]) for r in result["results"]] == [("talkgate", "listen"), ("baseline", "listen")]
    for target in result["results"]:
        (run,) = target["runs"]
        assert run["shape"] == "listen" and run["established"] == 3, run["errors"]
        assert run["frames_received"] > 0 and run["client_rtp_packets"] == 0
    saved = tmp_path / "listen.json"
    saved.write_text(json.dumps(result))
    redrawn = tmp_path / "redrawn.png"
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "capacity.py"), "--from-json", str(saved), "--plot", str(redrawn)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    found = {" ".join(line.split()[:3]) for line in out.splitlines() if line.startswith("capacity ")}
    assert found == {"capacity talkgate (listen):", "capacity baseline (listen):"}
    for png in (drawn, redrawn):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == (1200, 500)


def test_api_benchmark_runs_and_reports_every_figure() -> None:
    result = run_benchmark("api.py", "--requests", "20", "--messages", "10")
    for name in ("tokens", "messages", "events_page_of_100"):
        assert result[name]["p99_ms"] >= result[name]["p50_ms"] > 0, name
    assert result["tokens"]["requests"] == 20 and result["messages"]["requests"] == 10


@pytest.mark.parametrize("database", ["", "postgresql"])
def test_webhooks_benchmark_runs_and_every_delivery_verifies(database: str) -> None:
    result = run_benchmark("webhooks.py", "--messages", "40", "--conversations", "4", "--database", database)
    assert result["database"] == (database or "sqlite")
    assert result["bad_signatures"] == 0
    assert result["deliveries"] >= result["chats"] == 40  # each chat's message.created, and the openings
    assert result["echo_to_webhook"]["p95_ms"] >= result["echo_to_webhook"]["median_ms"] > 0
    assert result["deliveries_per_s_until_drained"] > 0


def test_cluster_benchmark_runs_and_reports_every_figure() -> None:
    result = run_benchmark(
        "cluster.py", *("--rounds", "1", "--joins", "10", "--conversations", "3", "--rate", "30", "--seconds", "1")
    )
    assert set(result["joins"]) == {"single", "redis"}
    assert all(row["joins_per_s"] > 0 for row in result["joins"].values())
    assert set(result["chat"]) == {"single", "same", "cross"}
    for shape, row in result["chat"].items():
        assert row["messages"] == 3 * 10, shape  # every chat reached its agent
        assert row["p99_ms"] >= row["median_ms"] > 0


def test_cluster_capacity_runs_one_and_two_workers() -> None:
    result = run_benchmark("cluster.py", "--capacity", "--steps", "4", "--duration", "2", "--refine", "0")
    one, two = result["results"]
    assert (one["target"], two["target"]) == ("talkgate-w1", "talkgate-w2")
    for target in (one, two):
        (run,) = target["runs"]
        assert run["established"] == 4, run["errors"]
        assert run["segments"] >= 1 and run["frames_received"] > 0
    (run,) = two["runs"]
    # Each worker measured on its own (its node port's /metrics, its own CPU), both serving.
    assert [w["node"] for w in run["workers"]] == ["bench-w1", "bench-w2"]
    assert sum(w["peer_connections"] for w in run["workers"]) == 4
    assert all(w["loop_lag"] is not None and w["cpu_percent"] > 0 for w in run["workers"])


def test_loadtest_runs_talkgate_as_a_cluster_node() -> None:
    # A 5 s window: with 2 sessions (their offsets are fixed) the only utterance that ended
    # in a 3 s window did so ~50 ms after the window opened, and a slow setup left it out.
    result = run_benchmark("loadtest.py", "--sessions", "2", "--duration", "5", "--target", "talkgate-redis")
    (node,) = result["results"]
    assert node["target"] == "talkgate-redis"
    assert node["established"] == 2, node["errors"]
    assert node["segments"] >= 1 and node["frames_received"] > 0  # speech reached the bot through the node
