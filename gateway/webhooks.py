"""Webhooks, sans I/O: which domain events an app hears about, as what bodies, and when a
failed delivery is tried again.

The records writer (``writer.py``) calls ``webhook_payloads`` for every event it commits
and writes what it returns into the outbox (``schema.webhook_outbox``) in the same
transaction; the delivery worker (``webhook_delivery.py``) sends the rows. Nothing here
touches a socket or a database: ``tests/gateway/test_webhooks_mapping.py`` feeds events in.

A body is ``{"type", "id", "timestamp", "data"}`` (the Standard Webhooks shape); ``id``
is the ``webhook-id``, one per event and the same for every endpoint, so a receiver
dedupes deliveries by it. ``data`` always names the conversation record (``conversation``)
and its room (``room``); participants are ``{identity, role, name}``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import random
import uuid
from typing import Any

import standardwebhooks

from . import events as ev
from .errors import ConfigError
from .messages import Participant

#: Every event type a webhook may carry (docs/api.md has an example body of each).
EVENT_TYPES = (
    "conversation.opened",
    "conversation.closed",
    "message.created",
    "queue.entered",
    "bot.transferred",
    "queue.accepted",
    "call.started",
    "call.ended",
    "transcript.final",
    "meta.recorded",
    "recording.saved",
)
#: The outbox keeps this much of a delivery's last error (characters).
MAX_ERROR_CHARS = 500


def webhook_payloads(event: ev.Event, record_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The webhooks one domain event makes, as ``(type, data)``: none for most events
    (joins, leaves, media, speaking), two for a bot's hand-over (``queue.entered`` and
    ``bot.transferred``)."""
    base: dict[str, Any] = {"conversation": record_id, "room": event.conversation}
    match event:
        case ev.ConversationOpened(customer=customer):
            return [("conversation.opened", base if customer is None else {**base, "customer": customer})]
        case ev.ConversationClosed():
            return [("conversation.closed", base)]
        case ev.ChatPosted(message=message):
            return [("message.created", {**base, "id": message.id, "from": _who(message.sender), "text": message.text})]
        case ev.QueueEntered(entry=entry, by_bot=by_bot):
            data = {**base, "customer": _who(entry.customer), "reason": entry.reason}
            if by_bot:
                return [("queue.entered", data), ("bot.transferred", data)]
            return [("queue.entered", data)]
        case ev.AgentAccepted(agent=agent):
            return [("queue.accepted", {**base, "agent": _who(agent)})]
        case ev.CallStarted(participant=who):
            return [("call.started", {**base, "participant": _who(who)})]
        case ev.CallEnded(participant=who, reason=reason):
            return [("call.ended", {**base, "participant": _who(who), "reason": reason})]
        case ev.TranscriptPosted(final=True, text=text, speaker=speaker, sender=sender):
            return [("transcript.final", {**base, "speaker": _who(speaker), "text": text, "via": sender.identity})]
        case ev.MetaRecorded(kind=kind, body=body, actor=actor):
            return [("meta.recorded", {**base, "kind": kind, "body": body, "actor": actor and _who(actor)})]
        case ev.RecordingSaved(participant=who, media=media, file=file, started=started):
            data = {**base, "participant": _who(who), "media": media, "file": file, "started": iso_utc(started)}
            return [("recording.saved", {**data, "duration_ms": event.duration_ms, "bytes": event.size})]
    return []


def webhook_body(kind: str, msg_id: str, ts: int, data: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of one webhook (``ts``: when the event happened, Unix ms)."""
    return {"type": kind, "id": msg_id, "timestamp": iso_utc(ts), "data": data}


def new_msg_id() -> str:
    """A ``webhook-id``: unique per event (the same for every endpoint)."""
    return f"msg_{uuid.uuid4().hex}"


def iso_utc(ms: int) -> str:
    """Unix milliseconds as ISO 8601 UTC with milliseconds (``2026-12-02T01:02:03.456Z``)."""
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def retry_delay(attempts: int, first: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before the next try after ``attempts`` failed ones: exponential backoff
    (``first`` doubling, at most ``cap``) with full jitter (anywhere from 0 to it), so
    that endpoints that failed together do not retry together."""
    ceiling = min(cap, first * 2 ** min(max(attempts - 1, 0), 62))
    return (rng or random).uniform(0, ceiling)


def signer(secret: str) -> standardwebhooks.Webhook:
    """The Standard Webhooks signer for a ``whsec_<base64>`` secret; ConfigError if it is not one."""
    if not secret.startswith("whsec_"):
        raise ConfigError("the webhook secret must be a Standard Webhooks secret: whsec_ and base64")
    key = secret.removeprefix("whsec_")
    try:
        size = len(base64.b64decode(key + "=" * (-len(key) % 4), validate=True))
    except binascii.Error:
        size = 0
    if size < 24:  # the spec: 24 to 64 random bytes
        raise ConfigError("the webhook secret must be whsec_ followed by base64 of at least 24 bytes")
    return standardwebhooks.Webhook(secret)


def _who(who: Participant) -> dict[str, str]:
    return who.as_dict()
