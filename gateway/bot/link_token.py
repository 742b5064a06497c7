"""The gateway's credential on its bot link: a short-lived HS256 JWT in the websocket
upgrade's ``Authorization: Bearer`` header, signed with ``--bot-secret``.

A bot that checks it knows the call comes from this gateway (not from anyone who found
its URL), for which conversation and customer, and that the token is fresh. Claims:
``iss`` (``talkgate``), ``aud`` (the bot URL the gateway dials), ``conversation``,
``customer`` (the customer's identity), ``iat``, ``exp`` (``TTL_SECONDS`` later; a new
token for every connection attempt). Verification is what a bot does with PyJWT, shown
in docs/bot-protocol.md; ``verify`` here is the same, for the tests.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

ALGORITHM = "HS256"
ISSUER = "talkgate"
#: A token is good for this long after it was made (it is used at once).
TTL_SECONDS = 60
#: Clock skew tolerated between the gateway and the bot.
LEEWAY_SECONDS = 5


def issue(secret: str, *, url: str, conversation: str, customer: str, now: float | None = None) -> str:
    """The token for one connection attempt to the bot at ``url``."""
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": ISSUER,
        "aud": url,
        "conversation": conversation,
        "customer": customer,
        "iat": issued,
        "exp": issued + TTL_SECONDS,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str, *, url: str) -> dict[str, Any]:
    """The claims of a valid token for the bot at ``url``; ``jwt.InvalidTokenError`` if
    it is forged, expired, for another bot, or not the gateway's."""
    claims: dict[str, Any] = jwt.decode(
        token,
        secret,
        algorithms=[ALGORITHM],
        audience=url,
        issuer=ISSUER,
        leeway=LEEWAY_SECONDS,
        options={"require": ["exp", "iat", "iss", "aud", "conversation", "customer"]},
    )
    return claims
