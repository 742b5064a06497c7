"""Calls on the conversation's home node, whichever node a participant is connected to.

A conversation's media lives on one node, its **home** (``Store.home``: the node of its
first join, or, once that node is dead or draining, the node asking next). A participant
whose websocket is on another node keeps it there; that node forwards its call
signaling (``offer``, ``answer``, ``candidate``, ``hangup``, ``upgrade``,
``upgrade.reply``) to the home node as a ``CallRequest`` over the bus, and the home
node's peer connection answers through the bus to that one participant (``RemoteParty``),
with the home node's ICE candidates: the browser's media goes straight to the home node
while its signaling stays where it is. The bot is dialled from the home node too.

``CallHomes`` is both halves: on a participant's node, where each of its calls went
(``forward``, ``home_of_call``); on the home node, the ``RemoteParty`` that owns each
call made from elsewhere (``party``).
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from . import messages
from .delivery import Remote
from .messages import Participant


class Op:
    #: A client's call message (``CallRequest.message``) to apply at home.
    MESSAGE = "message"
    #: The participant's connection is gone or left: its call ends (``reason``).
    END = "end"
    #: Dial the bot for this customer (it joined through another node).
    BOT = "bot"


class CallRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    op: str
    participant: Participant
    #: Which connection on the sending node (a new connection's offer replaces the call of
    #: the one before, as on one node).
    connection: int
    #: ``Op.MESSAGE``: the client message, msgpack (``messages.ClientMessage``).
    message: bytes = b""
    reason: str = ""


_encode = msgspec.msgpack.Encoder().encode
_request = msgspec.msgpack.Decoder(CallRequest).decode
_client_message: msgspec.msgpack.Decoder[messages.ClientMessage] = msgspec.msgpack.Decoder(messages.ClientMessage)


class Link(Protocol):
    """The bus, as far as calls need it."""

    node: str

    def call(self, home: str, conversation: str, request: bytes) -> None: ...

    def to(self, node: str, conversation: str, identity: str, data: bytes, mtype: str) -> None: ...

    def home_of(self, conversation: str) -> str:
        """The conversation's home as this node last heard ("" unknown)."""


class Cluster(Remote, Link, Protocol):
    """The other nodes (``bus.Bus``): delivery and calls."""


class RemoteParty:
    """A participant connected to another node, as the owner of its call here: what the
    call sends (answers, the gateway's offers) goes back to that node for it."""

    def __init__(self, link: Link, origin: str, conversation: str, identity: str, connection: int) -> None:
        self.link = link
        self.origin = origin
        self.conversation = conversation
        self.identity = identity
        self.connection = connection

    def send(self, message: dict[str, Any]) -> None:
        self.link.to(self.origin, self.conversation, self.identity, messages.encode(message), str(message["type"]))


class CallHomes:
    def __init__(self, link: Link) -> None:
        self.link = link
        #: (conversation, identity) -> the home node its call (of a connection here) went to
        self._sent: dict[tuple[str, str], str] = {}
        #: (conversation, identity) -> the remote owner of a call here
        self._parties: dict[tuple[str, str], RemoteParty] = {}

    @property
    def node(self) -> str:
        return self.link.node

    # -- a participant's node ------------------------------------------------------------

    def forward(self, home: str, conversation: str, participant: Participant, connection: object, message: Any) -> None:
        """Send a client's call message to the home node (``message``: a ClientMessage)."""
        self._sent[(conversation, participant.identity)] = home
        request = CallRequest(Op.MESSAGE, participant, id(connection), _encode(message))
        self.link.call(home, conversation, _encode(request))

    def home_of_call(self, conversation: str, identity: str) -> str | None:
        """Where this participant's call went, if it is on another node."""
        return self._sent.get((conversation, identity))

    def end(self, conversation: str, participant: Participant, connection: object, reason: str) -> bool:
        """The participant's connection here is gone (or left): its call at home ends.
        False if it had no call elsewhere."""
        home = self._sent.pop((conversation, participant.identity), None)
        if home is None:
            return False
        request = CallRequest(Op.END, participant, id(connection), reason=reason)
        self.link.call(home, conversation, _encode(request))
        return True

    def remote_home(self, conversation: str) -> str | None:
        """The conversation's home if it is another node, as last heard."""
        home = self.link.home_of(conversation)
        return home if home and home != self.node else None

    def here(self, conversation: str) -> bool:
        """Whether this node is the conversation's home, as last heard (a store step in it
        says, a join's included)."""
        return self.link.home_of(conversation) == self.node

    def start_bot(self, home: str, conversation: str, customer: Participant) -> None:
        self.link.call(home, conversation, _encode(CallRequest(Op.BOT, customer, 0)))

    # -- the home node -------------------------------------------------------------------

    def party(self, origin: str, conversation: str, request: CallRequest) -> RemoteParty:
        """The owner of the participant's call here: the same one for the same connection."""
        key = (conversation, request.participant.identity)
        party = self._parties.get(key)
        if party is None or (party.origin, party.connection) != (origin, request.connection):
            party = self._parties[key] = RemoteParty(
                self.link, origin, conversation, request.participant.identity, request.connection
            )
        return party

    def owner(self, origin: str, conversation: str, request: CallRequest) -> RemoteParty | None:
        """The owner of the participant's call here if it is that connection's (not a newer one's)."""
        party = self._parties.get((conversation, request.participant.identity))
        if party is None or (party.origin, party.connection) != (origin, request.connection):
            return None
        return party

    def ended(self, conversation: str, identity: str) -> None:
        self._parties.pop((conversation, identity), None)

    def forget(self, conversation: str) -> None:
        for key in [k for k in self._sent if k[0] == conversation]:
            del self._sent[key]
        for key in [k for k in self._parties if k[0] == conversation]:
            del self._parties[key]


def read_request(data: bytes) -> CallRequest:
    """A ``CallRequest`` from the bus (msgspec.DecodeError/ValidationError if it is not)."""
    return _request(data)


def read_message(data: bytes) -> messages.ClientMessage:
    return _client_message.decode(data)
