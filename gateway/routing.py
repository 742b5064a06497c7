"""Which media goes where inside a conversation: the one place that decides.

``wants`` is the policy; ``Router.reconcile`` recomputes, for every participant with
a peer connection, the set of (source participant, kind) it should receive and lets
the ``MediaPeer`` attach or detach relays to match. Adding a tap (the voice
pipeline) or a source (bot playback) means adding to this policy, not new plumbing.
Media stays in the process that holds the peer connections.
"""

from __future__ import annotations

from collections.abc import Callable

from aiortc.mediastreams import MediaStreamTrack

from media.relay import Relay

from .messages import Participant, Role
from .rtc import MediaPeer, Route


def wants(sink: Participant, source: Participant) -> bool:
    """Customers and agents hear and see each other; agents do not get each other's media."""
    if sink.identity == source.identity:
        return False
    return (sink.role == Role.CUSTOMER) != (source.role == Role.CUSTOMER)


class Router:
    def __init__(self, on_media: Callable[[MediaPeer], None]) -> None:
        #: conversation -> identity -> the peer connection of that participant
        self._rooms: dict[str, dict[str, MediaPeer]] = {}
        #: Called when what a participant sends changes (for ``media`` messages).
        self._on_media = on_media

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

    def reconcile(self, conversation: str) -> None:
        room = self._rooms.get(conversation)
        if not room:
            return
        for sink in room.values():
            wanted: dict[Route, Relay] = {
                (source.identity, kind): relay
                for source in room.values()
                if wants(sink.participant, source.participant)
                for kind, relay in source.sources.items()
            }
            sink.route(wanted)
