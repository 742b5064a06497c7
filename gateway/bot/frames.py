"""Websocket frames to the bot, serialized here for the per-frame fast path (sans-I/O).

The gateway is the bot link's *client*, and RFC 6455 has a client mask every frame
with a fresh key from a strong source of entropy. websockets draws each key with
``secrets.token_bytes(4)``: a ``getrandom`` system call per 20 ms audio frame per
session, about a twentieth of a listening session's CPU. ``MaskKeys`` draws the same
entropy (``os.urandom``) a few kilobytes at a time and hands out four bytes per frame;
``client_frame`` lays out one unfragmented, uncompressed frame as websockets would.
The connector writes these only on a link without extensions (it opens its links with
``compression=None``) and while no fragmented message is being sent.
"""

from __future__ import annotations

import os
import struct

from websockets.frames import Opcode

try:  # websockets' C helper, as its own frames use
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a websockets built without its C extension
    from websockets.utils import apply_mask

#: Mask keys drawn per system call (1024 frames).
KEY_BATCH = 4096
FIN = 0b10000000
MASKED = 0b10000000


class MaskKeys:
    """Four random bytes per call, from ``os.urandom`` drawn ``KEY_BATCH`` bytes at a time."""

    def __init__(self, batch: int = KEY_BATCH) -> None:
        self.batch = batch
        self._pool = b""
        self._at = 0

    def next(self) -> bytes:
        at = self._at
        if at + 4 > len(self._pool):
            self._pool, at = os.urandom(self.batch), 0
        self._at = at + 4
        return self._pool[at : at + 4]


def client_frame(item: bytes | str, keys: MaskKeys) -> bytes:
    """One final, masked frame: binary for bytes, text (UTF-8) for a string."""
    if isinstance(item, str):
        opcode, data = Opcode.TEXT, item.encode()
    else:
        opcode, data = Opcode.BINARY, item
    length = len(data)
    head = FIN | opcode
    if length < 126:
        header = struct.pack("!BB", head, MASKED | length)
    elif length < 65536:
        header = struct.pack("!BBH", head, MASKED | 126, length)
    else:
        header = struct.pack("!BBQ", head, MASKED | 127, length)
    key = keys.next()
    return header + key + apply_mask(data, key)
