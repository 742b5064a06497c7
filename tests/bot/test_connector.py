"""The connector's outbox when a bot does not read: bounded, audio dropped first."""

from __future__ import annotations

import pytest

from gateway.bot.connector import BotConnector, BotSettings
from gateway.bot.native import NativeProtocol
from gateway.bot.twilio import TwilioProtocol
from gateway.messages import Participant
from media.vad import SpeechFrame


class Host:
    """Records what the connector reports; the gateway's side of the interface."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def bot_problem(self, kind: str) -> None:
        self.problems.append(kind)


@pytest.mark.parametrize("protocol_class", [NativeProtocol, TwilioProtocol])
async def test_a_full_outbox_drops_the_oldest_audio_and_keeps_control_messages(protocol_class: type) -> None:
    customer = Participant("u1", "customer", "Ann")
    host = Host()
    connector = BotConnector(
        conversation="r1",
        customer=customer,
        settings=BotSettings(url="ws://127.0.0.1:9/", outbox_limit=5),
        host=host,  # type: ignore[arg-type]
        protocol=protocol_class("r1", customer, 16_000, 20),
    )
    connector._send(connector.protocol.mark("keep-me"))
    for i in range(10):
        if protocol_class is TwilioProtocol:
            connector._send(connector.protocol.audio(bytes(320), i * 20), audio=True)
        else:
            connector._on_speech(SpeechFrame(bytes(640), i * 20))
    queued = list(connector._outbox)
    assert len(queued) == 5
    first, is_audio, _, _ = queued[0]
    assert not is_audio and "keep-me" in str(first)  # the control message survived
    assert all(is_audio for _, is_audio, _, _ in queued[1:])
    assert connector.dropped_frames == 6 and host.problems == ["dropped_frame"] * 6
    connector.playback.stop()
