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


# Claims with exp/nbf as offsets from the moment the test runs: signed in the test, so
# a long suite cannot let them expire before they are checked.
@pytest.mark.parametrize(
    ("claims", "key", "alg", "says"),
    [
        ({"sub": "u", "role": "customer", "room": "r", "exp": -60}, SECRET, "HS256", "expired"),
        ({"sub": "u", "role": "customer", "room": "r", "exp": 60, "nbf": 600}, SECRET, "HS256", "not yet valid"),
        ({"sub": "u", "role": "customer", "room": "r", "exp": 60}, "k" * 32, "HS256", "signature"),
        ({"sub": "u", "role": "customer", "room": "r", "exp": 60}, SECRET, "HS512", "HS256"),
        ({"sub": "u", "role": "agent", "exp": 60}, "", "none", "HS256"),
        ({"sub": "u", "role": "customer", "room": "r"}, SECRET, "HS256", "'exp'"),
        ({"role": "customer", "room": "r", "exp": 60}, SECRET, "HS256", "'sub'"),
        ({"sub": "u", "room": "r", "exp": 60}, SECRET, "HS256", "'role'"),
        ({"sub": "u", "role": "customer", "exp": 60}, SECRET, "HS256", "room"),
        ({"sub": "u", "role": "root", "exp": 60}, SECRET, "HS256", "role"),
        ({"sub": "", "role": "agent", "exp": 60}, SECRET, "HS256", "sub"),
        ({"sub": 5, "role": "agent", "exp": 60}, SECRET, "HS256", "malformed"),
        ({"sub": "u", "role": "agent", "room": 3, "exp": 60}, SECRET, "HS256", "room"),
        ("a.b.c", SECRET, "HS256", "malformed"),
        ("", SECRET, "HS256", "malformed"),
    ],
)
def test_verify_refuses(claims: dict[str, object] | str, key: str, alg: str, says: str) -> None:
    if isinstance(claims, str):
        token = claims
    else:
        now = time.time()
        timed = {k: now + v if k in ("exp", "nbf") and isinstance(v, int) else v for k, v in claims.items()}
        token = jwt.encode(timed, key, algorithm=alg)
    with pytest.raises(Unauthorized, match=says) as info:
        tokens.verify(SECRET, token)
    assert SECRET not in str(info.value)
