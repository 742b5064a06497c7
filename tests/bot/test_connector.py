"""The connector: a bounded outbox, bounded marks, attach/detach, owned tasks."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from aiortc.mediastreams import AudioStreamTrack

from gateway.bot import native
from gateway.bot.connector import MAX_MARK_NAME_CHARS, Barge, BotConnector, BotSettings, BotState
from gateway.bot.native import BotProtocol, NativeProtocol
from gateway.bot.twilio import TwilioProtocol
from gateway.messages import Participant
from media.pipeline import VoicePipeline
from media.relay import Relay, Subscriber
from media.vad import SpeechFrame, SpeechStarted

#: Nothing listens there: the connector keeps "connecting".
NOWHERE = "ws://127.0.0.1:9/"


class Host:
    """Records what the connector reports; the gateway's side of the interface."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.finished: list[str] = []
        self.connecting_fails = False

    def bot_problem(self, kind: str) -> None:
        self.problems.append(kind)

    async def bot_connecting(self, conversation: str) -> None:
        if self.connecting_fails:
            raise RuntimeError("the broker has a bug")

    async def bot_finished(self, conversation: str, connector: BotConnector, reason: str) -> None:
        self.finished.append(reason)


def make(protocol_class: type[BotProtocol], host: Host, **settings: int) -> BotConnector:
    customer = Participant("u1", "customer", "Ann")
    return BotConnector(
        conversation="r1",
        customer=customer,
        settings=BotSettings(url=NOWHERE, connect_seconds=30.0, **settings),  # type: ignore[arg-type]
        host=host,  # type: ignore[arg-type]
        protocol=protocol_class("r1", customer, 16_000, 20),  # type: ignore[call-arg]
    )


def outbox_text(connector: BotConnector) -> list[str]:
    return [str(item) for item, _, _, _ in connector._outbox]


@pytest.mark.parametrize("protocol_class", [NativeProtocol, TwilioProtocol])
async def test_a_full_outbox_drops_the_oldest_audio_and_keeps_control_messages(protocol_class: type) -> None:
    customer = Participant("u1", "customer", "Ann")
    host = Host()
    connector = BotConnector(
        conversation="r1",
        customer=customer,
        settings=BotSettings(url="ws://127.0.0.1:9/", outbox_limit=5),
        host=host,  # type: ignore[arg-type]
        protocol=protocol_class("r1", customer, 16_000, 20),
    )
    connector._send(connector.protocol.mark("keep-me"))
    connector.protocol.call_started()  # a Twilio stream sends audio only during a call
    for i in range(10):
        if protocol_class is TwilioProtocol:
            connector._send(connector.protocol.audio(bytes(320), i * 20), audio=True)
        else:
            connector._on_speech(SpeechFrame(bytes(640), i * 20))
    queued = list(connector._outbox)
    assert len(queued) == 5
    first, is_audio, _, _ = queued[0]
    assert not is_audio and "keep-me" in str(first)  # the control message survived
    assert all(is_audio for _, is_audio, _, _ in queued[1:])
    assert connector.dropped_frames == 6 and host.problems == ["dropped_frame"] * 6
    connector.playback.stop()


@pytest.mark.parametrize("protocol_class", [NativeProtocol, TwilioProtocol])
async def test_attach_is_idempotent_and_detach_removes_the_listener_and_the_tap(protocol_class: type) -> None:
    """Bug: every bot (re)start added a listener and a tap to the customer's voice
    pipeline and nothing removed them: they piled up for the whole call."""
    connector = make(protocol_class, Host())
    pipeline = VoicePipeline()
    taps: list[Subscriber] = []
    for _ in range(3):
        connector.attach(pipeline, taps)
    assert pipeline.listeners == [connector._on_speech]
    wants_tap = protocol_class is TwilioProtocol
    assert len(taps) == (1 if wants_tap else 0)
    relay = Relay(AudioStreamTrack())
    for tap in taps:
        relay.subscribe(tap)  # what the router does
    connector.detach()
    connector.detach()  # idempotent
    assert pipeline.listeners == [] and taps == [] and not relay.outputs
    # A later call of the same customer: attach moves to the new pipeline.
    other, other_taps = VoicePipeline(), list[Subscriber]()
    connector.attach(pipeline, taps)
    connector.attach(other, other_taps)
    assert pipeline.listeners == [] and taps == []
    assert other.listeners == [connector._on_speech] and len(other_taps) == (1 if wants_tap else 0)
    await relay.close()
    connector.playback.stop()


async def test_stopping_the_bot_detaches_it_from_the_pipeline() -> None:
    host = Host()
    connector = make(TwilioProtocol, host)
    pipeline = VoicePipeline()
    taps: list[Subscriber] = []
    connector.attach(pipeline, taps)
    task = connector.start()
    await asyncio.sleep(0.05)
    await connector.stop("customer_left")
    assert task.done() and len(connector.tasks) == 0
    assert pipeline.listeners == [] and taps == []
    assert connector.state is BotState.STOPPED
    connector.attach(pipeline, taps)  # a stopped link never attaches again
    assert pipeline.listeners == []


async def test_a_failing_link_task_is_logged_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    """Bug: the link's task failures were dropped by ``gather(..., return_exceptions=True)``."""
    host = Host()
    host.connecting_fails = True
    connector = make(NativeProtocol, host)
    pipeline = VoicePipeline()
    connector.attach(pipeline, [])
    with caplog.at_level(logging.ERROR, logger="talkgate.bot"):
        task = connector.start()
        await asyncio.wait({task}, timeout=5)
        await asyncio.sleep(0)
    assert isinstance(task.exception(), RuntimeError)
    assert host.problems == ["task_failure"] and connector.tasks.failed == 1
    assert any("talkgate-bot-r1" in r.getMessage() and r.exc_info for r in caplog.records)
    assert host.finished == ["unavailable"] and pipeline.listeners == []  # detached on the way out
    await connector.stop("customer_left")


@pytest.mark.parametrize("protocol_class", [NativeProtocol, TwilioProtocol])
async def test_too_many_marks_drop_the_oldest_and_tell_the_bot(protocol_class: type) -> None:
    """Bug: marks were unbounded (100 000 marks: 79 MB). Over ``max_marks`` the oldest is
    dropped: Twilio echoes it (as for a clear), the native bot gets ``too_many_marks``."""
    host = Host()
    connector = make(protocol_class, host, max_marks=2)
    connector.playback.enqueue(bytes(32_000))  # 1 s queued: marks wait
    for name in ("a", "b", "c"):
        await connector._handle(native.BotMark(name=name))
    assert connector.playback.pending_marks == 2 and connector.marks_dropped == 1
    assert host.problems == ["dropped_mark"]
    sent = outbox_text(connector)
    if protocol_class is TwilioProtocol:
        assert [json.loads(m)["mark"]["name"] for m in sent] == ["a"]
    else:
        [error] = [json.loads(m) for m in sent]
        assert error["code"] == "too_many_marks" and "'a'" in error["message"]
    connector.playback.stop()


async def test_a_mark_with_an_overlong_name_is_refused() -> None:
    host = Host()
    connector = make(NativeProtocol, host)
    connector.playback.enqueue(bytes(32_000))
    await connector._handle(native.BotMark(name="x" * (MAX_MARK_NAME_CHARS + 1)))
    assert connector.playback.pending_marks == 0 and host.problems == ["bad_message"]
    assert json.loads(outbox_text(connector)[0])["code"] == "bad_request"
    connector.playback.stop()


# -- barge-in: held at once, resumed after a cough, interrupted by speech -----------------


def barge(connector: BotConnector) -> Barge:
    """The state as it is now (not as mypy narrowed it at an earlier assert)."""
    return connector.barge


def speak_over(connector: BotConnector, voiced_ms: int, then_quiet_ms: int, onset: int = 1000) -> None:
    """The customer's speech events over the bot, as the voice pipeline sends them."""
    connector._on_speech(SpeechStarted(onset))
    t = onset
    for _ in range(voiced_ms // 20):
        connector._on_speech(SpeechFrame(bytes(640), t, True))
        t += 20
    for _ in range(then_quiet_ms // 20):
        connector._on_speech(SpeechFrame(bytes(640), t, False))
        t += 20


@pytest.mark.parametrize("protocol_class", [NativeProtocol, TwilioProtocol])
async def test_a_cough_holds_the_bot_and_it_goes_on_where_it_stopped(protocol_class: type) -> None:
    connector = make(protocol_class, Host())
    connector.protocol.call_started()
    connector.playback.enqueue(bytes(32_000))  # 1 s of the bot's answer
    queued = connector.playback.queued_samples
    connector._on_speech(SpeechStarted(1000))
    assert connector.barge is Barge.HELD and connector.playback.held  # silent from the next slot
    assert not connector.playback.playing and connector.playback.queued_samples == queued
    speak_over(connector, 140, 200, onset=1000)  # a 140 ms cough, then quiet
    assert barge(connector) is Barge.NONE and not connector.playback.held
    assert connector.playback.queued_samples == queued  # nothing lost
    assert connector.false_interruptions >= 1 and connector.interruptions == 0
    assert not any("interrupted" in text or '"mark"' in text for text in outbox_text(connector))
    connector.playback.stop()


@pytest.mark.parametrize("protocol_class", [NativeProtocol, TwilioProtocol])
async def test_speech_interrupts_and_the_rest_of_the_old_answer_is_dropped(protocol_class: type) -> None:
    connector = make(protocol_class, Host())
    connector.protocol.call_started()
    connector._pipeline = VoicePipeline()  # in a call (audio plays only then)
    connector.playback.enqueue(bytes(32_000))
    connector.playback.mark("answer-1")
    speak_over(connector, 320, 0)
    assert connector.barge is Barge.DISCARDING and connector.interruptions == 1
    assert connector.playback.queued_samples == 0 and not connector.playback.held
    told = [json.loads(text) for text in outbox_text(connector) if text.startswith("{")]
    if protocol_class is NativeProtocol:
        assert {"type": "interrupted", "marks": ["answer-1"], "heard_ms": 0} in told
    else:  # as Twilio does on clear: the marks that will not be played come back
        assert [m["mark"] for m in told if m.get("event") == "mark"] == [{"name": "answer-1"}]
    # The bot goes on streaming its old answer in real time: dropped …
    await connector._handle(native.Audio(bytes(640), 16_000))
    assert connector.playback.queued_samples == 0
    # … until it clears (its next answer plays).
    await connector._handle(native.Clear())
    assert barge(connector) is Barge.NONE
    await connector._handle(native.Audio(bytes(640), 16_000))
    assert connector.playback.queued_samples > 0
    connector.playback.stop()


async def test_a_bot_that_never_clears_is_heard_again_after_the_hold_time() -> None:
    connector = make(TwilioProtocol, Host(), barge_in_hold_ms=50)
    connector.protocol.call_started()
    connector._pipeline = VoicePipeline()
    connector.playback.enqueue(bytes(32_000))
    speak_over(connector, 320, 0)
    await connector._handle(native.Audio(bytes(640), 16_000))
    assert connector.playback.queued_samples == 0  # still the old answer
    await asyncio.sleep(0.06)
    await connector._handle(native.Audio(bytes(640), 16_000))
    assert connector.playback.queued_samples > 0 and connector.barge is Barge.NONE
    connector.playback.stop()


async def test_speech_just_after_the_bot_finished_interrupts_nothing() -> None:
    """The customer answers within a moment of the bot's last word: held (it might have
    gone on), but with nothing queued there is nothing to interrupt, and the bot's next
    answer is not dropped as the rest of the last one."""
    connector = make(NativeProtocol, Host())
    connector._pipeline = VoicePipeline()
    connector.playback._last_audible = time.monotonic()  # its last word, just played
    speak_over(connector, 400, 0)
    assert barge(connector) is Barge.NONE and connector.interruptions == 0
    assert not any("interrupted" in text for text in outbox_text(connector))
    await connector._handle(native.Audio(bytes(640), 16_000))
    assert connector.playback.queued_samples > 0  # its next answer plays
    connector.playback.stop()
