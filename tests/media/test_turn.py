"""End of turn (``--turn-detection smart``): the features, the model on real speech, the
segmenter's questions and answers, and the worker that runs the model off the loop.

About the speech: Smart Turn hears melody as much as words, and espeak-ng says every
fragment with a sentence's falling end, so a bare fragment ("I would like to") is often
heard as complete (5 of 12 fragments right, measured). A fragment that ends in a
hesitation ("I would like to er,") is heard as unfinished (10 of 12), as a person's would
be. The fixtures below are ones the model decides with a wide margin (p ≤ 0.05 or ≥ 0.9
on this speech); the rates over all fixtures are benchmarks/vad_accuracy.py's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from typing import Any

import numpy as np
import pytest

from media import models
from media.pipeline import VoicePipeline
from media.turn import WINDOW_SAMPLES, SmartTurn, TurnWorker, last_window, log_mel
from media.vad import Event, Segmenter, SpeechPaused, SpeechStopped, TurnCheck, VadSettings
from tests.conftest import until
from tests.segmenting import frames_of, segments
from tests.speech import RATE, Fixture, speak, to_48k_stereo_frames, utterances, white, with_background

SMART = VadSettings(turn_detection="smart")
COMPLETE = ["I would like to book an appointment for tomorrow.", "Thank you very much.", "My name is Anna Smith."]
#: A hesitation, 700 ms of silence, the rest of the sentence.
MID_SENTENCE = [
    ("I would like to er,", "book an appointment for tomorrow."),
    ("I would like to um,", "book an appointment."),
]
PAUSE_MS = 700


@pytest.fixture(scope="module")
def model() -> SmartTurn:
    return SmartTurn()


def paused(first: str, rest: str) -> tuple[Fixture, tuple[float, float]]:
    """The sentence with a PAUSE_MS pause after ``first``; and where the pause starts and ends (ms)."""
    a, b = speak(first), speak(rest)
    silence = np.zeros(PAUSE_MS * RATE // 1000, np.int16)
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), a, silence, b, np.zeros(3 * RATE, np.int16)])
    onset = 500.0
    end = onset + (len(a) + len(silence) + len(b)) * 1000 / RATE
    return Fixture(pcm, [(onset, end)]), (onset + len(a) * 1000 / RATE, end - len(b) * 1000 / RATE)


# -- features -------------------------------------------------------------------------------


def test_log_mel_matches_pipecats_reference_implementation() -> None:
    """Our numpy Whisper features against the ones Pipecat ships with the model (loaded from
    its file, not imported through pipecat)."""
    path = models.model_path("audio/turn/smart_turn/_whisper_features.py")
    spec = importlib.util.spec_from_file_location("pipecat_whisper_features", path)
    assert spec is not None and spec.loader is not None
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    for audio in (
        last_window(speak(COMPLETE[0]).tobytes()),
        0.1 * np.random.default_rng(1).standard_normal(WINDOW_SAMPLES),
    ):
        ours = log_mel(audio)
        assert ours.shape == (80, 800) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, reference.compute_whisper_log_mel_features(audio), atol=1e-5)


def test_the_model_hears_the_last_eight_seconds_padded_in_front() -> None:
    with pytest.raises(ValueError, match="exactly"):
        log_mel(np.zeros(1000))
    short = last_window(np.full(RATE, 16384, np.int16).tobytes())
    assert short.shape == (WINDOW_SAMPLES,) and not short[:-RATE].any() and (short[-RATE:] == 0.5).all()
    long = np.concatenate([np.full(RATE, 1000, np.int16), np.full(WINDOW_SAMPLES, -16384, np.int16)])
    assert (last_window(long.tobytes()) == -0.5).all()


# -- the model in the segmenter, on real speech -----------------------------------------------


@pytest.mark.parametrize("noise", [None, 10], ids=["clean", "white-10dB"])
def test_a_complete_sentence_ends_at_the_first_pause_not_after_the_hangover(
    model: SmartTurn, noise: int | None
) -> None:
    for text in COMPLETE:
        fixture = utterances([text], lead_s=0.5, tail_s=2.5)
        if noise is not None:
            fixture = with_background(fixture, white(len(fixture.pcm), 11), noise)
        [segment] = segments(frames_of(fixture.pcm), SMART, turn=model.probability)
        assert segment.stop is not None and segment.stop.turn, (text, segment.decisions)
        end = fixture.truth[0][1]
        # The pause (200 ms) after the frame the voice ended in; the model's own time comes
        # on top (≈ 50-70 ms of CPU, measured by the benchmark).
        assert segment.reported_at - end <= SMART.pause_ms + 40, (text, segment.reported_at, end)
        assert segment.stop.t - end <= 30


@pytest.mark.parametrize(("first", "rest"), MID_SENTENCE)
def test_a_pause_in_mid_sentence_does_not_end_the_turn(model: SmartTurn, first: str, rest: str) -> None:
    fixture, (stopped, resumed) = paused(first, rest)
    frames = frames_of(fixture.pcm)
    [segment] = segments(frames, SMART, turn=model.probability)
    # (Shorter gaps between words may be asked about early too: they end before pause_ms.)
    in_the_pause = [p for t, p in segment.decisions if stopped - 40 <= t < resumed]
    assert in_the_pause and max(in_the_pause) < SMART.turn_threshold, segment.decisions
    end = fixture.truth[0][1]
    assert segment.stop is not None and segment.stop.turn and 0 <= segment.stop.t - end <= 30
    # The hangover alone cuts it in two (700 ms > 500 ms): the fixture does pause.
    assert len(segments(frames, VadSettings())) == 2


# -- the segmenter's questions and answers ---------------------------------------------------


def run(answer: Any, pcm: np.ndarray, settings: VadSettings = SMART) -> tuple[list[tuple[int, Event]], list[TurnCheck]]:
    """Feed ``pcm``; each question is answered by ``answer(check, frame_t)`` → (when to answer
    in stream ms, the answer) or None to leave it unanswered."""
    segmenter = Segmenter(settings)
    events: list[tuple[int, Event]] = []
    checks: list[TurnCheck] = []
    due: list[tuple[int, TurnCheck, bool | None]] = []
    for frame in frames_of(pcm):
        events += [(frame.t, e) for e in segmenter.feed(frame)]
        if (check := segmenter.take_turn_check()) is not None:
            checks.append(check)
            decided = answer(check, frame.t)
            if decided is not None:
                due.append((decided[0], check, decided[1]))
        for item in [d for d in due if d[0] <= frame.t]:
            due.remove(item)
            events += [(frame.t, e) for e in segmenter.turn_decided(item[1], item[2])]
    return events, checks


def stops(events: list[tuple[int, Event]]) -> list[tuple[int, SpeechStopped]]:
    return [(t, e) for t, e in events if isinstance(e, SpeechStopped)]


SPEECH = utterances([COMPLETE[0]], lead_s=0.5, tail_s=3.0)
END = SPEECH.truth[0][1]


def test_incomplete_waits_for_the_longer_silence() -> None:
    events, checks = run(lambda check, t: (t, False), SPEECH.pcm)
    [(_, stop)] = stops(events)
    assert not stop.turn and checks
    assert checks[-1].pcm and checks[-1].t == stop.t
    [(reported, _)] = [(t, e) for t, e in events if e is stop]
    assert reported + 20 - stop.t == SMART.turn_max_silence_ms


def test_no_answer_falls_back_to_the_hangover() -> None:
    """Overloaded or failed: the pause ends as with --turn-detection silence, at once if that
    time has passed already."""
    for delay in (0, 800):
        events, _ = run(lambda check, t, delay=delay: (t + delay, None), SPEECH.pcm)
        [(reported, stop)] = stops(events)
        assert not stop.turn
        asked = SMART.pause_ms - SMART.turn_early_ms
        assert reported + 20 - stop.t == max(SMART.stop_ms, asked + delay), delay


def test_an_answer_after_the_speaker_went_on_changes_nothing() -> None:
    fixture, (stopped, _) = paused(*MID_SENTENCE[0])
    answered: list[TurnCheck] = []

    def late(check: TurnCheck, t: int) -> tuple[int, bool]:
        answered.append(check)
        return t + 1000, True  # after the 700 ms pause: the speaker is talking again

    events, checks = run(late, fixture.pcm)
    [first] = [c for c in checks if c.t >= stopped - 40 and c.t < stopped + PAUSE_MS]
    assert first.withdrawn  # a worker would skip it
    [(_, stop)] = stops(events)  # not cut in the pause
    assert stop.t > fixture.truth[0][1] - 100


def test_a_question_is_raised_once_per_pause_early_with_a_pause_long_audio() -> None:
    events, checks = run(lambda check, t: None, SPEECH.pcm)
    paused_at = [(t, e.t) for t, e in events if isinstance(e, SpeechPaused)]
    asked = {c.t: c for c in checks}
    assert len(asked) == len(checks)  # once per pause
    for frame_t, t in paused_at:  # every pause of pause_ms was asked about, turn_early_ms before
        assert asked[t].asked == frame_t + 20 - SMART.turn_early_ms
    last = checks[-1]
    # The preroll, the speech, 120 ms of the pause and its last 80 ms again: 20 ms frames
    # of 16 kHz PCM16, a 200 ms pause as the model would hear it 80 ms later.
    assert len(last.pcm) % 640 == 0 and abs(len(last.pcm) / 32 - (END - 500 + 200 + 200)) <= 60
    assert last.pcm[-2560:] == last.pcm[-5120:-2560]
    [(_, stop)] = stops(events)
    assert not stop.turn  # never answered: the longer silence ended it


def test_an_early_complete_answer_waits_for_a_pause_of_pause_ms() -> None:
    events, _ = run(lambda check, t: (t, True), SPEECH.pcm)
    [(reported, stop)] = stops(events)
    assert stop.turn and reported + 20 - stop.t == SMART.pause_ms


def test_bad_turn_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="turn_detection"):
        VadSettings(turn_detection="model")
    with pytest.raises(ValueError, match="pause_ms"):
        VadSettings(turn_detection="smart", pause_ms=0)
    with pytest.raises(ValueError, match="pause_ms"):
        VadSettings(turn_detection="smart", turn_max_silence_ms=200)
    with pytest.raises(ValueError, match="TurnWorker"):
        VoicePipeline(SMART)


# -- the worker and the pipeline ----------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


async def test_the_worker_answers_on_the_loop_and_sheds_what_it_cannot_take(model: SmartTurn) -> None:
    observed: list[float] = []

    class Timer:
        def observe(self, seconds: float) -> None:
            observed.append(seconds)

    overloaded = Counter()
    worker = TurnWorker(model, max_waiting=1, timer=Timer(), overloaded=overloaded)
    answers: list[tuple[TurnCheck, bool | None]] = []
    loop = asyncio.get_running_loop()
    thread = threading.get_ident()

    def answer(check: TurnCheck, complete: bool | None) -> None:
        assert threading.get_ident() == thread and loop.is_running()
        answers.append((check, complete))

    pcm = np.concatenate([np.zeros(RATE // 5, np.int16), speak(COMPLETE[0]), np.zeros(RATE // 5, np.int16)]).tobytes()
    checks = [TurnCheck(pcm, 0, 0) for _ in range(3)]
    for check in checks:
        worker.ask(check, answer)
    await until(lambda: len(answers) == 3)
    assert worker.dropped == 2 and overloaded.value == 2
    by_check = {id(c): a for c, a in answers}
    assert by_check[id(checks[0])] is True and checks[0].probability is not None and checks[0].probability > 0.9
    assert by_check[id(checks[1])] is None and by_check[id(checks[2])] is None
    assert len(observed) == 1 and 0 < observed[0] < 1
    withdrawn = TurnCheck(pcm, 0, 0, withdrawn=True)
    worker.ask(withdrawn, answer)
    await until(lambda: len(answers) == 4)
    assert answers[-1] == (withdrawn, None) and len(observed) == 1  # skipped, not run
    worker.close()
    worker.ask(TurnCheck(pcm, 0, 0), answer)
    await until(lambda: len(answers) == 5)
    assert answers[-1][1] is None


async def test_a_failing_model_is_no_answer() -> None:
    failures = Counter()
    worker = TurnWorker(SmartTurn(session=object()), failures=failures)  # its run() is missing
    answers: list[bool | None] = []
    worker.ask(TurnCheck(bytes(640), 0, 0), lambda check, complete: answers.append(complete))
    await until(lambda: answers)
    assert answers == [None] and failures.value == 1
    worker.close()


async def test_the_pipeline_ends_a_complete_turn_when_the_worker_answers(model: SmartTurn) -> None:
    """48 kHz frames as a call delivers them, in real time order: the frames go on while the
    worker decides; its answer ends the segment from the event loop."""
    worker = TurnWorker(model)
    pipeline = VoicePipeline(SMART, turns=worker)
    seen: list[Event] = []
    pipeline.listeners.append(seen.append)
    fixture = utterances([COMPLETE[0]], lead_s=0.5, tail_s=1.5)
    for frame in to_48k_stereo_frames(fixture.pcm):
        pipeline.push(frame)
        if worker.waiting:
            await asyncio.sleep(0.02)  # a frame's worth of time passes while the model runs
    await until(lambda: not worker.waiting)
    [stop] = [e for e in seen if isinstance(e, SpeechStopped)]
    assert stop.turn and abs(stop.t - fixture.truth[0][1]) <= 40
    pipeline.close()
    worker.close()
