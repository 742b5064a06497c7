"""The bot link's own frame layout (gateway/bot/frames.py), read back by websockets' parser."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from gateway.bot.frames import KEY_BATCH, MaskKeys, client_frame


def parse(data: bytes) -> Frame:
    """What a server reads: websockets' own parser, which unmasks (mask=True)."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=True)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        assert not reader.buffer  # nothing left over
        return frame
    raise AssertionError("the frame was incomplete")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 640, 65535, 65536, 200_000])
def test_binary_frames_of_every_length_form_read_back(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = parse(client_frame(data, MaskKeys()))
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.BINARY, True, data)


def test_text_frames_are_utf8() -> None:
    frame = parse(client_frame('{"type": "speech.started", "t": 1200, "name": "Zoë"}', MaskKeys()))
    assert frame.opcode == Opcode.TEXT
    assert bytes(frame.data).decode() == '{"type": "speech.started", "t": 1200, "name": "Zoë"}'


def test_each_frame_has_its_own_key_and_the_pool_refills() -> None:
    keys = MaskKeys()
    drawn = [keys.next() for _ in range(KEY_BATCH // 4 * 3)]  # three pools
    assert all(len(key) == 4 for key in drawn)
    assert len(set(drawn)) > len(drawn) * 0.99  # random 32-bit keys: hardly any repeat
    frames = [client_frame(b"\x00" * 8, keys) for _ in range(3)]
    assert len({f[2:6] for f in frames}) == 3  # the key is in the frame, the payload masked by it
    assert all(f[6:] == f[2:6] * 2 for f in frames)  # zeros masked: the key, repeated
