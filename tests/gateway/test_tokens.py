"""Join tokens: what is accepted and every way one is refused."""

from __future__ import annotations

import time

import jwt
import pytest

from gateway import tokens
from gateway.errors import Unauthorized
from gateway.messages import Role

SECRET = "s" * 64


def test_round_trip() -> None:
    grant = tokens.verify(SECRET, tokens.issue(SECRET, identity="u1", role="customer", room="r1", name="Ann"))
    assert grant == tokens.Grant(identity="u1", role=Role.CUSTOMER, room="r1", name="Ann")


def test_agent_token_needs_no_room_and_name_defaults_to_identity() -> None:
    grant = tokens.verify(SECRET, tokens.issue(SECRET, identity="a1", role="agent"))
    assert grant.room is None and grant.name == "a1" and grant.role is Role.AGENT


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"identity": "u1", "role": "customer"}, "room"),
        ({"identity": "u1", "role": "admin", "room": "r"}, "role"),
        ({"identity": "u1", "role": "agent", "ttl": 0}, "ttl"),
    ],
)
def test_issue_refuses_bad_grants(kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        tokens.issue(SECRET, **kwargs)  # type: ignore[arg-type]


def _sign(claims: dict[str, object], key: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


NOW = time.time()


@pytest.mark.parametrize(
    ("token", "says"),
    [
        (_sign({"sub": "u", "role": "customer", "room": "r", "exp": NOW - 60}), "expired"),
        (_sign({"sub": "u", "role": "customer", "room": "r", "exp": NOW + 60, "nbf": NOW + 600}), "not yet valid"),
        (_sign({"sub": "u", "role": "customer", "room": "r", "exp": NOW + 60}, "k" * 32), "signature"),
        (_sign({"sub": "u", "role": "customer", "room": "r", "exp": NOW + 60}, SECRET, "HS512"), "HS256"),
        (jwt.encode({"sub": "u", "role": "agent", "exp": NOW + 60}, "", algorithm="none"), "HS256"),
        (_sign({"sub": "u", "role": "customer", "room": "r"}), "'exp'"),
        (_sign({"role": "customer", "room": "r", "exp": NOW + 60}), "'sub'"),
        (_sign({"sub": "u", "room": "r", "exp": NOW + 60}), "'role'"),
        (_sign({"sub": "u", "role": "customer", "exp": NOW + 60}), "room"),
        (_sign({"sub": "u", "role": "root", "exp": NOW + 60}), "role"),
        (_sign({"sub": "", "role": "agent", "exp": NOW + 60}), "sub"),
        (_sign({"sub": 5, "role": "agent", "exp": NOW + 60}), "malformed"),
        (_sign({"sub": "u", "role": "agent", "room": 3, "exp": NOW + 60}), "room"),
        ("a.b.c", "malformed"),
        ("", "malformed"),
    ],
)
def test_verify_refuses(token: str, says: str) -> None:
    with pytest.raises(Unauthorized, match=says) as info:
        tokens.verify(SECRET, token)
    assert SECRET not in str(info.value)
