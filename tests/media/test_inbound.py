"""The inbound audio adapters: reordering, RTP parsing, stream time (the call tests run them for real)."""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pylibsrtp
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from hypothesis import given
from hypothesis import strategies as st

from media.inbound import MAX_ROUTES, FastRtp, InboundAudio, ReorderBuffer, Unprotect, parse_rtp


def test_in_order_packets_come_straight_out() -> None:
    buffer: ReorderBuffer[int] = ReorderBuffer(depth=3)
    assert [buffer.add(seq, seq) for seq in (10, 11, 12)] == [[10], [11], [12]]
    assert buffer.lost == buffer.late == 0


def test_a_swapped_pair_is_put_back_in_order_without_waiting_longer() -> None:
    buffer: ReorderBuffer[int] = ReorderBuffer(depth=3)
    assert buffer.add(1, 1) == [1]
    assert buffer.add(3, 3) == []  # 2 is missing: hold 3
    assert buffer.add(2, 2) == [2, 3]


def test_a_lost_packet_is_given_up_after_depth_later_ones() -> None:
    buffer: ReorderBuffer[int] = ReorderBuffer(depth=3)
    buffer.add(1, 1)
    assert buffer.add(3, 3) == buffer.add(4, 4) == buffer.add(5, 5) == []
    assert buffer.add(6, 6) == [3, 4, 5, 6]
    assert buffer.lost == 1
    assert buffer.add(2, 2) == [] and buffer.late == 1  # too late now
    assert buffer.add(6, 6) == [] and buffer.late == 2  # a duplicate


def test_in_order_items_are_taken_without_add_until_a_gap_is_held() -> None:
    buffer: ReorderBuffer[str] = ReorderBuffer(depth=3)
    assert buffer.add(65534, "a") == ["a"]  # the first sets the start
    assert buffer.take_in_order(65535) and buffer.take_in_order(0)  # in order, across the wrap
    assert not buffer.take_in_order(2)  # 1 is missing: add decides
    assert buffer.add(2, "c") == []
    assert not buffer.take_in_order(1)  # the next one, but 2 is held: add releases both
    assert buffer.add(1, "b") == ["b", "c"]
    assert buffer.take_in_order(3)


def test_sequence_numbers_wrap() -> None:
    buffer: ReorderBuffer[int] = ReorderBuffer(depth=3)
    out = [x for seq in (65534, 65535, 1, 0, 2) for x in buffer.add(seq, seq)]
    assert out == [65534, 65535, 0, 1, 2]


@given(st.permutations(list(range(20))))
def test_any_shuffle_within_the_depth_comes_out_complete_and_in_order(order: list[int]) -> None:
    # Shuffle only locally (what networks do): each packet at most 3 places from home.
    local = sorted(range(20), key=lambda i: i + (order[i] % 4))
    buffer: ReorderBuffer[int] = ReorderBuffer(depth=3)
    out = [x for seq in local for x in buffer.add(seq + 100, seq)]
    assert out == sorted(out) and len(set(out)) == len(out)
    # Only packets older than the very first one to arrive can be late (the stream starts there).
    assert len(out) + buffer.lost + buffer.late == 20 and buffer.late <= 3 and all(x >= local[0] for x in out)


def _extensions() -> HeaderExtensionsMap:
    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(
            headerExtensions=[
                RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
                RTCRtpHeaderExtensionParameters(id=2, uri="urn:ietf:params:rtp-hdrext:ssrc-audio-level"),
            ]
        )
    )
    return extensions


@given(
    seq=st.integers(0, 0xFFFF),
    timestamp=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(min_size=1, max_size=200),
    csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=3),
    mid=st.none() | st.text("0123456789", min_size=1, max_size=3),
    padding=st.integers(0, 12),
)
def test_parse_rtp_reads_what_aiortc_reads(
    seq: int, timestamp: int, ssrc: int, payload: bytes, csrcs: list[int], mid: str | None, padding: int
) -> None:
    extensions = _extensions()
    packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=timestamp, ssrc=ssrc, payload=payload)
    packet.csrc = csrcs
    packet.extensions.mid = mid
    packet.padding_size = padding
    data = packet.serialize(extensions)
    theirs = RtpPacket.parse(data, extensions)
    ours = parse_rtp(data)
    assert ours is not None
    assert (ours.payload_type, ours.sequence_number, ours.timestamp, ours.ssrc, ours.payload) == (
        theirs.payload_type,
        theirs.sequence_number,
        theirs.timestamp,
        theirs.ssrc,
        theirs.payload,
    )


def test_malformed_rtp_is_refused() -> None:
    good = RtpPacket(payload_type=111, sequence_number=1, timestamp=2, ssrc=3, payload=b"abc").serialize()
    assert parse_rtp(good[:11]) is None  # shorter than the fixed header
    assert parse_rtp(bytes([0x40]) + good[1:]) is None  # version 1
    assert parse_rtp(bytes([good[0] | 0x0F]) + good[1:]) is None  # 15 CSRCs that are not there
    extended = bytes([good[0] | 0x10]) + good[1:12] + struct.pack("!HH", 0xBEDE, 50)
    assert parse_rtp(extended) is None  # an extension longer than the packet


def test_stream_time_starts_at_zero_and_survives_the_32_bit_wrap() -> None:
    inbound = InboundAudio.__new__(InboundAudio)  # only the clock arithmetic
    inbound._origin, inbound._last, inbound._wraps = None, 0, 0
    start = 0xFFFFFFFF - 959
    times = [inbound._stream_time((start + k * 960) & 0xFFFFFFFF) for k in range(4)]
    assert times == [0, 960, 1920, 2880]
    assert inbound._stream_time((start + 960) & 0xFFFFFFFF) == 960  # a late one from before the wrap


def test_fast_rtp_routes_are_bounded() -> None:
    """Bug: a route was added per new SSRC and never removed: a client sending a new SSRC
    per packet grew the gateway for as long as the call lasted."""
    connection = SimpleNamespace(data_received=lambda data, component: None)  # aioice's ICE connection
    fast = FastRtp(SimpleNamespace(transport=SimpleNamespace(_connection=connection)))  # type: ignore[arg-type]

    def handler(packet: Any, arrived: float) -> None:
        pass

    for ssrc in range(1000):
        fast.add_route(ssrc, handler)
    fast.add_route(999, handler)  # known: nothing dropped
    assert list(fast.routes) == list(range(1000 - MAX_ROUTES, 1000))


def _srtp(direction: int) -> pylibsrtp.Session:
    key = bytes(range(16)) + bytes(range(100, 112))  # AES-128-GCM
    policy = pylibsrtp.Policy(key=key, ssrc_type=direction, srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM)
    return pylibsrtp.Session(policy)


def test_fast_rtp_unprotects_with_libsrtp_and_drops_what_it_refuses() -> None:
    """Good packets reach the handler as the session's own ``unprotect`` gives them; a forged
    one and one too long for libsrtp's buffer are dropped. Bug: pylibsrtp raised ValueError
    for a datagram over 1500 bytes, out of the datagram callback to the loop's exception
    handler: a logged traceback for every such packet with the stream's SSRC."""
    tx, rx = _srtp(pylibsrtp.Policy.SSRC_ANY_OUTBOUND), _srtp(pylibsrtp.Policy.SSRC_ANY_INBOUND)
    queued: list[bytes] = []
    connection = SimpleNamespace(data_received=lambda data, component: queued.append(data))
    fast = FastRtp(SimpleNamespace(transport=SimpleNamespace(_connection=connection), _rx_srtp=rx))  # type: ignore[arg-type]
    got: list[Any] = []
    fast.add_route(7, lambda packet, arrived: got.append(packet))
    plain = [
        RtpPacket(payload_type=111, sequence_number=i, timestamp=960 * i, ssrc=7, payload=bytes([i]) * 60)
        for i in range(3)
    ]
    wire = [tx.protect(p.serialize()) for p in plain]
    fast.data_received(wire[0], 1)
    forged = wire[1][:12] + bytes(len(wire[1]) - 12)  # the header of a real one, the rest zeros
    fast.data_received(forged, 1)
    fast.data_received(wire[1][:12] + bytes(2000), 1)  # over libsrtp's 1500-byte buffer
    fast.data_received(wire[1], 1)
    fast.data_received(wire[2], 1)
    assert [(p.sequence_number, p.payload) for p in got] == [(i, bytes([i]) * 60) for i in range(3)]
    assert queued == [] and fast.packets == 3
    # The same bytes as pylibsrtp's own method gives.
    reference = _srtp(pylibsrtp.Policy.SSRC_ANY_INBOUND)
    unprotect = Unprotect(_srtp(pylibsrtp.Policy.SSRC_ANY_INBOUND))
    assert [unprotect(w) for w in wire] == [reference.unprotect(w) for w in wire]
