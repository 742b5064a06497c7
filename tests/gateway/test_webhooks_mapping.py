"""The webhooks' sans-I/O part (``gateway/webhooks.py``): events in, bodies out; the backoff;
the secret's validation. No socket, no database."""

from __future__ import annotations

import dataclasses
import datetime
import random

import pytest
import standardwebhooks

from gateway import events as ev
from gateway import webhooks
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.messages import ChatMessage, Participant, QueueEntry

ANN = Participant(identity="u1", role="customer", name="Ann")
BOB = Participant(identity="a1", role="agent", name="Bob")
BOT = Participant(identity="bot", role="bot", name="Assistant")
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BASE: dict[str, object] = {"conversation": "r1~0123456789ab", "room": "r1"}


def payloads(event: ev.Event) -> list[tuple[str, dict[str, object]]]:
    return webhooks.webhook_payloads(event, "r1~0123456789ab")


def test_each_event_makes_its_webhooks() -> None:
    chat = ChatMessage(id="m1", sender=ANN, text="hello", ts=5)
    entry = QueueEntry(conversation="r1", customer=ANN, since=6, reason="billing")
    cases: list[tuple[ev.Event, list[tuple[str, dict[str, object]]]]] = [
        (ev.ConversationOpened(conversation="r1", ts=1), [("conversation.opened", BASE)]),
        (ev.ConversationClosed(conversation="r1", ts=1), [("conversation.closed", BASE)]),
        (
            ev.ChatPosted(conversation="r1", ts=5, message=chat),
            [("message.created", {**BASE, "id": "m1", "from": ANN.as_dict(), "text": "hello"})],
        ),
        (
            ev.QueueEntered(conversation="r1", ts=6, entry=entry),
            [("queue.entered", {**BASE, "customer": ANN.as_dict(), "reason": "billing"})],
        ),
        (
            ev.AgentAccepted(conversation="r1", ts=7, agent=BOB),
            [("queue.accepted", {**BASE, "agent": BOB.as_dict()})],
        ),
        (
            ev.CallStarted(conversation="r1", ts=8, participant=ANN),
            [("call.started", {**BASE, "participant": ANN.as_dict()})],
        ),
        (
            ev.CallEnded(conversation="r1", ts=9, participant=ANN, reason="hangup"),
            [("call.ended", {**BASE, "participant": ANN.as_dict(), "reason": "hangup"})],
        ),
        (
            ev.TranscriptPosted(conversation="r1", ts=10, sender=BOT, text="hi", final=True, speaker=ANN),
            [("transcript.final", {**BASE, "speaker": ANN.as_dict(), "text": "hi", "via": "bot"})],
        ),
        (
            ev.MetaRecorded(conversation="r1", ts=11, kind="card", body={"title": "T"}),
            [("meta.recorded", {**BASE, "kind": "card", "body": {"title": "T"}, "actor": None})],
        ),
        (
            ev.RecordingSaved(
                conversation="r1",
                ts=12,
                participant=ANN,
                media="audio",
                file="r1/x.ogg",
                started=1_764_670_680_000,
                duration_ms=5000,
                size=20_000,
            ),
            [
                (
                    "recording.saved",
                    {
                        **BASE,
                        "participant": ANN.as_dict(),
                        "media": "audio",
                        "file": "r1/x.ogg",
                        "started": "2025-12-02T10:18:00.000Z",
                        "duration_ms": 5000,
                        "bytes": 20_000,
                    },
                )
            ],
        ),
    ]
    for event, expected in cases:
        assert payloads(event) == expected, event
    made = {kind for event, _ in cases for kind, _ in payloads(event)}
    assert made | {"bot.transferred"} == set(webhooks.EVENT_TYPES)


def test_a_bot_hand_over_is_also_bot_transferred() -> None:
    entry = QueueEntry(conversation="r1", customer=ANN, since=6, reason="wants a person")
    [(first, data), (second, same)] = payloads(ev.QueueEntered(conversation="r1", ts=6, entry=entry, by_bot=True))
    assert (first, second) == ("queue.entered", "bot.transferred") and data == same
    assert data["reason"] == "wants a person"


def test_live_signals_make_no_webhook() -> None:
    assert payloads(ev.ParticipantJoined(conversation="r1", ts=1, participant=ANN)) == []
    assert payloads(ev.SpeakingChanged(conversation="r1", ts=1, identity="u1", speaking=True)) == []
    partial = ev.TranscriptPosted(conversation="r1", ts=1, sender=BOT, text="h", final=False, speaker=ANN)
    assert payloads(partial) == []


def test_a_body_is_the_standard_webhooks_shape_and_verifies() -> None:
    body = webhooks.webhook_body("conversation.opened", "msg_1", 1_764_637_323_456, BASE)
    assert body == {"type": "conversation.opened", "id": "msg_1", "timestamp": "2025-12-02T01:02:03.456Z", "data": BASE}
    assert webhooks.new_msg_id().startswith("msg_") and webhooks.new_msg_id() != webhooks.new_msg_id()


def test_the_backoff_doubles_with_full_jitter_up_to_the_cap() -> None:
    rng = random.Random(7)
    for attempts, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (13, 3600.0), (500, 3600.0)):
        delays = [webhooks.retry_delay(attempts, 1.0, 3600.0, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the whole range, not always the ceiling
        assert min(delays) < ceiling / 2


@pytest.mark.parametrize("secret", ["", "whsec_", "nothing", "whsec_!!!!", "whsec_c2hvcnQ="])
def test_a_bad_webhook_secret_is_refused(config: Config, secret: str) -> None:
    with pytest.raises(ConfigError, match="secret"):
        dataclasses.replace(config, database="sqlite:///x.db", webhook_urls=("http://h/",), webhook_secret=secret)


def test_webhook_settings_are_checked(config: Config) -> None:
    good = {"database": "sqlite:///x.db", "webhook_urls": ("http://h/",), "webhook_secret": SECRET}
    dataclasses.replace(config, **good)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="database"):
        dataclasses.replace(config, **{**good, "database": ""})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="http"):
        dataclasses.replace(config, **{**good, "webhook_urls": ("ftp://h/",)})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="positive"):
        dataclasses.replace(config, **{**good, "webhook_retry_hours": 0})  # type: ignore[arg-type]


def test_the_signer_is_the_standard_webhooks_one() -> None:
    signer = webhooks.signer(SECRET)
    moment = datetime.datetime.now(datetime.UTC)
    signature = signer.sign("msg_1", moment, '{"a":1}')
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(moment.timestamp())), "webhook-signature": signature}
    assert standardwebhooks.Webhook(SECRET).verify('{"a":1}', headers) == {"a": 1}
