"""Call recording (``--record DIR``) with real aiortc peers: files, announcements, timeline."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from gateway import events as ev
from gateway.config import Config
from gateway.messages import Participant
from gateway.recording import safe_name
from gateway.records import SqlRecords
from gateway.server import GatewayServer
from media.playback import PlaybackTrack
from tests.client import Client
from tests.conftest import make_token, start_audio, until
from tests.rtc_client import PatternTrack, RtcClient


@pytest.fixture
async def recording_server(config: Config, tmp_path: Path) -> AsyncIterator[GatewayServer]:
    async with GatewayServer(dataclasses.replace(config, record_dir=str(tmp_path / "calls"))) as srv:
        yield srv


async def join(server: GatewayServer, identity: str, role: str) -> tuple[RtcClient, dict[str, object]]:
    client = await Client.open(server.ws_url)
    await client.send({"type": "join", "token": make_token(identity, role, "rec-room")})
    joined = await client.expect("joined")
    return RtcClient(client), joined


async def test_a_call_is_recorded_per_track_and_everyone_is_told(recording_server: GatewayServer) -> None:
    server = recording_server
    saved: list[ev.RecordingSaved] = []
    server.broker.consumers.append(lambda e: saved.append(e) if isinstance(e, ev.RecordingSaved) else None)
    customer, joined = await join(server, "u1", "customer")
    assert "recording" not in joined  # nothing to record yet
    agent, _ = await join(server, "a1", "agent")
    try:
        customer.pc.addTrack(PatternTrack(320, 240))
        await start_audio(customer, 440)
        assert (await customer.wait_for("recording"))["active"] is True
        assert (await agent.wait_for("recording"))["active"] is True
        await start_audio(agent, 880)
        await agent.hears("video", frames=5, timeout=10)
        # Someone joining now learns it from ``joined``.
        late, late_joined = await join(server, "u2", "customer")
        assert late_joined["recording"] is True
        await late.close()
        await asyncio.sleep(5)
        hung_up = time.time()
        for rtc in (customer, agent):
            await rtc.client.send({"type": "hangup"})
        assert (await customer.wait_for("recording"))["active"] is False
        await until(lambda: len(saved) == 3, timeout=5)  # the customer's audio and video, the agent's audio
    finally:
        await customer.close()
        await agent.close()
    tracks = {(s.participant.identity, s.media): s for s in saved}
    assert set(tracks) == {("u1", "audio"), ("u1", "video"), ("a1", "audio")}
    for (identity, media), event in tracks.items():
        path = Path(server.config.record_dir) / event.file
        assert path.suffix == (".ogg" if media == "audio" else ".webm") and identity in path.name
        assert event.size == path.stat().st_size > 0
        expected = hung_up - event.started / 1000  # from the track's start to the hang-up
        with av.open(str(path)) as container:
            stream = container.streams[0]
            assert stream.type == media and stream.codec_context.name == ("opus" if media == "audio" else "vp8")
            assert container.duration is not None
            assert abs(container.duration / 1e6 - expected) < 0.3, (identity, media, container.duration, expected)
            assert abs(event.duration_ms / 1000 - expected) < 0.3
            assert next(container.decode(stream)) is not None  # it plays


async def test_the_timeline_lists_the_files(config: Config, database_url: str, tmp_path: Path) -> None:
    settings = dataclasses.replace(config, record_dir=str(tmp_path / "calls"), database=database_url)
    async with GatewayServer(settings) as server:
        customer, _ = await join(server, "u1", "customer")
        try:
            await start_audio(customer, 440)
            await customer.wait_for("recording", active=True)
            await asyncio.sleep(1)
            await customer.client.send({"type": "hangup"})
            await customer.wait_for("recording", active=False)
        finally:
            await customer.close()
        records = server.records
        assert isinstance(records, SqlRecords)

        async def timeline() -> list[dict[str, Any]] | None:
            [conversation] = await records.conversations_of("rec-room")
            entries = await records.timeline(conversation["id"])
            return entries if any(e["type"] == "recording.saved" for e in entries) else None

        entries = await until(timeline, timeout=5)
    types = [e["type"] for e in entries]
    assert types.index("recording.started") < types.index("recording.stopped") < types.index("recording.saved")
    saved = next(e for e in entries if e["type"] == "recording.saved")
    body = saved["body"] if isinstance(saved["body"], dict) else json.loads(saved["body"])
    assert body["media"] == "audio" and body["file"].endswith(".ogg") and body["duration_ms"] > 500
    assert (tmp_path / "calls" / body["file"]).stat().st_size == body["bytes"]
    assert saved["actor"] == "u1"


async def test_without_record_nothing_is_recorded(server: GatewayServer, tmp_path: Path) -> None:
    customer, _ = await join(server, "u1", "customer")
    try:
        await start_audio(customer, 440)
        await customer.wait_for("media", identity="u1", audio=True)
        assert server.broker.calls.recordings is None
        with pytest.raises(TimeoutError):
            await customer.wait_for("recording", timeout=0.5)
    finally:
        await customer.close()


async def test_the_bots_voice_is_recorded_too(recording_server: GatewayServer) -> None:
    server = recording_server
    saved: list[ev.RecordingSaved] = []
    server.broker.consumers.append(lambda e: saved.append(e) if isinstance(e, ev.RecordingSaved) else None)
    customer, _ = await join(server, "u1", "customer")
    try:
        await start_audio(customer, 440)
        await customer.wait_for("recording", active=True)
        playback = PlaybackTrack()
        server.broker.router.add_virtual_source("rec-room", Participant("bot", "bot", "Booking bot"), playback)
        t = np.arange(16_000 * 2) / 16_000
        playback.enqueue((9000 * np.sin(2 * np.pi * 660 * t)).astype(np.int16).tobytes(), 16_000)
        await customer.hears_tone(660)
        await asyncio.sleep(1.5)
        await server.broker.router.remove_virtual_source("rec-room", "bot")
        playback.stop()
        await until(lambda: any(s.participant.identity == "bot" for s in saved), timeout=5)
    finally:
        await customer.close()
    bot = next(s for s in saved if s.participant.identity == "bot")
    with av.open(str(Path(server.config.record_dir) / bot.file)) as container:
        pcm = np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(audio=0)])
    spectrum = np.abs(np.fft.rfft(pcm[: 48_000 // 2]))
    assert abs(np.fft.rfftfreq(48_000 // 2, 1 / 48_000)[int(np.argmax(spectrum))] - 660) < 10  # the bot's tone


async def test_a_gateway_that_stops_mid_call_finishes_its_files(config: Config, tmp_path: Path) -> None:
    saved: list[ev.RecordingSaved] = []
    async with GatewayServer(dataclasses.replace(config, record_dir=str(tmp_path))) as server:
        server.broker.consumers.append(lambda e: saved.append(e) if isinstance(e, ev.RecordingSaved) else None)
        customer, _ = await join(server, "u1", "customer")
        customer.pc.addTrack(PatternTrack(320, 240))
        await start_audio(customer, 440)
        await customer.wait_for("recording", active=True)
        await asyncio.sleep(1.5)
    await customer.close()
    assert sorted(s.media for s in saved) == ["audio", "video"]
    for event in saved:
        with av.open(str(tmp_path / event.file)) as container:
            assert container.duration is not None and container.duration > 1_000_000
            assert next(container.decode(container.streams[0])) is not None


async def test_erasure_and_retention_delete_the_recordings(config: Config, database_url: str, tmp_path: Path) -> None:
    """A privacy request erases a customer's calls as it erases their chat; retention
    deletes the recordings of the conversations it removes."""
    folder = tmp_path / "calls"
    settings = dataclasses.replace(config, record_dir=str(folder), database=database_url)
    async with GatewayServer(settings) as server:
        records = server.records
        assert isinstance(records, SqlRecords)
        files: dict[str, list[Path]] = {}
        for customer_id, room in (("u1", "room-1"), ("u2", "room-2")):
            client = await Client.open(server.ws_url)
            await client.send({"type": "join", "token": make_token(customer_id, "customer", room)})
            await client.expect("joined")
            customer = RtcClient(client)
            try:
                await start_audio(customer, 440)
                await customer.wait_for("recording", active=True)
                await asyncio.sleep(0.5)
                await customer.client.send({"type": "leave"})
                await customer.wait_for("left")
            finally:
                await customer.close()

            async def listed(room: str = room) -> list[Path] | None:
                [conversation] = await records.conversations_of(room)
                if conversation["closed"] is None:
                    return None  # the writer has not committed the leave yet
                entries = await records.timeline(conversation["id"])
                saved = [e["body"] for e in entries if e["type"] == "recording.saved"]
                bodies = [b if isinstance(b, dict) else json.loads(b) for b in saved]
                return [folder / b["file"] for b in bodies] or None

            files[customer_id] = await until(listed, timeout=5)
            assert all(path.is_file() for path in files[customer_id])
        removed = await records.erase_customer("u1")
        assert [folder / name for name in removed.recordings] == files["u1"]
        assert not any(path.exists() for path in files["u1"])
        assert all(path.is_file() for path in files["u2"])  # someone else's call stays
        expired = await records.expire(before=int(time.time() * 1000) + 1)
        assert [folder / name for name in expired.recordings] == files["u2"]
        assert not any(path.exists() for path in files["u2"])


def test_file_names_are_safe_whatever_the_identity() -> None:
    for hostile in ("../../etc/passwd", "a/b\\c", "..", "", "x" * 500, "é🙂\x00"):
        name = safe_name(hostile)
        assert "/" not in name and "\\" not in name and "." not in name and "\x00" not in name
        assert 9 <= len(name) <= 57
    assert safe_name("a/b") != safe_name("a_b")  # made safe, yet never the same file
