"""The server API: what an app's backend calls to mint tokens and steer conversations.

aiohttp.web on its own port (``--api-host``/``--api-port``), so the signaling port's hot
path is untouched and the API can stay on a private network; off unless an API key is
configured (``--api-key``). Every request but the OpenAPI document needs
``Authorization: Bearer <key>``, compared in constant time against every key; a
client's join token is never one (keys are not JWTs, and none is tried as one).

The HTTP layer is thin: bodies are msgspec structs (unknown fields refused, sizes
bounded), the routes are listed once in ``ROUTES`` (the OpenAPI document is built from
the same table), and every failure becomes one problem+json object in ``_problems``:
``{"type", "title", "status", "detail", "code"}`` with the protocol's stable codes
(``errors.ErrorCode``). What changes a conversation is a small broker method
(``Broker.app_post``, ``app_close``, ``app_escalate``, ``queue_snapshot``); what reads
the past, the records (``Records.conversation``, ``list_conversations``,
``events_after``). docs/api.md documents every endpoint.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import sqlalchemy as sa
from aiohttp import web

from . import __version__, messages, outbox, tokens
from .api_bodies import (
    ConversationBody,
    ConversationPage,
    CustomerBody,
    DeliveryBody,
    DeliveryPage,
    Done,
    ErasedBody,
    EscalateRequest,
    EventPage,
    MessageBody,
    MessageRequest,
    ParticipantBody,
    Problem,
    ProfileRequest,
    QueueBody,
    TokenRequest,
    TokenResponse,
    decode,
)
from .broker import Broker
from .config import Config
from .errors import BadRequest, Conflict, ErrorCode, NotFound, ProtocolError, TooLarge, Unauthorized, Unavailable
from .metrics import Metrics
from .records import OpenConversation, Recorded, Records, RecordsError, SqlRecords
from .schema import RECORD_ID_CHARS

log = logging.getLogger("talkgate.api")

PREFIX = "/api/v1"
#: Request bodies over this get 413 ``too_large`` before they are parsed.
MAX_BODY_BYTES = 64 * 1024
#: Longest id in a path: a record id (``ROOM~hex``); rooms and identities are shorter.
MAX_ID_CHARS = RECORD_ID_CHARS
#: At close, how long requests being answered may take to finish.
SHUTDOWN_SECONDS = 2.0
CONVERSATIONS_PAGE, CONVERSATIONS_PAGE_MAX = 50, 200
EVENTS_PAGE, EVENTS_PAGE_MAX = 100, 500
#: The app's messages come from this participant (``from.role``: ``system``).
APP = messages.SYSTEM
PROBLEM_TYPE = "application/problem+json"
#: A problem's ``type``: where docs/api.md lists the codes (a relative URI reference).
PROBLEM_DOCS = "/docs/api.md"
_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.CONFLICT: 409,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}
#: HTTP errors aiohttp raises itself (no route, wrong method) as problem codes.
_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 413: ErrorCode.TOO_LARGE}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


# -- the server ----------------------------------------------------------------------------


Handler = Callable[["Api", web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: type | None = None
    response: type | None = None
    status: int = 200
    #: The OpenAPI document itself: served without a key.
    public: bool = False


class Api:
    """The API's aiohttp application and its listener (``start``/``close``, ``url``)."""

    def __init__(
        self,
        config: Config,
        broker: Broker,
        records: Records | None,
        metrics: Metrics,
        *,
        page_url: Callable[[], str],
        wake_webhooks: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.broker = broker
        self.records = records
        self.metrics = metrics
        #: The gateway's public URL, for the pages a token opens.
        self._page_url = page_url
        #: Tells the webhook worker a delivery is due (after a retry).
        self._wake_webhooks = wake_webhooks
        self._keys = [key.encode() for key in config.api_keys]
        self.app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY_BYTES)
        self._public: set[str] = set()
        for route in ROUTES:
            self.app.router.add_route(route.method, PREFIX + route.path, _bind(self, route.handler))
            if route.public:
                self._public.add(PREFIX + route.path)
        self._runner: web.AppRunner | None = None
        self.port = config.api_port

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_SECONDS)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.config.api_host, self.config.api_port, reuse_port=self.config.reuse_port or None
        )
        await site.start()
        self.port = self._runner.addresses[0][1]  # the port picked for 0

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        host = self.config.api_host if ":" not in self.config.api_host else f"[{self.config.api_host}]"
        return f"http://{host}:{self.port}{PREFIX}"

    # -- every request: auth, problems, metrics -------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        info = request.match_info.route.resource
        route = info.canonical if info is not None else "unmatched"
        try:
            if info is not None and route not in self._public:
                self._authenticate(request)
            response = await handler(request)
        except ProtocolError as exc:
            response = _problem(exc.code, _STATUS[exc.code], exc.message)
        except web.HTTPException as exc:
            code = _HTTP_CODES.get(exc.status, ErrorCode.BAD_REQUEST)
            response = _problem(code, exc.status, exc.reason)
        except OpenConversation as exc:
            response = _problem(ErrorCode.CONFLICT, 409, f"{exc} (pass force=true to erase all the same)")
        except RecordsError:
            response = _problem(ErrorCode.UNAVAILABLE, 503, "the records are busy; try again")
        except sa.exc.IntegrityError:
            response = _problem(ErrorCode.CONFLICT, 409, "a concurrent change won; try again")
        except Exception:
            log.exception("the API failed on %s %s", request.method, route)
            response = _problem(ErrorCode.INTERNAL, 500, "an internal error; it is logged")
        self.metrics.api_requests.labels(route, str(response.status)).inc()
        self.metrics.api_seconds.labels(route).observe(time.perf_counter() - started)
        return response

    def _authenticate(self, request: web.Request) -> None:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        given = key.strip().encode()
        # Against every key, so the time taken does not tell which one (or how much) matched.
        matched = False
        for known in self._keys:
            matched |= hmac.compare_digest(given, known)
        if scheme.lower() != "bearer" or not given or not matched:
            raise Unauthorized("an API key is required: 'Authorization: Bearer <key>'")

    async def body(self, request: web.Request, kind: type[Any]) -> Any:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise TooLarge(f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise TooLarge(f"the body is over {MAX_BODY_BYTES} bytes") from None
        return decode(raw, kind)

    def _records(self) -> Records:
        if self.records is None:
            raise Unavailable("this gateway keeps no records (--database none)")
        return self.records

    async def _room(self, conversation: str) -> str:
        """The live room a path's id names: a record id's room (while it is open), or the id."""
        if self.records is not None and "~" in conversation:
            row = await self.records.conversation(conversation)
            if row is not None and row["id"] == conversation:
                if row["closed"] is not None:
                    raise NotFound("that conversation has ended")
                return str(row["room"])
        return conversation

    # -- handlers ---------------------------------------------------------------------------

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return _json(openapi_document())

    async def create_token(self, request: web.Request) -> web.StreamResponse:
        body: TokenRequest = await self.body(request, TokenRequest)
        if body.profile is not None and len(json.dumps(body.profile, separators=(",", ":"))) > tokens.MAX_PROFILE_BYTES:
            raise TooLarge(f"the profile is over {tokens.MAX_PROFILE_BYTES} bytes as JSON")
        if body.profile is not None and body.role != "customer":
            raise BadRequest("only a customer's token carries a profile")
        now = int(time.time())
        try:
            token = tokens.issue(
                self.config.token_secret,
                identity=body.identity,
                role=body.role,
                room=body.room,
                name=body.name,
                ttl=body.ttl_seconds,
                now=now,
                profile=body.profile,
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        page = "/agent" if body.role == "agent" else "/"
        url = f"{self._page_url()}{page}?token={token}"
        return _json(TokenResponse(token=token, url=url, expires=now + body.ttl_seconds), 201)

    async def list_conversations(self, request: web.Request) -> web.StreamResponse:
        records = self._records()
        query = request.query
        state = query.get("state")
        if state not in (None, "open", "closed"):
            raise BadRequest("state is open or closed")
        customer = query.get("customer")
        if customer is not None and not 0 < len(customer) <= tokens.MAX_FIELD_CHARS:
            raise BadRequest(f"customer is 1 to {tokens.MAX_FIELD_CHARS} characters")
        limit = _int(query, "limit", CONVERSATIONS_PAGE, 1, CONVERSATIONS_PAGE_MAX)
        since = _int(query, "since", None, 0, 2**63 - 1)
        after = _cursor(query.get("cursor"))
        rows, more = await records.list_conversations(
            customer=customer, open_=None if state is None else state == "open", since=since, after=after, limit=limit
        )
        cursor = _make_cursor(rows[-1]["opened"], rows[-1]["id"]) if more and rows else None
        return _json(ConversationPage([_conversation(row) for row in rows], cursor))

    async def get_conversation(self, request: web.Request) -> web.StreamResponse:
        row = await self._records().conversation(_id(request.match_info["id"]))
        if row is None:
            raise NotFound("no such conversation")
        live = await self.broker.store.participants(row["room"]) if row["closed"] is None else None
        people = [ParticipantBody(p.identity, p.role, p.name) for p in live or []]
        return _json(_conversation(row, people))

    async def list_events(self, request: web.Request) -> web.StreamResponse:
        records = self._records()
        row = await records.conversation(_id(request.match_info["id"]))
        if row is None:
            raise NotFound("no such conversation")
        after = _int(request.query, "after", None, 0, 2**63 - 1)
        limit = _int(request.query, "limit", EVENTS_PAGE, 1, EVENTS_PAGE_MAX)
        found, more = await records.events_after(row["id"], after, limit)
        items = [messages.timeline_event(e.id, e.ts, e.type, e.actor, e.body) for e in found]
        return _json({"conversation": row["id"], "events": items, "next": found[-1].id if more and found else None})

    async def post_message(self, request: web.Request) -> web.StreamResponse:
        conversation = _id(request.match_info["id"])
        body: MessageRequest = await self.body(request, MessageRequest)
        if len(body.text) > self.config.max_chat_chars:
            raise TooLarge(f"the text is over {self.config.max_chat_chars} characters")
        if not body.text.strip():
            raise BadRequest("the text is empty")
        room = await self._room(conversation)
        customer = None
        if self.records is not None and not await self.broker.store.participants(room):
            customer = await self._unattended_customer(room, body.customer)
        message, live = await self.broker.app_post(room, APP, body.text, body.meta, customer)
        return _json({**message.as_dict(room), "live": live}, 201)

    async def _unattended_customer(self, room: str, named: str | None) -> str:
        """Whose conversation the app writes to while nobody is in it: the customer it names
        or else the one of the room's latest record; a known one (NotFound otherwise)."""
        assert self.records is not None
        if len(room) > tokens.MAX_FIELD_CHARS:
            raise NotFound("no such conversation")  # not a room a token can name
        latest = await self._latest(room)
        customer = named or (latest.customer if latest is not None else None)
        if customer is None:
            raise NotFound("nobody is in that conversation: name a known 'customer' to start it")
        if latest is not None and latest.customer not in (None, customer):
            # Its record may be open or still resumable: another customer's thread.
            raise Conflict(f"the room's conversation is another customer's ({latest.customer!r}): use another room")
        if await self.records.customer(customer) is None:
            raise NotFound(f"no such customer {customer!r} (a customer is known once they have joined)")
        return customer

    async def _latest(self, room: str) -> Recorded | None:
        """The room's current or latest conversation record (None: none, or no records)."""
        latest = await self.records.record(room) if self.records is not None else None
        return latest if latest is not None and latest.room == room else None

    async def close_conversation(self, request: web.Request) -> web.StreamResponse:
        room = await self._room(_id(request.match_info["id"]))
        latest = await self._latest(room)
        recorded_open = latest is not None and latest.closed is None
        if not await self.broker.app_close(room, recorded_open=recorded_open):
            raise NotFound("that conversation is not live")
        return _json(Done(room, "closed"))

    async def escalate(self, request: web.Request) -> web.StreamResponse:
        conversation = _id(request.match_info["id"])
        body: EscalateRequest = await self.body(request, EscalateRequest)
        room = await self._room(conversation)
        if not await self.broker.store.participants(room):
            raise NotFound("that conversation is not live")
        if not await self.broker.app_escalate(room, body.reason):
            raise Conflict("nothing to do: it is waiting already, an agent is in it, or it has no customer")
        return _json(Done(room, "queued"))

    async def queue(self, request: web.Request) -> web.StreamResponse:
        return _json(await self.broker.queue_snapshot())

    async def get_customer(self, request: web.Request) -> web.StreamResponse:
        identity = _id(request.match_info["identity"], "identity")
        known = await self._records().customer(identity)
        if known is None:
            raise NotFound("no such customer")
        return _json(CustomerBody(known.identity, known.name, known.profile, known.first_seen, known.last_seen))

    async def put_customer(self, request: web.Request) -> web.StreamResponse:
        identity = _id(request.match_info["identity"], "identity")
        records = self._records()
        body: ProfileRequest = await self.body(request, ProfileRequest)
        if len(json.dumps(body.profile, separators=(",", ":"))) > tokens.MAX_PROFILE_BYTES:
            raise TooLarge(f"the profile is over {tokens.MAX_PROFILE_BYTES} bytes as JSON")
        if identity in tokens.RESERVED_IDENTITIES:
            raise BadRequest(f"the identity {identity!r} is reserved for the gateway")
        known = await records.set_profile(identity, body.profile, body.name)
        return _json(CustomerBody(known.identity, known.name, known.profile, known.first_seen, known.last_seen))

    async def list_deliveries(self, request: web.Request) -> web.StreamResponse:
        records = self._outbox()
        status = request.query.get("status")
        if status is not None and status not in outbox.STATUSES:
            raise BadRequest(f"status is one of {', '.join(outbox.STATUSES)}")
        after = _int(request.query, "after", None, 0, 2**63 - 1)
        limit = _int(request.query, "limit", EVENTS_PAGE, 1, EVENTS_PAGE_MAX)
        found, more = await records.deliveries(status, after, limit)
        page = {"deliveries": [d.as_dict() for d in found], "next": found[-1].id if more and found else None}
        return _json(page)

    async def retry_delivery(self, request: web.Request) -> web.StreamResponse:
        raw = request.match_info["id"]
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            raise NotFound("no such delivery")
        delivery = await self._outbox().retry_delivery(int(raw))
        if delivery is None:
            raise NotFound("no such delivery")
        if self._wake_webhooks is not None:
            self._wake_webhooks()
        return _json(delivery.as_dict())

    def _outbox(self) -> SqlRecords:
        if not isinstance(self.records, SqlRecords):
            raise Unavailable("this gateway keeps no records (--database none), so no webhook outbox")
        return self.records

    async def delete_customer(self, request: web.Request) -> web.StreamResponse:
        identity = _id(request.match_info["identity"], "identity")
        force = request.query.get("force", "false")
        if force not in ("true", "false"):
            raise BadRequest("force is true or false")
        removed = await self._records().erase_customer(identity, force=force == "true")
        counts = (removed.customers, removed.conversations, removed.events, removed.events_elsewhere)
        return _json(ErasedBody(*counts, list(removed.recordings)))


def _bind(api: Api, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await handler(api, request)

    return handle


def _problem(code: ErrorCode, status: int, detail: str) -> web.Response:
    title = code.replace("_", " ")
    problem = Problem(type=f"{PROBLEM_DOCS}#{code}", title=title, status=status, detail=detail, code=code)
    return web.Response(body=msgspec.json.encode(problem), status=status, content_type=PROBLEM_TYPE)


def _id(value: str, what: str = "conversation") -> str:
    """A path's id: no record has one that is empty, longer, or with control characters."""
    limit = MAX_ID_CHARS if what == "conversation" else tokens.MAX_FIELD_CHARS
    if not 0 < len(value) <= limit or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise NotFound(f"no such {what}")
    return value


def _int(query: Any, name: str, default: int | None, low: int, high: int) -> Any:
    raw = query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19) or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _make_cursor(opened: int, conversation: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([opened, conversation]).encode()).decode().rstrip("=")


def _cursor(raw: str | None) -> tuple[int, str] | None:
    """A ``cursor`` from a previous page (opaque to clients: base64url of [opened, id])."""
    if raw is None:
        return None
    try:
        opened, conversation = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, TypeError, binascii.Error):
        raise BadRequest("cursor is not one this API returned") from None
    if type(opened) is not int or not isinstance(conversation, str) or not 0 <= opened < 2**63:
        raise BadRequest("cursor is not one this API returned")
    return opened, conversation[:MAX_ID_CHARS]


def _conversation(row: dict[str, Any], participants: list[ParticipantBody] | None = None) -> ConversationBody:
    return ConversationBody(
        id=row["id"],
        room=row["room"],
        state="open" if row["closed"] is None else "closed",
        customer=row["customer"],
        opened=row["opened"],
        closed=row["closed"],
        ended=row["ended"],
        channels=list(row["channels"] or []),
        bot=row["bot"],
        agents=list(row["agents"] or []),
        participants=participants,
    )


# -- the routes, in one place (the OpenAPI document lists the same) -------------------------

ROUTES: tuple[Route, ...] = (
    Route("GET", "/openapi.json", Api.openapi, "This document (no key needed)", public=True),
    Route("POST", "/tokens", Api.create_token, "Mint a join token and page URL", TokenRequest, TokenResponse, 201),
    Route("GET", "/conversations", Api.list_conversations, "Conversations, newest first", None, ConversationPage),
    Route("GET", "/conversations/{id}", Api.get_conversation, "One conversation", None, ConversationBody),
    Route("GET", "/conversations/{id}/events", Api.list_events, "The timeline, oldest first", None, EventPage),
    Route(
        "POST",
        "/conversations/{id}/messages",
        Api.post_message,
        "A chat from the app",
        MessageRequest,
        MessageBody,
        201,
    ),
    Route("POST", "/conversations/{id}/close", Api.close_conversation, "Everyone leaves", None, Done),
    Route("POST", "/conversations/{id}/escalate", Api.escalate, "Into the agent queue", EscalateRequest, Done),
    Route("GET", "/queue", Api.queue, "The agent queue with customer cards", None, QueueBody),
    Route("GET", "/customers/{identity}", Api.get_customer, "A customer's profile", None, CustomerBody),
    Route("PUT", "/customers/{identity}", Api.put_customer, "Replace a profile", ProfileRequest, CustomerBody),
    Route("DELETE", "/customers/{identity}", Api.delete_customer, "Erase a customer", None, ErasedBody),
    Route("GET", "/webhooks/deliveries", Api.list_deliveries, "Webhook deliveries, by id", None, DeliveryPage),
    Route("POST", "/webhooks/deliveries/{id}/retry", Api.retry_delivery, "Send a delivery again", None, DeliveryBody),
)

_openapi: dict[str, Any] | None = None


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1, its schemas from the msgspec structs (built once)."""
    global _openapi
    if _openapi is not None:
        return _openapi
    types = [t for r in ROUTES for t in (r.body, r.response) if t is not None]
    (_, *_refs), components = msgspec.json.schema_components(
        [*types, Problem], ref_template="#/components/schemas/{name}"
    )
    paths: dict[str, dict[str, Any]] = {}
    problem = {
        "description": "A problem (see docs/api.md)",
        "content": {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    for route in ROUTES:
        operation: dict[str, Any] = {"summary": route.summary, "responses": {"default": problem}}
        ok: dict[str, Any] = {"description": "OK"}
        if route.response is not None:
            schema = {"$ref": f"#/components/schemas/{route.response.__name__}"}
            ok["content"] = {"application/json": {"schema": schema}}
        operation["responses"][str(route.status)] = ok
        if route.body is not None:
            schema = {"$ref": f"#/components/schemas/{route.body.__name__}"}
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        if not route.public:
            operation["security"] = [{"apiKey": []}]
        paths.setdefault(PREFIX + route.path, {})[route.method.lower()] = operation
    _openapi = {
        "openapi": "3.1.0",
        "info": {"title": "talkgate server API", "version": __version__},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
    }
    return _openapi
