"""How well the gateway hears: webrtcvad against Silero, the hangover against Smart Turn.

VAD, per detector and condition (espeak-ng utterances 1.5 s apart, ``tests/speech.py``;
clean, white noise at 10 and 5 dB SNR, hiss (pink noise) at 10 and 5 dB, music at 10 dB),
through the ``Segmenter`` with default settings:

- utterances found / expected; false segments (over no utterance); merged (a segment over
  two utterances: an end was not heard); never ended (still open when the audio ran out);
- median start error (segment start - true onset) and end error (where the segment says
  the voice stopped - true end), and the stop's delay beyond the hangover;
- CPU µs per 20 ms frame (the detector alone, this thread's CPU time).

``webrtc+hangover`` is webrtcvad as the gateway used it before (with the library's own
hangover, which delayed every end by 60 to 100 ms); ``silero/512`` runs Silero on
consecutive 512-sample windows, as it was trained, instead of once per frame.

Where the end-of-speech tail goes (clean speech): the end error on the frames as spoken,
and after the client's Opus encoder (aiortc's, as the benchmarks' customers use it) and the
gateway's decoder, as the pipeline gets them in a call.

End of turn, ``--turn-detection silence`` against ``smart`` (webrtcvad, clean and at 10 dB):

- complete sentences: end of speech → ``SpeechStopped`` (the frame that reported it, or
  for smart, if later, when the question that ended it was asked plus the model's CPU time
  on it), how many the model ended (the rest waited ``turn_max_silence_ms``), and how many
  were split in two (a pause inside them judged complete);
- mid-sentence pauses (the first part ending in a hesitation, "er" or "um", 700 ms of
  silence, the rest): how many were cut in two (at the pause, or elsewhere), and how many
  the model ended after the rest;
- CPU ms per decision (features + model, one thread).

    python benchmarks/vad_accuracy.py            # every condition, 6 utterances, 12 + 8 turn fixtures
    python benchmarks/vad_accuracy.py --quick --json
"""

from __future__ import annotations

import argparse
import fractions
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc.codecs.opus import OpusEncoder

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository's tests/ helpers

from benchmarks.signaling import pct
from media import opus
from media.convert import FrameConverter, PcmFrame
from media.silero import SileroModel, SileroVad
from media.turn import SmartTurn
from media.vad import VadSettings, VoiceDetector, WebRtcVad
from tests.segmenting import Segment, frames_of, segments
from tests.speech import RATE, Fixture, hiss, music, speak, utterances, white, with_background

TEXTS = [
    "I would like to book an appointment",
    "Tomorrow morning would be great",
    "Thank you very much",
    "Could you send me a confirmation by text message",
    "My name is Anna Smith",
    "Is there anything available on Tuesday afternoon",
]
#: name → (background, SNR dB); None: clean.
CONDITIONS: dict[str, tuple[Callable[[int, int], np.ndarray], float] | None] = {
    "clean": None,
    "white 10 dB": (white, 10),
    "white 5 dB": (white, 5),
    "hiss 10 dB": (hiss, 10),
    "hiss 5 dB": (hiss, 5),
    "music 10 dB": (music, 10),
}
#: Complete sentences, and mid-sentence pauses: (first part with a hesitation, the rest).
COMPLETE = [
    "I would like to book an appointment for tomorrow.",
    "Thank you very much.",
    "My name is Anna Smith.",
    "Please send me a confirmation by text message.",
    "Tuesday afternoon would work best for me.",
    "I am calling about my bill.",
    "The order never arrived.",
    "I want to change my address.",
    "That is everything, thank you.",
    "No, that's all.",
    "I need to cancel my appointment.",
    "Yes, please.",
]
MID_SENTENCE = [
    ("I would like to er,", "book an appointment for tomorrow."),
    ("I am calling about er,", "my bill."),
    ("I need to cancel my er,", "appointment."),
    ("I want to change er,", "my address."),
    ("So I was wondering if er,", "you are open on Sunday."),
    ("Tuesday afternoon would er,", "work best for me."),
    ("Can you tell me when the er,", "shop opens."),
    ("Please send me a er,", "text message."),
    ("I would like to um,", "book an appointment for tomorrow."),
    ("I am calling about um,", "my bill."),
    ("My name is um,", "Anna Smith."),
    ("The order never um,", "arrived."),
]
MID_PAUSE_MS = 700


def ms(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def score(found: list[Segment], fixture: Fixture, stop_ms: int) -> dict[str, Any]:
    hits = [[s for s in found if s.stop and s.start < end and s.stop.t > onset] for onset, end in fixture.truth]
    false = [s for s in found if not any(s in h for h in hits)]
    merged = [s for s in found if sum(s in h for h in hits) > 1]
    starts = [h[0].start - onset for h, (onset, _) in zip(hits, fixture.truth, strict=True) if h]
    ended = [(h[-1], end) for h, (_, end) in zip(hits, fixture.truth, strict=True) if h and not h[-1].unended]
    ends = [s.stop.t - end for s, end in ended if s.stop]
    delays = [s.reported_at - end - stop_ms for s, end in ended]
    return {
        "found": sum(bool(h) for h in hits),
        "expected": len(fixture.truth),
        "false": len(false),
        "merged": len(merged),
        "never_ended": sum(s.unended for s in found),
        "start_error_ms": ms(starts),
        "end_error_ms": ms(ends),
        "stop_beyond_hangover_ms": ms(delays),
    }


def cpu_us_per_frame(detector: VoiceDetector, fixture: Fixture) -> float:
    frames = [f.pcm for f in frames_of(fixture.pcm)]
    started = time.thread_time()
    for pcm in frames:
        detector.is_speech(pcm, RATE)
    return round((time.thread_time() - started) / len(frames) * 1e6, 1)


def vad(texts: list[str], conditions: list[str], silero: SileroModel) -> dict[str, Any]:
    clean = utterances(texts)
    detectors: dict[str, Callable[[], VoiceDetector]] = {
        "webrtc": WebRtcVad,
        "webrtc+hangover": lambda: WebRtcVad(hangover=True),
        "silero": lambda: SileroVad(silero),
        "silero/512": lambda: SileroVad(silero, every_frame=False),
    }
    results: dict[str, Any] = {}
    for name in conditions:
        spec = CONDITIONS[name]
        fixture = clean if spec is None else with_background(clean, spec[0](len(clean.pcm), 7), spec[1])
        frames = frames_of(fixture.pcm)
        row = {}
        for detector, make in detectors.items():
            settings = VadSettings(detector=detector.partition("/")[0].partition("+")[0])
            found = segments(frames, settings, detector=make())
            row[detector] = {
                **score(found, fixture, settings.stop_ms),
                "cpu_us_per_frame": cpu_us_per_frame(make(), fixture),
            }
        results[name] = row
    return results


def through_opus(pcm: np.ndarray) -> list[PcmFrame]:
    """What the pipeline gets in a call: 20 ms frames encoded by aiortc's Opus encoder (a
    customer) and decoded by the gateway (``media.opus`` straight to 16 kHz)."""
    encoder, decoder, converter = OpusEncoder(), opus.Decoder(RATE), FrameConverter()
    frames: list[PcmFrame] = []
    for k, i in enumerate(range(0, len(pcm) - 319, 320)):
        frame = av.AudioFrame.from_ndarray(pcm[i : i + 320].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, i, fractions.Fraction(1, RATE)
        payloads, _ = encoder.encode(frame)
        for payload in payloads:
            frames += converter.feed_pcm(decoder.decode(payload), k * 320)
    return frames


def tail(texts: list[str], silero: SileroModel) -> dict[str, Any]:
    fixture = utterances(texts)
    paths = {"as spoken": frames_of(fixture.pcm), "through Opus": through_opus(fixture.pcm)}
    detectors: dict[str, Callable[[], VoiceDetector]] = {
        "webrtc": WebRtcVad,
        "webrtc+hangover": lambda: WebRtcVad(hangover=True),
        "silero": lambda: SileroVad(silero),
    }
    return {
        path: {
            name: score(
                segments(frames, VadSettings(detector=name.partition("+")[0]), detector=make()),
                fixture,
                VadSettings().stop_ms,
            )["end_error_ms"]
            for name, make in detectors.items()
        }
        for path, frames in paths.items()
    }


def sentence(text: str, *, tail_s: float = 3.0) -> Fixture:
    return utterances([text], lead_s=1.0, tail_s=tail_s)


def paused(first: str, rest: str) -> tuple[Fixture, tuple[float, float]]:
    """One utterance with a MID_PAUSE_MS pause inside; also the pause (start, end) in ms."""
    a, b = speak(first), speak(rest)
    lead = np.zeros(RATE, np.int16)
    pcm = np.concatenate([lead, a, np.zeros(MID_PAUSE_MS * RATE // 1000, np.int16), b, np.zeros(3 * RATE, np.int16)])
    onset = len(lead) * 1000 / RATE
    pause = (onset + len(a) * 1000 / RATE, onset + (len(a) + MID_PAUSE_MS * RATE // 1000) * 1000 / RATE)
    return Fixture(pcm, [(onset, onset + (len(pcm) - len(lead) - 3 * RATE) * 1000 / RATE)]), pause


def turns(
    complete: list[str], mid: list[tuple[str, str]], model: SmartTurn, snrs: list[float | None]
) -> dict[str, Any]:
    modes = {"silence": VadSettings(), "smart": VadSettings(turn_detection="smart")}
    decisions: list[float] = []

    def timed(pcm: bytes) -> float:
        started = time.thread_time()
        probability = model.probability(pcm)
        decisions.append(time.thread_time() - started)
        return probability

    results: dict[str, Any] = {}
    for snr in snrs:

        def noisy(fixture: Fixture, snr: float | None = snr) -> Fixture:
            return fixture if snr is None else with_background(fixture, white(len(fixture.pcm), 11), snr)

        label = "clean" if snr is None else f"white {snr:g} dB"
        row: dict[str, Any] = {}
        for mode, settings in modes.items():
            delays, by_model, split, missed = [], 0, 0, 0
            for text in complete:
                fixture = noisy(sentence(text))
                found = [s for s in segments(frames_of(fixture.pcm), settings, turn=timed) if s.stop]
                end = fixture.truth[0][1]
                if not found:
                    missed += 1
                    continue
                last = found[-1]
                delays.append(last.decided_at() - end)
                by_model += bool(last.stop and last.stop.turn)
                split += len(found) > 1
            cut, at_pause, mid_by_model = 0, 0, 0
            for first, rest in mid:
                fixture, (pause_start, pause_end) = paused(first, rest)
                fixture = noisy(fixture)
                found = [s for s in segments(frames_of(fixture.pcm), settings, turn=timed) if s.stop]
                cut += len(found) > 1
                at_pause += any(s.stop and pause_start - 100 <= s.stop.t <= pause_end for s in found)
                mid_by_model += bool(found and found[-1].stop and found[-1].stop.turn)
            row[mode] = {
                "complete_sentences": len(complete),
                "missed": missed,
                "end_to_stopped_median_ms": ms(delays),
                "end_to_stopped_p95_ms": round(pct(delays, 0.95), 1) if delays else None,
                "ended_by_model": by_model,
                "split": split,
                "mid_sentence_pauses": len(mid),
                "cut": cut,
                "cut_at_the_pause": at_pause,
                "mid_sentence_ended_by_model": mid_by_model,
            }
        results[label] = row
    return {
        "by_condition": results,
        "decisions": len(decisions),
        "cpu_ms_per_decision_median": round(statistics.median(decisions) * 1000, 1),
        "cpu_ms_per_decision_p95": round(pct(decisions, 0.95) * 1000, 1),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    silero, model = SileroModel(), SmartTurn()
    snrs: list[float | None]
    if args.quick:
        texts, conditions = TEXTS[:2], ["clean", "white 5 dB"]
        complete, mid, snrs = COMPLETE[:2], MID_SENTENCE[:1], [None]
    else:
        texts, conditions = TEXTS, list(CONDITIONS)
        complete, mid, snrs = COMPLETE, MID_SENTENCE, [None, 10.0]
    return {
        "benchmark": "vad_accuracy",
        "quick": args.quick,
        "vad": vad(texts, conditions, silero),
        "tail": tail(texts, silero),
        "turn": turns(complete, mid, model, snrs),
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        "VAD: found/expected, false, merged, never ended; median start / end error, stop beyond hangover (ms);"
        " CPU µs/frame"
    ]
    for condition, row in result["vad"].items():
        for detector, r in row.items():
            lines.append(
                f"  {condition:12s} {detector:16s} {r['found']}/{r['expected']} false {r['false']} merged {r['merged']}"
                f" never ended {r['never_ended']}"
                f"  start {r['start_error_ms']} end {r['end_error_ms']} beyond {r['stop_beyond_hangover_ms']}"
                f"  {r['cpu_us_per_frame']} µs"
            )
    lines.append("Where the tail goes: median end error (ms), clean speech")
    for path, row in result["tail"].items():
        lines.append(f"  {path:12s} " + "  ".join(f"{name} {error}" for name, error in row.items()))
    turn = result["turn"]
    lines.append(
        "End of turn. Complete sentences: end of speech → speech.stopped median / p95 ms, ended by the model,"
        " split in two. Mid-sentence pauses: cut (at the pause), ended by the model after the rest"
    )
    for condition, row in turn["by_condition"].items():
        for mode, r in row.items():
            lines.append(
                f"  {condition:12s} {mode:8s} {r['end_to_stopped_median_ms']} / {r['end_to_stopped_p95_ms']} ms"
                f"  by model {r['ended_by_model']}/{r['complete_sentences']} split {r['split']} missed {r['missed']}"
                f" | cut {r['cut']}/{r['mid_sentence_pauses']} ({r['cut_at_the_pause']})"
                f" by model {r['mid_sentence_ended_by_model']}"
            )
    lines.append(
        f"  CPU per decision: median {turn['cpu_ms_per_decision_median']} ms,"
        f" p95 {turn['cpu_ms_per_decision_p95']} ms ({turn['decisions']} decisions)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two utterances, two conditions, three turn fixtures")
    parser.add_argument("--json", action="store_true", help="only the JSON line")
    arguments = parser.parse_args()
    outcome = main(arguments)
    if not arguments.json:
        print(report(outcome))
    print(json.dumps(outcome))
