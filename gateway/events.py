"""Domain events: what happened in a conversation, as typed values.

The conversation rules (``conversation.py``), the calls (``calls.py``) and the bot
manager return or report these; everything that reacts consumes the same values:
the wire encoder (``delivery.py``) turns each into the client message its
participants get, ``metrics.py`` counts them, the bot manager hears customer chat
and agent arrivals, and the coming durable records, webhook outbox and cluster bus
attach here too. Events are facts, past tense, frozen; they carry no sockets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .messages import ChatMessage, Participant, QueueEntry


def now_ms() -> int:
    """The gateway's clock for events: Unix milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    conversation: str
    #: When it happened: the gateway's clock, Unix milliseconds.
    ts: int


#: The leaving reason of everyone in a conversation the app closes; such a record is not
#: resumed by the room's next join (``--history-retention-seconds``): that opens a new one.
CLOSED_BY_APP = "closed"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationOpened(Event):
    """Its first participant joined (a conversation id that was not live), or the app
    wrote to it for a known customer before anyone joined (``customer``)."""

    #: The app opened it for this customer (their identity); None: opened by a join.
    customer: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationClosed(Event):
    """Its last participant left, or the app closed one nobody was in (``reason``)."""

    #: How it ended when no participant's leaving says so (the app closed it unattended).
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ParticipantJoined(Event):
    participant: Participant
    #: What the app said about a customer in its join token (``profile`` claim).
    profile: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ParticipantLeft(Event):
    participant: Participant
    #: ``left`` (asked to), ``disconnected`` (connection closed), ``transferred`` (a bot
    #: handed over), ``customer_left``, ``shutdown``, or a bot's own ending.
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ParticipantAway(Event):
    """A participant's connection was lost; it stays in the conversation for the grace
    time (a reload, a network switch) and leaves (``ParticipantLeft``) if it is not back."""

    participant: Participant
    grace_seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ParticipantReturned(Event):
    """A participant that was away joined again within the grace time."""

    participant: Participant


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatPosted(Event):
    message: ChatMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptPosted(Event):
    """A bot's transcript of what it heard (partial or final); not kept in the history."""

    sender: Participant
    text: str
    final: bool
    #: Whose words they are: the customer (what the bot heard) or the bot (what it said).
    speaker: Participant


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueEntered(Event):
    entry: QueueEntry
    #: A bot handed the conversation over (``Conversations.hand_over``), not the customer.
    by_bot: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueLeft(Event):
    #: ``accepted`` (an agent took it) or ``abandoned`` (no customer remains).
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentAccepted(Event):
    """An agent took the conversation from the queue (or entered it with a room token)."""

    agent: Participant


@dataclass(frozen=True, slots=True, kw_only=True)
class MediaChanged(Event):
    """What a participant now sends to the gateway (announced only when it changed)."""

    identity: str
    audio: bool
    video: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class CallStarted(Event):
    """A participant's peer connection with the gateway was created (its first offer)."""

    participant: Participant


@dataclass(frozen=True, slots=True, kw_only=True)
class CallEnded(Event):
    participant: Participant
    #: ``hangup``, ``left``, ``disconnected``, ``replaced``, ``failed``.
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeakingChanged(Event):
    """The voice pipeline heard a participant start or stop talking."""

    identity: str
    speaking: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordingChanged(Event):
    """The conversation's calls began or ceased to be recorded (``--record``): everyone
    in it is told, and the pages show it."""

    active: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordingSaved(Event):
    """One participant's track of a call was written to a file (``media.recorder``)."""

    participant: Participant
    #: ``audio`` or ``video``.
    media: str
    #: The file, relative to the recording directory.
    file: str
    #: When the track began to be recorded (Unix ms; the file starts at its first packet
    #: after that, for video its first keyframe) and how long the file is.
    started: int
    duration_ms: int
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UpgradeRequested(Event):
    id: str
    media: str
    sender: Participant


@dataclass(frozen=True, slots=True, kw_only=True)
class UpgradeAnswered(Event):
    id: str
    media: str
    replier: Participant
    accept: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class MetaRecorded(Event):
    """Something the app or a later feature notes in a conversation's timeline (a card, a
    reminder, a callback): recorded as a ``meta`` event, not sent to clients by itself."""

    #: What it is (``card``, ``reminder``, …): the record's ``body.kind``.
    kind: str
    body: dict[str, Any]
    #: Who did it (None: the gateway or the app).
    actor: Participant | None = None


#: Events after which every agent gets the new queue.
QUEUE_EVENTS = (QueueEntered, QueueLeft)
