"""Property-based fuzzing of the bot protocol parsers: whatever a bot sends becomes an
action or a ``BotProtocolError``, never another exception (which would end the link)."""

from __future__ import annotations

import json
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.bot.native import Action, BotProtocolError, NativeProtocol
from gateway.bot.twilio import TwilioProtocol
from gateway.messages import Participant

ACTIONS = tuple(arg for union in get_args(Action) for arg in (get_args(union) or (union,)))
CUSTOMER = Participant("u1", "customer", "Ann")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
NATIVE_TYPES = ["audio.format", "chat", "mark", "clear", "transcript", "transfer", "upgrade", "hangup", "x"]
TWILIO_EVENTS = ["media", "mark", "clear", "stop", "x"]


def native_like(mtype: str, fields: dict[str, object]) -> str:
    return json.dumps({"type": mtype, **fields})


def twilio_like(event: str, inner: object, fields: dict[str, object]) -> str:
    return json.dumps({"event": event, event: inner, **fields})


frames = (
    st.binary(max_size=300)
    | st.text(max_size=300)
    | json_values.map(json.dumps)
    | st.builds(native_like, st.sampled_from(NATIVE_TYPES), st.dictionaries(st.text(max_size=12), json_values))
    | st.builds(
        twilio_like, st.sampled_from(TWILIO_EVENTS), json_values, st.dictionaries(st.text(max_size=12), json_values)
    )
    | st.sampled_from(["[" * 100_000 + "]" * 100_000, '{"event":"media","media":{"payload":"%%%"}}'])
)


@pytest.mark.parametrize("protocol_class", [NativeProtocol, TwilioProtocol])
@given(frame=frames)
def test_any_bot_frame_is_an_action_or_a_protocol_error(protocol_class: type, frame: str | bytes) -> None:
    protocol = protocol_class("r1", CUSTOMER, 16_000, 20)
    try:
        action = protocol.parse(frame)
    except BotProtocolError:
        return  # answered, logged and counted by the connector
    assert isinstance(action, ACTIONS)
