"""Which media goes where inside a conversation: the one place that decides.

``wants(state, sink, source)`` is the policy, decided from the conversation's routing
state (so hold and whisper are a field of ``RouteState`` and a rule here, not new
plumbing); ``Router.reconcile`` recomputes, for every participant with a peer
connection, the set of (source participant, kind) it should receive and lets the
peer attach or detach relays to match. The router is keyed by (conversation,
identity): a connection in several conversations has one peer per conversation.
It sees peers through the narrow ``RoutedPeer`` interface and never imports aiortc;
peers report their changes through callbacks (``calls.py`` wires them here).
Media stays in the process that holds the peer connections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from media.playback import PlaybackTrack
from media.relay import Relay, Subscriber
from media.tasks import wait_closed

from .messages import Participant, Role

log = logging.getLogger("talkgate.routing")

Route = tuple[str, str]  # (source identity, kind)


@dataclass(frozen=True, slots=True)
class RouteState:
    """What routing needs to know of a conversation besides who is in it."""

    #: Identities on hold: they neither hear nor are heard (the agent desk sets it).
    held: frozenset[str] = frozenset()


def wants(state: RouteState, sink: Participant, source: Participant) -> bool:
    """Customers hear and see everyone else (agents, a bot); agents and bots get the customer's."""
    if sink.identity == source.identity or sink.identity in state.held or source.identity in state.held:
        return False
    return (sink.role == Role.CUSTOMER) != (source.role == Role.CUSTOMER)


def taps(participant: Participant) -> bool:
    """Whose audio goes through the voice pipeline: the customer's."""
    return participant.role == Role.CUSTOMER


class Source(Protocol):
    participant: Participant
    sources: dict[str, Relay]


class RoutedPeer(Source, Protocol):
    """What the router needs of a participant's peer connection (``calls.MediaPeer``)."""

    conversation: str

    @property
    def audio_taps(self) -> list[Subscriber]:
        """Subscribers to this participant's audio besides outputs: the voice pipeline, bot taps."""

    def route(self, wanted: dict[Route, Relay]) -> None:
        """Make the outputs carry exactly ``wanted``."""


@dataclass(eq=False)
class VirtualSource:
    """Media from something without a peer connection (a bot's playback)."""

    participant: Participant
    sources: dict[str, Relay] = field(default_factory=dict)
    #: Replaced relays, awaited when the source is removed (finished ones are dropped).
    retired: list[Relay] = field(default_factory=list)


#: Makes a relay for a track (``functools.partial(Relay, reader_failures=…)`` counts failures).
RelayFactory = Callable[..., Relay]


class Router:
    def __init__(self, on_media: Callable[[RoutedPeer], None], *, make_relay: RelayFactory = Relay) -> None:
        self.make_relay = make_relay
        #: conversation -> identity -> the peer connection of that participant
        self._rooms: dict[str, dict[str, RoutedPeer]] = {}
        #: Called when what a participant sends changes (for ``media`` messages).
        self._on_media = on_media
        #: conversation -> identity -> sources that have no peer connection
        self._virtual: dict[str, dict[str, VirtualSource]] = {}
        #: conversation -> its routing state (absent: the default)
        self._states: dict[str, RouteState] = {}
        #: Told every track a conversation's call carries after each change (the recorder).
        self.on_routed: Callable[[str, dict[tuple[str, str], tuple[Participant, Relay]]], None] | None = None

    def __len__(self) -> int:
        return sum(len(room) for room in self._rooms.values())

    def peers(self, conversation: str) -> list[RoutedPeer]:
        return list(self._rooms.get(conversation, {}).values())

    def get(self, conversation: str, identity: str) -> RoutedPeer | None:
        return self._rooms.get(conversation, {}).get(identity)

    def attach(self, peer: RoutedPeer) -> None:
        self._rooms.setdefault(peer.conversation, {})[peer.participant.identity] = peer

    def detach(self, peer: RoutedPeer) -> None:
        """Stop routing to and from this peer (its owner closes it)."""
        room = self._rooms.get(peer.conversation)
        if room is None or room.get(peer.participant.identity) is not peer:
            return
        del room[peer.participant.identity]
        if not room:
            del self._rooms[peer.conversation]
        for relay in peer.sources.values():
            relay.stop()
        self.reconcile(peer.conversation)

    def set_state(self, conversation: str, state: RouteState) -> None:
        if state == RouteState():
            self._states.pop(conversation, None)
        else:
            self._states[conversation] = state
        self.reconcile(conversation)

    def forget(self, conversation: str) -> None:
        self._states.pop(conversation, None)

    def source_changed(self, peer: RoutedPeer) -> None:
        self._on_media(peer)
        self.reconcile(peer.conversation)

    def add_virtual_source(self, conversation: str, participant: Participant, track: PlaybackTrack) -> Relay:
        """Route a track that no participant's peer connection carries (bot playback)."""
        owner = self._virtual.setdefault(conversation, {}).setdefault(participant.identity, VirtualSource(participant))
        old = owner.sources.get(track.kind)
        if old is not None:
            old.stop()
            owner.retired = [r for r in owner.retired if not r.finished]
            owner.retired.append(old)
        relay = owner.sources[track.kind] = self.make_relay(track)
        self.reconcile(conversation)
        return relay

    async def remove_virtual_source(self, conversation: str, identity: str) -> None:
        owner = self._virtual.get(conversation, {}).pop(identity, None)
        if not self._virtual.get(conversation, True):
            del self._virtual[conversation]
        if owner is None:
            return
        for relay in owner.sources.values():
            relay.stop()
        self.reconcile(conversation)
        await _close_relays([*owner.sources.values(), *owner.retired])

    def reconcile(self, conversation: str) -> None:
        room = self._rooms.get(conversation)
        owners: list[Source] = [*(room or {}).values(), *self._virtual.get(conversation, {}).values()]
        if self.on_routed is not None:
            # A call is recorded while someone with a peer connection is on it (not a bot alone).
            routed = {
                (owner.participant.identity, kind): (owner.participant, relay)
                for owner in owners
                for kind, relay in owner.sources.items()
            }
            self.on_routed(conversation, routed if room else {})
        if not room:
            return
        state = self._states.get(conversation, RouteState())
        for sink in room.values():
            wanted: dict[Route, Relay] = {
                (source.participant.identity, kind): relay
                for source in owners
                if wants(state, sink.participant, source.participant)
                for kind, relay in source.sources.items()
            }
            sink.route(wanted)
            audio = sink.sources.get("audio")
            if audio is not None:
                for tap in sink.audio_taps:
                    audio.subscribe(tap)


async def _close_relays(relays: Iterable[Relay]) -> None:
    await wait_closed([relay.close() for relay in relays], log, "relay close")
