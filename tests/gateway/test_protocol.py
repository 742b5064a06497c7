"""The sans-I/O signaling protocol, driven by plain bytes and a fake clock value."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from gateway import messages
from gateway.errors import BadRequest, ProtocolError, RateLimited, TooLarge, Unauthorized
from gateway.protocol import SignalingProtocol, State, TokenBucket


def make(**kwargs: float) -> SignalingProtocol:
    settings = {"max_message_bytes": 1024, "rate": 10.0, "burst": 5, "now": 0.0} | kwargs
    return SignalingProtocol(**settings)  # type: ignore[arg-type]


def test_only_join_and_ping_before_joining() -> None:
    p = make()
    assert isinstance(p.receive(b'{"type":"ping"}', 0), messages.Ping)
    assert isinstance(p.receive(b'{"type":"chat","text":"hi"}', 0), Unauthorized)
    join = p.receive(b'{"type":"join","token":"t","extra":{"ignored":true}}', 0)
    assert join == messages.Join(token="t")
    p.joined()
    assert p.state is State.JOINED
    assert p.receive(b'{"type":"chat","text":"hi"}', 0) == messages.Chat(text="hi")
    assert isinstance(p.receive(b'{"type":"join","token":"t"}', 0), BadRequest)


def test_left_returns_to_awaiting_join_and_closed_ignores_frames() -> None:
    p = make()
    p.joined()
    p.left()
    assert p.state is State.AWAITING_JOIN
    p.close()
    assert p.receive(b'{"type":"ping"}', 0) is None


def test_size_limit_is_checked_before_parsing() -> None:
    p = make(max_message_bytes=16)
    error = p.receive(b"[" * 17, 0)  # would be a parse error if parsed
    assert isinstance(error, TooLarge)
    assert "17 bytes" in error.message


def test_errors_name_the_problem() -> None:
    p = make(burst=100)
    cases = {
        b"nope": "not valid JSON",
        b"[]": "JSON object",
        b"{}": "no 'type'",
        b'{"type":"dance"}': "unknown message type 'dance'",
        b'{"type":"chat","text":1}': "`$.text`",
        b'{"type":"accept"}': "`conversation`",
    }
    for frame, says in cases.items():
        error = p.receive(frame, 0)
        assert isinstance(error, BadRequest), frame
        assert says in error.message, (frame, error.message)


def test_rate_limit_refills_over_time() -> None:
    p = make(rate=10.0, burst=3)
    frames = [p.receive(b'{"type":"ping"}', 0.0) for _ in range(4)]
    assert [type(f) for f in frames] == [messages.Ping] * 3 + [RateLimited]
    assert isinstance(p.receive(b'{"type":"ping"}', 0.05), RateLimited)  # half a token
    assert isinstance(p.receive(b'{"type":"ping"}', 0.1), messages.Ping)


def test_token_bucket_never_exceeds_burst() -> None:
    bucket = TokenBucket(rate=100.0, burst=2, now=0.0)
    assert bucket.take(1000.0) and bucket.take(1000.0)
    assert not bucket.take(1000.0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


STRING_FIELDS = ["text", "token", "room", "identity", "name", "conversation", "sdp", "candidate", "reason", "id"]
NOT_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]


def _with_bad_utf8(mtype: str, field: str, junk: bytes) -> bytes:
    """A message whose string field carries bytes that are not UTF-8 (a binary frame can)."""
    return b'{"type":"%s","%s":"a%sb"}' % (mtype.encode(), field.encode(), junk)


@given(
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.builds(
        _with_bad_utf8,
        st.sampled_from(messages.CLIENT_TYPES),
        st.sampled_from(STRING_FIELDS),
        st.sampled_from(NOT_UTF8),
    )
)
def test_any_frame_is_a_message_or_an_error_never_an_exception(frame: bytes) -> None:
    p = make(burst=1)
    result = p.receive(frame, 0)
    assert isinstance(result, messages.ClientMessage | ProtocolError)


@given(
    st.sampled_from(messages.CLIENT_TYPES),
    st.dictionaries(st.sampled_from(["text", "token", "conversation", "room"]), json_values),
)
def test_typed_frames_with_random_fields_never_raise(mtype: str, fields: dict[str, object]) -> None:
    p = make(burst=1)
    p.joined()
    result = p.receive(json.dumps({"type": mtype, **fields}).encode(), 0)
    assert isinstance(result, messages.ClientMessage | ProtocolError)
