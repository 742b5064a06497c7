"""Recording a track into a file (media/recorder.py): real Opus and VP8, opened again with PyAV."""

from __future__ import annotations

import fractions
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc.codecs.vpx import Vp8Encoder

from media import opus
from media.recorder import TrackRecorder, Vp8Frames, vp8_size
from media.video import VideoPacket, vp8_keyframe


def opus_packets(seconds: float) -> list[av.Packet[Any]]:
    encoder = opus.Encoder(48_000)
    t = np.arange(int(48_000 * seconds)) / 48_000
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    packets = []
    for i in range(0, len(pcm) - 959, 960):
        packet = av.Packet(encoder.encode(pcm[i : i + 960]))
        packet.pts, packet.time_base = 5_000_000 + i, fractions.Fraction(1, 48_000)  # stream time, not from 0
        packets.append(packet)
    return packets


def vp8_rtp(frames: int, keyframes: tuple[int, ...] = (0,)) -> list[VideoPacket]:
    """What InboundVideo delivers for ``frames`` pictures: VP8 RTP payloads, 30 fps."""
    encoder = Vp8Encoder()
    out: list[VideoPacket] = []
    sequence = 65_530  # wraps inside the run
    for i in range(frames):
        image = np.zeros((240, 320, 3), dtype=np.uint8)
        image[:, (i * 8) % 320 :] = (40, 160, 220)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = i * 3000, fractions.Fraction(1, 90_000)
        payloads, timestamp = encoder.encode(frame, force_keyframe=i in keyframes)
        for j, payload in enumerate(payloads):
            out.append(
                VideoPacket(
                    payload,
                    sequence=sequence & 0xFFFF,
                    timestamp=(0xFFFF0000 + timestamp) & 0xFFFFFFFF,  # and so do the timestamps
                    marker=j == len(payloads) - 1,
                    keyframe=vp8_keyframe(payload),
                    mime="video/vp8",
                    ssrc=1,
                )
            )
            sequence += 1
    return out


def test_opus_packets_become_an_ogg_file_of_the_same_length(tmp_path: Path) -> None:
    recorder = TrackRecorder(lambda _: tmp_path / "a" / "x.ogg", "audio")
    packets = opus_packets(3.0)
    for packet in packets[:100]:
        recorder.push(packet)
    recorder.write(recorder.take())
    for packet in packets[110:]:  # 200 ms of DTX: a gap in the timeline, not lost time
        recorder.push(packet)
    recorder.write(recorder.take())
    saved = recorder.close()
    assert saved is not None and saved.packets == len(packets) - 10 and saved.dropped == 0
    assert abs(saved.duration_ms - 3000) <= 20
    with av.open(str(saved.path)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "opus" and stream.sample_rate == 48_000
        assert stream.duration is not None and stream.time_base is not None
        assert abs(float(stream.duration * stream.time_base) - 3.0) < 0.05
        decoded = [frame.to_ndarray() for frame in container.decode(audio=0)]
    loud = np.concatenate([f.reshape(-1) for f in decoded]).astype(np.float64)
    assert np.sqrt(np.mean(loud**2)) > 0.1  # the tone (float samples), decodable


def test_vp8_rtp_becomes_a_webm_file_of_whole_frames(tmp_path: Path) -> None:
    recorder = TrackRecorder(lambda _: tmp_path / "x.webm", "video")
    for packet in vp8_rtp(60):
        recorder.push(packet)
    recorder.write(recorder.take())
    saved = recorder.close()
    assert saved is not None and saved.packets == 60
    assert abs(saved.duration_ms - 2000) <= 1
    with av.open(str(saved.path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("vp8", 320, 240)
        assert container.duration is not None and abs(container.duration / 1e6 - 2.0) < 0.05
        assert sum(1 for _ in container.decode(video=0)) == 60


def test_a_lost_packet_spoils_its_frame_until_the_next_keyframe() -> None:
    packets = vp8_rtp(12, keyframes=(0, 6))
    stamps = sorted({p.timestamp for p in packets}, key=lambda ts: (ts - packets[0].timestamp) & 0xFFFFFFFF)
    frames = Vp8Frames()
    lost = next(p for p in packets if p.timestamp == stamps[3])  # frame 3's first packet
    written = [f for p in packets if p is not lost and (f := frames.add(p)) is not None]
    # Frames 0-2 whole; 3 damaged; 4 and 5 need it, so wait; 6 is a keyframe: from there on.
    assert [stamps.index(ts) for _, ts, _ in written] == [0, 1, 2, 6, 7, 8, 9, 10, 11]
    assert frames.damaged == 1
    assert vp8_size(written[0][0]) == (320, 240) and vp8_size(written[1][0]) is None


def test_nothing_recorded_leaves_no_file(tmp_path: Path) -> None:
    recorder = TrackRecorder(lambda _: tmp_path / "x.webm", "video")
    for packet in vp8_rtp(3, keyframes=())[1:]:  # no keyframe: nothing a player could start from
        recorder.push(packet)
    recorder.write(recorder.take())
    assert recorder.close() is None
    assert not (tmp_path / "x.webm").exists()


def test_a_full_queue_drops_the_oldest(tmp_path: Path) -> None:
    recorder = TrackRecorder(lambda _: tmp_path / "x.ogg", "audio")
    packets = opus_packets(25.0)  # 1250 packets, more than the queue holds
    for packet in packets:
        recorder.push(packet)
    batch = recorder.take()
    assert recorder.dropped == len(packets) - len(batch) > 0
    assert batch[-1] is packets[-1]


def test_a_file_is_named_and_stamped_from_its_first_sample(tmp_path: Path) -> None:
    """The wall-clock start is the first packet's arrival, moved on by the RTP time to what
    the file begins with: a track routed early, or a video waiting for a keyframe, still
    lines up with the others."""
    now = [1_800_000_000_000]
    audio = TrackRecorder(lambda started: tmp_path / f"{started}.ogg", "audio", clock=lambda: now[0])
    for packet in opus_packets(1.0):
        audio.push(packet)
        now[0] += 20
    audio.write(audio.take())
    saved = audio.close()
    assert saved is not None and saved.started == 1_800_000_000_000
    assert saved.path == tmp_path / "1800000000000.ogg" and saved.path.exists()

    now = [1_800_000_000_000]
    video = TrackRecorder(lambda started: tmp_path / f"{started}.webm", "video", clock=lambda: now[0])
    packets = vp8_rtp(12, keyframes=(0, 6))
    third = sorted({p.timestamp for p in packets}, key=lambda ts: (ts - packets[0].timestamp) & 0xFFFFFFFF)[3]
    late = packets[next(i for i, p in enumerate(packets) if p.timestamp == third) :]
    for item in late:  # joined at frame 3; frames 3-5 wait for the keyframe at 6
        video.push(item)
    video.write(video.take())
    saved = video.close()
    assert saved is not None and saved.packets == 6
    assert saved.started == 1_800_000_000_000 + 100  # three frames at 30 fps after the first packet
    assert saved.path.name == "1800000000100.webm"
