"""Join tokens: HS256 JWTs signed with the server secret.

Claims: ``sub`` (identity), ``role`` (customer|agent), ``room`` (required for
customers, optional for agents), ``name`` (display name), ``exp``. A token is
the only thing a customer needs to enter its room, so verification is strict:
one algorithm (no ``none``, no algorithm confusion), ``exp`` required, ``nbf``
honoured, and error messages that never echo the token or the secret.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import jwt

from .errors import Unauthorized
from .messages import Role

ALGORITHM = "HS256"
#: Clock skew tolerated between the token issuer and this gateway.
LEEWAY_SECONDS = 5
MAX_FIELD_CHARS = 128
#: Identities the gateway uses itself (the speech bot, gateway notices): never granted,
#: so a token cannot make its holder the bot or the gateway.
RESERVED_IDENTITIES = frozenset({"bot", "system"})
#: The ``profile`` claim's size limit, as compact JSON.
MAX_PROFILE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows: who, in which role, in which room."""

    identity: str
    role: Role
    room: str | None
    name: str
    #: What the app says about a customer (phone, email, plan, CRM id…): kept in the records.
    profile: dict[str, Any] | None = None


def issue(
    secret: str,
    *,
    identity: str,
    role: str,
    room: str | None = None,
    name: str | None = None,
    ttl: int = 3600,
    now: float | None = None,
    profile: dict[str, Any] | None = None,
) -> str:
    """Mint a join token (used by ``talkgate token`` and by apps' backends)."""
    if role not in (Role.CUSTOMER, Role.AGENT):
        raise ValueError(f"role must be customer or agent, not {role!r}")
    if role == Role.CUSTOMER and not room:
        raise ValueError("a customer token needs a room")
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    if identity in RESERVED_IDENTITIES:
        raise ValueError(f"the identity {identity!r} is reserved for the gateway")
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {
        "sub": identity,
        "role": role,
        "name": name or identity,
        "iat": issued,
        "exp": issued + ttl,
    }
    if room:
        claims["room"] = room
    if profile is not None:
        _check_profile(profile, ValueError)
        claims["profile"] = profile
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str) -> Grant:
    """Check a token's signature, lifetime and claims; raise ``Unauthorized``."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub", "role"]},
            leeway=LEEWAY_SECONDS,
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("token expired") from exc
    except jwt.ImmatureSignatureError as exc:
        raise Unauthorized("token not yet valid") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthorized(f"token is missing the {exc.claim!r} claim") from exc
    except jwt.InvalidSignatureError as exc:
        raise Unauthorized("token signature is invalid") from exc
    except jwt.InvalidAlgorithmError as exc:
        raise Unauthorized(f"token must be signed with {ALGORITHM}") from exc
    except jwt.InvalidTokenError as exc:
        raise Unauthorized("token is malformed") from exc
    identity, role, room, name = (
        claims.get("sub"),
        claims.get("role"),
        claims.get("room"),
        claims.get("name"),
    )
    if not isinstance(identity, str) or not 0 < len(identity) <= MAX_FIELD_CHARS:
        raise Unauthorized("token 'sub' must be a non-empty string")
    if identity in RESERVED_IDENTITIES:
        raise Unauthorized(f"token 'sub' {identity!r} is reserved for the gateway")
    if role not in (Role.CUSTOMER, Role.AGENT):
        raise Unauthorized("token 'role' must be customer or agent")
    if room is not None and (not isinstance(room, str) or not 0 < len(room) <= MAX_FIELD_CHARS):
        raise Unauthorized("token 'room' must be a non-empty string")
    if role == Role.CUSTOMER and room is None:
        raise Unauthorized("a customer token must name a room")
    if name is not None and not isinstance(name, str):
        raise Unauthorized("token 'name' must be a string")
    profile = claims.get("profile")
    if profile is not None:
        _check_profile(profile, Unauthorized)
    return Grant(
        identity=identity, role=Role(role), room=room, name=(name or identity)[:MAX_FIELD_CHARS], profile=profile
    )


def _check_profile(profile: object, error: type[Exception]) -> None:
    """A profile is a JSON object of at most ``MAX_PROFILE_BYTES`` (it is stored per customer)."""
    if not isinstance(profile, dict):
        raise error("token 'profile' must be a JSON object")
    if len(json.dumps(profile, separators=(",", ":"))) > MAX_PROFILE_BYTES:
        raise error(f"token 'profile' is over {MAX_PROFILE_BYTES} bytes")
