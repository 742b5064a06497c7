"""Which media goes where inside a conversation: the one place that decides.

``wants`` is the policy; ``Router.reconcile`` recomputes, for every participant with
a peer connection, the set of (source participant, kind) it should receive and lets
the ``MediaPeer`` attach or detach relays to match. Adding a tap (the voice
pipeline) or a source (bot playback) means adding to this policy, not new plumbing.
Media stays in the process that holds the peer connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiortc.mediastreams import MediaStreamTrack

from media.relay import Relay

from .messages import Participant, Role
from .rtc import MediaPeer, Route


def wants(sink: Participant, source: Participant) -> bool:
    """Customers hear and see everyone else (agents, a bot); agents and bots get the customer's."""
    if sink.identity == source.identity:
        return False
    return (sink.role == Role.CUSTOMER) != (source.role == Role.CUSTOMER)


def taps(participant: Participant) -> bool:
    """Whose audio goes through the voice pipeline: the customer's."""
    return participant.role == Role.CUSTOMER


@dataclass(eq=False)
class VirtualSource:
    """Media from something without a peer connection (a bot's playback)."""

    participant: Participant
    sources: dict[str, Relay] = field(default_factory=dict)
    #: Replaced relays, awaited when the source is removed.
    retired: list[Relay] = field(default_factory=list)

    @property
    def identity(self) -> str:
        return self.participant.identity


class Router:
    def __init__(self, on_media: Callable[[MediaPeer], None]) -> None:
        #: conversation -> identity -> the peer connection of that participant
        self._rooms: dict[str, dict[str, MediaPeer]] = {}
        #: Called when what a participant sends changes (for ``media`` messages).
        self._on_media = on_media
        #: conversation -> identity -> sources that have no peer connection
        self._virtual: dict[str, dict[str, VirtualSource]] = {}

    def __len__(self) -> int:
        return sum(len(room) for room in self._rooms.values())

    def peers(self, conversation: str) -> list[MediaPeer]:
        return list(self._rooms.get(conversation, {}).values())

    def attach(self, peer: MediaPeer) -> None:
        self._rooms.setdefault(peer.conversation, {})[peer.identity] = peer

    def detach(self, peer: MediaPeer) -> None:
        """Stop routing to and from this peer (its session closes it)."""
        room = self._rooms.get(peer.conversation)
        if room is None or room.get(peer.identity) is not peer:
            return
        del room[peer.identity]
        if not room:
            del self._rooms[peer.conversation]
        for relay in peer.sources.values():
            relay.stop()
        self.reconcile(peer.conversation)

    def add_source(self, peer: MediaPeer, track: MediaStreamTrack) -> Relay:
        relay = peer.add_source(track)
        self.source_changed(peer)
        return relay

    def source_changed(self, peer: MediaPeer) -> None:
        self._on_media(peer)
        self.reconcile(peer.conversation)

    def add_virtual_source(self, conversation: str, participant: Participant, track: MediaStreamTrack) -> Relay:
        """Route a track that no participant's peer connection carries (bot playback)."""
        owner = self._virtual.setdefault(conversation, {}).setdefault(participant.identity, VirtualSource(participant))
        old = owner.sources.get(track.kind)
        if old is not None:
            old.stop()
            owner.retired.append(old)
        relay = owner.sources[track.kind] = Relay(track)
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
        await asyncio.gather(*(relay.close() for relay in [*owner.sources.values(), *owner.retired]))

    def reconcile(self, conversation: str) -> None:
        room = self._rooms.get(conversation)
        if not room:
            return
        owners: list[MediaPeer | VirtualSource] = [*room.values(), *self._virtual.get(conversation, {}).values()]
        for sink in room.values():
            wanted: dict[Route, Relay] = {
                (source.identity, kind): relay
                for source in owners
                if wants(sink.participant, source.participant)
                for kind, relay in source.sources.items()
            }
            sink.route(wanted)
            audio = sink.sources.get("audio")
            if audio is not None:
                for tap in (sink.pipeline, *sink.taps):
                    if tap is not None and tap.relay is not audio:
                        audio.subscribe(tap)
