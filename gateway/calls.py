"""Calls: each participant's WebRTC peer connection with the gateway, and their wiring.

The only gateway module that imports aiortc. ``Calls`` is this process's call
registry, keyed by (conversation, identity): it creates a participant's ``MediaPeer``
on its first offer (within ``max_peer_connections``), taps customers' audio with the
voice pipeline, routes media through the ``Router``, and reports what happens as
domain events (``CallStarted``, ``CallEnded``, ``MediaChanged``, ``SpeakingChanged``).

The gateway terminates WebRTC: each participant with media has one
``RTCPeerConnection`` here per conversation, created on its first offer and owned by
its connection (a replaced connection's calls end; its successor offers anew).
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
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCRtpSender, RTCRtpTransceiver, RTCSessionDescription
from aiortc.codecs import is_rtx
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription, candidate_from_sdp

from media.ears import Ears
from media.ice import Network, candidate_allowed, filter_sdp_candidates, parse_networks
from media.inbound import InboundAudio, InboundVideo
from media.outbound import DirectAudio, DirectVideo
from media.peerconnection import StablePeerConnection
from media.pipeline import VoicePipeline
from media.relay import OutputTrack, Relay, Subscriber
from media.tasks import Tally, TaskOwner, cancel_and_wait, wait_closed
from media.vad import Event as SpeechEvent
from media.vad import SpeechStarted, SpeechStopped

from . import events as ev
from .errors import BadRequest, CallFailed, Unavailable
from .messages import Participant
from .recording import Recordings
from .routing import RelayFactory, Route, RoutedPeer, Router, taps

log = logging.getLogger("talkgate.calls")


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
    #: Video is forwarded as RTP (False: decoded and encoded again per receiver).
    forward_video: bool = True

    @classmethod
    def of(
        cls, ice_servers: list[dict[str, Any]], allowed_networks: tuple[str, ...], *, forward_video: bool = True
    ) -> RtcSettings:
        """From the config's ICE servers (as sent to clients) and allowed networks (CIDR)."""
        return cls(
            tuple(RTCIceServer(**server) for server in ice_servers), parse_networks(allowed_networks), forward_video
        )


class MediaPeer:
    def __init__(
        self,
        *,
        conversation: str,
        participant: Participant,
        settings: RtcSettings,
        send: Callable[[dict[str, Any]], None],
        on_sources: Callable[[MediaPeer], None],
        on_negotiated: Callable[[MediaPeer], None],
        owner: object = None,
        make_relay: RelayFactory = Relay,
        video_codec: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._make_relay = make_relay
        #: The video codec the conversation's other calls already run ("video/vp8"), if any:
        #: this call's video is negotiated to it first, so the gateway can forward between them.
        self._video_codec = video_codec
        self.conversation = conversation
        self.participant = participant
        self.settings = settings
        #: The connection this call belongs to: only it may end the call.
        self.owner = owner
        #: Delivers a message to this participant's client (the session's outbox).
        self._send_message = send
        #: What this participant sends changed (a track arrived or ended).
        self._on_sources = on_sources
        #: A negotiation step ended: outputs can be routed again.
        self._on_negotiated = on_negotiated
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

    @property
    def audio_taps(self) -> list[Subscriber]:
        return [*([self.pipeline] if self.pipeline is not None else []), *self.taps]

    def _send(self, message: dict[str, Any]) -> None:
        self._send_message({**message, "conversation": self.conversation})

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
                raise BadRequest(f"cannot apply the offer: {_reason(exc)}") from exc
            preferred = self._video_codec()
            for transceiver in self.pc.getTransceivers():
                # Answer sendrecv where the client can receive, so routing can start or
                # switch what flows toward it later without another negotiation.
                if transceiver.direction == "recvonly":
                    transceiver.direction = "sendrecv"
                if transceiver.kind == "video" and preferred is not None and transceiver.currentDirection is None:
                    prefer_codec(transceiver, preferred)  # a new m-line: one already sending keeps its codec
                self._slot_for(transceiver)
            try:
                await self.pc.setLocalDescription(await self.pc.createAnswer())
            except Exception as exc:  # an offer aiortc accepted but cannot answer (fuzzing found some)
                raise CallFailed(f"cannot answer the offer: {_reason(exc)}; the call was ended") from exc
            self._send({"type": "answer", "sdp": self.pc.localDescription.sdp})
        self._on_negotiated(self)
        return True

    async def accept_answer(self, sdp: str) -> None:
        async with self._negotiation():
            if self.state is not Negotiation.GATEWAY_OFFER:
                raise BadRequest("there is no offer from the gateway to answer")
            sdp = self._checked(sdp, "answer")
            try:
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
            except Exception as exc:
                raise BadRequest(f"cannot apply the answer: {_reason(exc)}") from exc
            self.state = Negotiation.STABLE
        self._on_negotiated(self)
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
        except (AssertionError, ValueError, IndexError) as exc:
            raise BadRequest("the candidate is not a valid ICE candidate line") from exc
        if not candidate_allowed(parsed.ip, self.settings.allowed_networks):
            return  # silently ignored, like a candidate that never connects
        parsed.sdpMid = sdp_mid
        parsed.sdpMLineIndex = sdp_mline_index
        await self.pc.addIceCandidate(parsed)

    # -- routing (called by the Router) -----------------------------------------------

    def route(self, wanted: dict[Route, Relay]) -> None:
        """Make the outputs carry exactly ``wanted``; add transceivers (and offer) if short."""
        if self._negotiating or self.state is Negotiation.CLOSED:
            return  # the step in progress reconciles when it ends
        for slot in self.slots:
            # A slot whose source ended (its relay already detached it) is free again too.
            if slot.route is not None and (slot.route not in wanted or wanted[slot.route] is not slot.output.relay):
                if slot.output.relay is not None:
                    slot.output.relay.unsubscribe(slot.output)
                slot.route = None
        routed = {slot.route for slot in self.slots if slot.route is not None}
        for route, relay in wanted.items():
            if route in routed:
                continue
            free = next((s for s in self.slots if s.route is None and s.kind == route[1] and s.can_send()), None)
            if free is None:
                transceiver = self.pc.addTransceiver(route[1], direction="sendrecv")
                preferred = self._video_codec() if route[1] == "video" else None
                if preferred is not None:
                    prefer_codec(transceiver, preferred)
                free = self._slot_for(transceiver)
                self._offer_wanted = True
            free.route = route
            relay.subscribe(free.output)
        if self._offer_wanted:
            self._schedule_offer()

    def add_source(self, track: MediaStreamTrack) -> Relay:
        old = self.sources.get(track.kind)
        if old is not None:
            self._retire(old)
        relay = self._make_relay(track, on_ended=self._source_ended)
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
        except Exception as exc:
            raise BadRequest(f"the {kind} is not valid SDP") from exc
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
        elif self.settings.forward_video:
            output.direct = DirectVideo(transceiver.sender)
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
            try:
                offer = await self.pc.createOffer()
                await self.pc.setLocalDescription(offer)
            except Exception:
                # Still wanted: the next negotiation step (a client offer or answer) retries.
                log.exception("[%s] the gateway could not make an offer", self.identity)
                return
            self._offer_wanted = False
            self.state = Negotiation.GATEWAY_OFFER
            self._send({"type": "offer", "sdp": self.pc.localDescription.sdp})

    def _on_track(self, track: MediaStreamTrack) -> None:
        relay = self.add_source(track)
        self._on_sources(self)
        if track.kind == "audio":
            # Opus packets go straight to the relay, encoded; the relay's reader task
            # then only notices when the track ends (media/inbound.py says why).
            receiver = next(t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track)
            InboundAudio(receiver, relay.deliver)
        elif self.settings.forward_video:
            # Video packets are forwarded encoded, never decoded (media/video.py).
            receiver = next(t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track)
            InboundVideo(receiver, relay.deliver)

    def _source_ended(self, relay: Relay) -> None:
        if self.sources.get(relay.kind) is relay:
            del self.sources[relay.kind]
            self._retire(relay)
            self._on_sources(self)

    def _retire(self, relay: Relay) -> None:
        relay.stop()
        # Its task is awaited in close(); those that already ended are dropped now, so a
        # long call whose tracks come and go does not keep every relay it ever had.
        self._retired = [r for r in self._retired if not r.finished]
        self._retired.append(relay)

    def _on_connection_state(self) -> None:
        if self.pc.connectionState == "failed" and self.state is not Negotiation.CLOSED:
            log.info("[%s] peer connection failed", self.identity)
            for relay in self.sources.values():
                self._retire(relay)
            self.sources.clear()
            self._on_sources(self)

    async def close(self) -> None:
        """Close the peer connection and end every task this peer owns."""
        if self.state is Negotiation.CLOSED:
            return
        self.state = Negotiation.CLOSED
        if self._offer_task is not None:
            await cancel_and_wait([self._offer_task], log, f"offer {self.identity}")
        if self.pipeline is not None:
            self.pipeline.close()
        relays = [*self.sources.values(), *self._retired]
        self.sources.clear()
        self._retired.clear()
        for slot in self.slots:
            slot.output.stop()
        await wait_closed([relay.close() for relay in relays], log, f"relays of {self.identity}")
        await self.pc.close()


def prefer_codec(transceiver: RTCRtpTransceiver, mime: str) -> None:
    """Put ``mime`` (and its RTX) first in what this transceiver negotiates: in the answer
    being made (its negotiated codecs, which the browser sends with the first of) and in
    every later offer (its preferences). Nothing changes if the other side lacks it."""
    negotiated = transceiver._codecs
    first = [c for c in negotiated if c.mimeType.lower() == mime]
    if first and negotiated[0] not in first:
        ids = {c.payloadType for c in first}
        rtx = [c for c in negotiated if is_rtx(c) and c.parameters.get("apt") in ids]
        transceiver._codecs = first + rtx + [c for c in negotiated if c not in first and c not in rtx]
    capabilities = RTCRtpSender.getCapabilities(transceiver.kind).codecs
    if any(c.mimeType.lower() == mime for c in capabilities):
        transceiver.setCodecPreferences(sorted(capabilities, key=lambda c: c.mimeType.lower() != mime))


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:200]


Emit = Callable[[list[ev.Event]], None]
#: A customer's voice pipeline was created (the bot manager attaches the conversation's bot).
PipelineHook = Callable[[str, VoicePipeline, list[Subscriber]], None]


class Calls:
    """This process's calls: peer connections keyed by (conversation, identity)."""

    def __init__(
        self,
        *,
        settings: RtcSettings,
        ears: Ears,
        max_peer_connections: int,
        emit: Emit,
        clock: Callable[[], int],
        tasks: TaskOwner,
        pipeline_timer: Any = None,
        make_relay: RelayFactory = Relay,
        pipeline_failures: Tally | None = None,
        recordings: Recordings | None = None,
    ) -> None:
        self._make_relay = make_relay
        self._pipeline_failures = pipeline_failures
        self.settings = settings
        #: Makes each customer's voice pipeline (the process's detectors and turn worker).
        self._ears = ears
        self._max = max_peer_connections
        self._emit = emit
        self._clock = clock
        self._tasks = tasks
        self._pipeline_timer = pipeline_timer
        self.router = Router(self._sources_changed, make_relay=make_relay)
        #: The recorder of every call (``--record``), None when calls are not recorded.
        self.recordings = recordings
        if recordings is not None:
            self.router.on_routed = recordings.routed
        #: conversation -> identity -> the last ``media`` state announced (only senders)
        self._media: dict[str, dict[str, dict[str, bool]]] = {}
        #: Called when a customer's pipeline exists (set by the broker: the bot attaches).
        self.on_pipeline: PipelineHook | None = None

    def __len__(self) -> int:
        return len(self.router)

    def get(self, conversation: str, identity: str) -> MediaPeer | None:
        peer = self.router.get(conversation, identity)
        return peer if isinstance(peer, MediaPeer) else None

    def peers(self, conversation: str) -> list[MediaPeer]:
        return [p for p in self.router.peers(conversation) if isinstance(p, MediaPeer)]

    async def offer(
        self,
        conversation: str,
        participant: Participant,
        sdp: str,
        *,
        owner: object,
        send: Callable[[dict[str, Any]], None],
    ) -> bool:
        """Apply a client offer, creating the participant's call on its first; False on a
        collision with the gateway's own offer. Raises ``Unavailable`` over the limit."""
        media = self.get(conversation, participant.identity)
        if media is not None and media.owner is not owner:
            # A replaced connection's call ended with it; this one starts its own.
            await self.close(conversation, participant.identity, "replaced")
            media = None
        if media is None:
            if len(self.router) >= self._max:
                raise Unavailable(f"the gateway holds its limit of {self._max} calls; try again later")
            media = self._create(conversation, participant, owner, send)
        try:
            return await media.accept_offer(sdp)
        except CallFailed:
            await self.close(conversation, participant.identity, "failed")
            raise

    def require(self, conversation: str, identity: str, owner: object) -> MediaPeer:
        media = self.get(conversation, identity)
        if media is None or media.owner is not owner:
            raise BadRequest("there is no call yet: send an offer first")
        return media

    async def close(self, conversation: str, identity: str, reason: str, *, owner: object = None) -> bool:
        """End a participant's call (hang-up, leave, disconnect, replaced). With ``owner``,
        only that connection's call: a replaced connection never ends its successor's."""
        media = self.get(conversation, identity)
        if media is None or (owner is not None and media.owner is not owner):
            return False
        self._end(media, reason)
        await media.close()
        return True

    def end_soon(self, conversation: str, identity: str, reason: str) -> None:
        """``close`` without waiting (a replacement must not wait for the old call's teardown)."""
        media = self.get(conversation, identity)
        if media is not None:
            self._end(media, reason)
            self._tasks.spawn(media.close(), f"close call {conversation}/{identity}")

    def _end(self, media: MediaPeer, reason: str) -> None:
        """Stop routing the call at once (a successor's offer starts clean) and say so."""
        self.router.detach(media)
        self._announce(media.conversation, media.identity, NO_MEDIA)
        self._emit(
            [
                ev.CallEnded(
                    conversation=media.conversation, ts=self._clock(), participant=media.participant, reason=reason
                )
            ]
        )

    def media_list(self, conversation: str) -> list[dict[str, Any]]:
        """Who sends what right now (the ``media`` field of ``joined``)."""
        return [{"identity": identity, **state} for identity, state in self._media.get(conversation, {}).items()]

    def media_events(self) -> list[ev.MediaChanged]:
        """What this process's calls send now, as ``media`` events (said again after the
        shared store lost what the home recorded: ``Broker.rebuild``)."""
        ts = self._clock()
        return [
            ev.MediaChanged(conversation=c, ts=ts, identity=identity, audio=state["audio"], video=state["video"])
            for c, known in self._media.items()
            for identity, state in known.items()
        ]

    def forget(self, conversation: str) -> None:
        """The conversation ended here: drop its per-process routing and media state."""
        self._media.pop(conversation, None)
        self.router.forget(conversation)

    # -- internals --------------------------------------------------------------------

    def _create(
        self, conversation: str, participant: Participant, owner: object, send: Callable[[dict[str, Any]], None]
    ) -> MediaPeer:
        media = MediaPeer(
            conversation=conversation,
            participant=participant,
            settings=self.settings,
            send=send,
            on_sources=self.router.source_changed,
            on_negotiated=lambda peer: self.router.reconcile(peer.conversation),
            owner=owner,
            make_relay=self._make_relay,
            video_codec=lambda: self._video_codec(conversation, participant.identity),
        )
        if taps(participant):
            pipeline = self._ears.pipeline(listener_failures=self._pipeline_failures)
            pipeline.timer = self._pipeline_timer
            pipeline.listeners.append(self._speaking_listener(conversation, participant.identity))
            media.pipeline = pipeline
            if self.on_pipeline is not None:
                self.on_pipeline(conversation, pipeline, media.taps)
        self.router.attach(media)
        self._emit([ev.CallStarted(conversation=conversation, ts=self._clock(), participant=participant)])
        return media

    def _video_codec(self, conversation: str, identity: str) -> str | None:
        """The codec another call of the conversation negotiated for video (forwarding needs one)."""
        for peer in self.peers(conversation):
            if peer.identity == identity:
                continue
            for transceiver in peer.pc.getTransceivers():
                if transceiver.kind == "video" and transceiver.currentDirection is not None and transceiver._codecs:
                    return str(transceiver._codecs[0].mimeType.lower())
        return None

    def _speaking_listener(self, conversation: str, identity: str) -> Callable[[SpeechEvent], None]:
        """Tell the conversation when a customer starts and stops talking (agents see it)."""

        def on_event(event: SpeechEvent) -> None:
            if isinstance(event, SpeechStarted | SpeechStopped):
                speaking = isinstance(event, SpeechStarted)
                self._emit(
                    [
                        ev.SpeakingChanged(
                            conversation=conversation, ts=self._clock(), identity=identity, speaking=speaking
                        )
                    ]
                )

        return on_event

    def _sources_changed(self, peer: RoutedPeer) -> None:
        if isinstance(peer, MediaPeer):
            self._announce(peer.conversation, peer.identity, peer.media_state())

    def _announce(self, conversation: str, identity: str, state: dict[str, bool]) -> None:
        """Tell everyone in the conversation what a participant now sends, when it changed."""
        known = self._media.setdefault(conversation, {})
        if known.get(identity, NO_MEDIA) == state:
            if not known:
                del self._media[conversation]
            return
        if state == NO_MEDIA:
            del known[identity]
            if not known:
                del self._media[conversation]
        else:
            known[identity] = state
        self._emit(
            [
                ev.MediaChanged(
                    conversation=conversation,
                    ts=self._clock(),
                    identity=identity,
                    audio=state["audio"],
                    video=state["video"],
                )
            ]
        )


NO_MEDIA = {"audio": False, "video": False}
