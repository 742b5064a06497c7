"""One participant's WebRTC peer connection with the gateway, and its negotiation.

The gateway terminates WebRTC: each participant with media has one
``RTCPeerConnection`` here, created on its first offer and owned by its session.
Negotiation follows the perfect-negotiation pattern with the gateway as the
*impolite* side (aiortc cannot roll back a local offer): a client offer that
collides with a pending gateway offer is ignored, and the client (polite) answers
the gateway's offer first and offers again afterwards.

Every transceiver gets one persistent ``OutputTrack`` on its sender, so routing
(``routing.Router``) switches what a participant hears or sees by attaching relays
to free outputs; a new transceiver, and so a gateway offer, is needed only when no
free output of that kind exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiortc import RTCConfiguration, RTCIceServer, RTCRtpTransceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription, candidate_from_sdp

from media.ice import Network, candidate_allowed, filter_sdp_candidates
from media.inbound import InboundAudio
from media.outbound import DirectAudio
from media.peerconnection import StablePeerConnection
from media.pipeline import VoicePipeline
from media.relay import OutputTrack, Relay, Subscriber

from .errors import BadRequest, CallFailed
from .messages import Participant

if TYPE_CHECKING:
    from .routing import Router

log = logging.getLogger("talkgate.rtc")

Route = tuple[str, str]  # (source identity, kind)


class Negotiation(enum.Enum):
    #: No offer outstanding in either direction.
    STABLE = "stable"
    #: The gateway sent an offer and waits for the client's answer.
    GATEWAY_OFFER = "gateway_offer"
    CLOSED = "closed"


@dataclass(eq=False)
class Slot:
    """A transceiver and the output track on its sender."""

    transceiver: RTCRtpTransceiver
    output: OutputTrack
    route: Route | None = None

    @property
    def kind(self) -> str:
        return str(self.transceiver.kind)

    def can_send(self) -> bool:
        return (
            self.transceiver.currentDirection in ("sendrecv", "sendonly") or self.transceiver.currentDirection is None
        )


@dataclass(frozen=True, slots=True)
class RtcSettings:
    ice_servers: tuple[RTCIceServer, ...] = ()
    #: Remote candidates outside these networks are dropped (empty: all allowed).
    allowed_networks: tuple[Network, ...] = ()


class MediaPeer:
    def __init__(
        self,
        *,
        conversation: str,
        participant: Participant,
        settings: RtcSettings,
        send: Callable[[dict[str, Any]], None],
        router: Router,
    ) -> None:
        self.conversation = conversation
        self.participant = participant
        self.settings = settings
        #: Delivers a message to this participant's client (the session's outbox).
        self._send = send
        self.router = router
        self.pc = StablePeerConnection(RTCConfiguration(iceServers=list(settings.ice_servers)))
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_connection_state)
        self.state = Negotiation.STABLE
        #: One per transceiver, in creation order.
        self.slots: list[Slot] = []
        #: What this participant sends, by kind: the relay reading it.
        self.sources: dict[str, Relay] = {}
        #: Relays replaced or ended, awaited on close.
        self._retired: list[Relay] = []
        #: Serialises negotiation steps (client offers, answers, gateway offers).
        self._lock = asyncio.Lock()
        self._offer_wanted = False
        self._offer_task: asyncio.Task[None] | None = None
        #: True inside a negotiation step; routing waits for the step's own reconcile.
        self._negotiating = False
        #: The voice pipeline tapping this participant's audio (customers), set by the broker.
        self.pipeline: VoicePipeline | None = None
        #: Other taps on this participant's audio (a Twilio bot's continuous stream).
        self.taps: list[Subscriber] = []

    @property
    def identity(self) -> str:
        return self.participant.identity

    # -- client → gateway ---------------------------------------------------------------

    async def accept_offer(self, sdp: str) -> bool:
        """Apply a client offer and send the answer; False if it collided with ours (or we closed)."""
        async with self._negotiation():
            if self.state is Negotiation.CLOSED:
                return False
            if self.state is Negotiation.GATEWAY_OFFER:
                return False  # collision: the gateway is the impolite side and keeps its offer
            sdp = self._checked(sdp, "offer")
            try:
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            except Exception as exc:  # aiortc raises ValueError, AssertionError, OperationError…
                raise BadRequest(f"cannot apply the offer: {_reason(exc)}") from None
            for transceiver in self.pc.getTransceivers():
                # Answer sendrecv where the client can receive, so routing can start or
                # switch what flows toward it later without another negotiation.
                if transceiver.direction == "recvonly":
                    transceiver.direction = "sendrecv"
                self._slot_for(transceiver)
            try:
                await self.pc.setLocalDescription(await self.pc.createAnswer())
            except Exception as exc:  # an offer aiortc accepted but cannot answer (fuzzing found some)
                raise CallFailed(f"cannot answer the offer: {_reason(exc)}; the call was ended") from None
            self._send({"type": "answer", "sdp": self.pc.localDescription.sdp})
        self.router.reconcile(self.conversation)
        return True

    async def accept_answer(self, sdp: str) -> None:
        async with self._negotiation():
            if self.state is not Negotiation.GATEWAY_OFFER:
                raise BadRequest("there is no offer from the gateway to answer")
            sdp = self._checked(sdp, "answer")
            try:
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
            except Exception as exc:
                raise BadRequest(f"cannot apply the answer: {_reason(exc)}") from None
            self.state = Negotiation.STABLE
        self.router.reconcile(self.conversation)
        if self._offer_wanted:
            self._schedule_offer()

    async def add_candidate(self, candidate: str, sdp_mid: str | None, sdp_mline_index: int | None) -> None:
        if not candidate:
            return  # end of candidates: aiortc needs no signal
        mids = {t.mid for t in self.pc.getTransceivers() if t.mid is not None}
        if sdp_mid is not None and sdp_mid not in mids:
            raise BadRequest(f"no media section with mid {sdp_mid!r}")
        if sdp_mid is None and (sdp_mline_index is None or not 0 <= sdp_mline_index < len(mids)):
            raise BadRequest("a candidate needs a known sdpMid or sdpMLineIndex")
        try:
            parsed = candidate_from_sdp(candidate.removeprefix("candidate:"))
        except (AssertionError, ValueError, IndexError):
            raise BadRequest("the candidate is not a valid ICE candidate line") from None
        if not candidate_allowed(parsed.ip, self.settings.allowed_networks):
            return  # silently ignored, like a candidate that never connects
        parsed.sdpMid = sdp_mid
        parsed.sdpMLineIndex = sdp_mline_index
        await self.pc.addIceCandidate(parsed)

    # -- routing (called by the Router) ------------------------------------------------------

    def route(self, wanted: dict[Route, Relay]) -> None:
        """Make the outputs carry exactly ``wanted``; add transceivers (and offer) if short."""
        if self._negotiating or self.state is Negotiation.CLOSED:
            return  # the step in progress reconciles when it ends
        for slot in self.slots:
            if slot.route is not None and wanted.get(slot.route) is not slot.output.relay:
                if slot.output.relay is not None:
                    slot.output.relay.unsubscribe(slot.output)
                slot.route = None
        routed = {slot.route for slot in self.slots if slot.route is not None}
        for route, relay in wanted.items():
            if route in routed:
                continue
            free = next((s for s in self.slots if s.route is None and s.kind == route[1] and s.can_send()), None)
            if free is None:
                free = self._slot_for(self.pc.addTransceiver(route[1], direction="sendrecv"))
                self._offer_wanted = True
            free.route = route
            relay.subscribe(free.output)
        if self._offer_wanted:
            self._schedule_offer()

    def add_source(self, track: MediaStreamTrack) -> Relay:
        old = self.sources.get(track.kind)
        if old is not None:
            self._retire(old)
        relay = Relay(track, on_ended=self._source_ended)
        self.sources[track.kind] = relay
        return relay

    def media_state(self) -> dict[str, bool]:
        return {"audio": "audio" in self.sources, "video": "video" in self.sources}

    # -- internals ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _negotiation(self) -> AsyncIterator[None]:
        async with self._lock:
            self._negotiating = True
            try:
                yield
            finally:
                self._negotiating = False

    def _checked(self, sdp: str, kind: str) -> str:
        """Refuse what aiortc would accept but cannot use; drop disallowed candidates."""
        try:
            description = SessionDescription.parse(sdp)
        except Exception:
            raise BadRequest(f"the {kind} is not valid SDP") from None
        if not any(m.kind in ("audio", "video") for m in description.media):
            raise BadRequest(f"the {kind} has no audio or video section")
        sdp, dropped = filter_sdp_candidates(sdp, self.settings.allowed_networks)
        if dropped:
            log.debug("[%s] dropped %d candidates outside the allowed networks", self.identity, dropped)
        return sdp

    def _slot_for(self, transceiver: RTCRtpTransceiver) -> Slot:
        for slot in self.slots:
            if slot.transceiver is transceiver:
                return slot
        output = OutputTrack(transceiver.kind)
        if transceiver.kind == "audio":
            output.direct = DirectAudio(transceiver.sender)
        transceiver.sender.replaceTrack(output)
        slot = Slot(transceiver, output)
        self.slots.append(slot)
        return slot

    def _schedule_offer(self) -> None:
        if self._offer_task is None or self._offer_task.done():
            self._offer_task = asyncio.create_task(self._offer(), name=f"talkgate-offer-{self.identity}")

    async def _offer(self) -> None:
        async with self._negotiation():
            if not self._offer_wanted or self.state is not Negotiation.STABLE:
                return
            self._offer_wanted = False
            offer = await self.pc.createOffer()
            await self.pc.setLocalDescription(offer)
            self.state = Negotiation.GATEWAY_OFFER
            self._send({"type": "offer", "sdp": self.pc.localDescription.sdp})

    def _on_track(self, track: MediaStreamTrack) -> None:
        relay = self.router.add_source(self, track)
        if track.kind == "audio":
            # Opus packets go straight to the relay, encoded; the relay's reader task
            # then only notices when the track ends (media/inbound.py says why).
            receiver = next(t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track)
            InboundAudio(receiver, relay.deliver)

    def _source_ended(self, relay: Relay) -> None:
        if self.sources.get(relay.kind) is relay:
            del self.sources[relay.kind]
            self._retire(relay)
            self.router.source_changed(self)

    def _retire(self, relay: Relay) -> None:
        relay.stop()
        self._retired.append(relay)  # its task is awaited in close()

    def _on_connection_state(self) -> None:
        if self.pc.connectionState == "failed" and self.state is not Negotiation.CLOSED:
            log.info("[%s] peer connection failed", self.identity)
            for relay in self.sources.values():
                self._retire(relay)
            self.sources.clear()
            self.router.source_changed(self)

    async def close(self) -> None:
        """Close the peer connection and end every task this peer owns."""
        if self.state is Negotiation.CLOSED:
            return
        self.state = Negotiation.CLOSED
        if self._offer_task is not None:
            self._offer_task.cancel()
            await asyncio.gather(self._offer_task, return_exceptions=True)
        if self.pipeline is not None:
            self.pipeline.close()
        relays = [*self.sources.values(), *self._retired]
        self.sources.clear()
        self._retired.clear()
        for slot in self.slots:
            slot.output.stop()
        await asyncio.gather(*(relay.close() for relay in relays))
        await self.pc.close()


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:200]
