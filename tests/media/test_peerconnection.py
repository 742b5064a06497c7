"""StablePeerConnection: re-offers keep negotiated RTP parameters (the Chrome renegotiation bug)."""

from __future__ import annotations

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription

from media.peerconnection import StablePeerConnection
from tests.rtc_client import ToneTrack

CHROME_LIKE_EXTMAPS = [
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
]


def chrome_like(sdp: str) -> str:
    """Rewrite an aiortc audio offer's extension ids the way Chrome numbers them."""
    lines = [line for line in sdp.splitlines() if not line.startswith("a=extmap:")]
    at = next(i for i, line in enumerate(lines) if line.startswith("a=mid:"))
    return "\r\n".join([*lines[:at], *CHROME_LIKE_EXTMAPS, *lines[at:]]) + "\r\n"


def extmaps(sdp: str) -> list[dict[str, int]]:
    return [{e.uri: e.id for e in m.rtp.headerExtensions} for m in SessionDescription.parse(sdp).media]


async def test_reoffer_keeps_ids_and_new_sections_agree_with_the_bundle() -> None:
    client, gateway = RTCPeerConnection(), StablePeerConnection()
    try:
        client.addTrack(ToneTrack(440))
        await client.setLocalDescription(await client.createOffer())
        await gateway.setRemoteDescription(RTCSessionDescription(chrome_like(client.localDescription.sdp), "offer"))
        await gateway.setLocalDescription(await gateway.createAnswer())
        answered = extmaps(gateway.localDescription.sdp)[0]
        assert answered == {
            "urn:ietf:params:rtp-hdrext:ssrc-audio-level": 1,
            "urn:ietf:params:rtp-hdrext:sdes:mid": 4,
        }

        gateway.addTransceiver("video", direction="sendrecv")
        reoffer = await gateway.createOffer()
        audio, video = extmaps(reoffer.sdp)
        assert audio == answered  # plain aiortc would offer sdes:mid=1, ssrc-audio-level=2 here
        # One id means one extension across the bundle, and ids the client uses are respected.
        assert video["urn:ietf:params:rtp-hdrext:sdes:mid"] == 4
        assert video["http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"] == 2
        owners: dict[int, str] = {}
        for section in (audio, video):
            for uri, ext_id in section.items():
                assert owners.setdefault(ext_id, uri) == uri
        # The negotiated payload types are kept too.
        first = SessionDescription.parse(gateway.localDescription.sdp).media[0]
        assert SessionDescription.parse(reoffer.sdp).media[0].fmt == first.fmt
        await gateway.setLocalDescription(reoffer)  # aiortc accepts its own rewritten offer
    finally:
        await client.close()
        await gateway.close()


async def test_first_offer_is_plain_aiortc() -> None:
    pc = StablePeerConnection()
    try:
        pc.addTransceiver("audio")
        offer = await pc.createOffer()
        assert extmaps(offer.sdp)[0]["urn:ietf:params:rtp-hdrext:sdes:mid"] == 1
    finally:
        await pc.close()
