"""An ``RTCPeerConnection`` whose re-offers keep what was already negotiated.

aiortc's ``createOffer`` resets every transceiver to its default codec list and
RTP header-extension ids, including m-lines negotiated earlier with other ids.
Browsers refuse such a re-offer ("RTP extension ID reassignment not supported"),
which breaks every gateway-initiated renegotiation (adding the agent's video to a
customer's call). This subclass, the one adapter for it:

- keeps the negotiated codecs and extension ids of m-lines already negotiated;
- gives new m-lines the ids the BUNDLE already uses for the same extension, and
  free ids for extensions not used yet, so one id never means two extensions.

The transceivers' own parameters are updated too, so what is sent matches the offer.
"""

from __future__ import annotations

from aiortc import RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpHeaderExtensionParameters
from aiortc.sdp import SessionDescription

#: One-byte header extension ids (RFC 8285).
_EXTENSION_IDS = range(1, 15)


class StablePeerConnection(RTCPeerConnection):
    async def createOffer(self) -> RTCSessionDescription:
        negotiated: dict[RTCRtpTransceiver, tuple[list[RTCRtpCodecParameters], list[RTCRtpHeaderExtensionParameters]]]
        negotiated = {
            t: (list(t._codecs), list(t._headerExtensions))
            for t in self.getTransceivers()
            if t.currentDirection is not None and t._codecs
        }
        offer = await super().createOffer()
        if not negotiated:
            return offer
        # New transceivers get their mid only in setLocalDescription: match by m-line.
        by_mline = {t._get_mline_index(): t for t in self.getTransceivers()}
        ids: dict[str, int] = {}
        for _, extensions in negotiated.values():
            for ext in extensions:
                ids.setdefault(ext.uri, ext.id)
        if self.remoteDescription is not None:
            # Ids the other side uses for extensions we did not take stay reserved too.
            for media in SessionDescription.parse(self.remoteDescription.sdp).media:
                for ext in media.rtp.headerExtensions:
                    ids.setdefault(ext.uri, ext.id)
        description = SessionDescription.parse(offer.sdp)
        for index, media in enumerate(description.media):
            transceiver = by_mline.get(index)
            if transceiver is None:
                continue
            if transceiver in negotiated:
                transceiver._codecs, transceiver._headerExtensions = negotiated[transceiver]
            else:
                transceiver._headerExtensions = [_consistent(ext, ids) for ext in transceiver._headerExtensions]
            media.rtp.codecs = transceiver._codecs
            media.rtp.headerExtensions = transceiver._headerExtensions
            media.fmt = [codec.payloadType for codec in transceiver._codecs]
        return RTCSessionDescription(sdp=str(description), type="offer")


def _consistent(ext: RTCRtpHeaderExtensionParameters, ids: dict[str, int]) -> RTCRtpHeaderExtensionParameters:
    """The id this extension already has in the bundle, or one no other extension uses."""
    if ext.uri not in ids:
        used = set(ids.values())
        ids[ext.uri] = ext.id if ext.id not in used else next(i for i in _EXTENSION_IDS if i not in used)
    return RTCRtpHeaderExtensionParameters(id=ids[ext.uri], uri=ext.uri)
