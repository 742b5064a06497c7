"""Call recording (``--record DIR``): this process's recorders, one per routed track.

The router tells ``Recordings.routed`` which tracks a conversation's call carries
after every change (a participant's camera, microphone, the bot's voice); each track
gets a ``media.recorder.TrackRecorder`` subscribed to its relay, and a track that
ends has its file finished. Media lives on the conversation's home node, so the
files are written there.

Everyone in the conversation is told (``recording`` messages, ``joined.recording``)
while any track of it is being recorded; each finished file is a ``recording.saved``
entry in the timeline and a webhook. Files go to
``DIR/<conversation>/<start, UTC>-<identity>-<audio|video>.<ogg|webm>``, names made
safe for any file system (only letters, digits, ``-`` and ``_``, with a hash of the
original so two names never collide).

The call never waits for the disk: packets are queued (bounded) and written every
``FLUSH_SECONDS`` on a worker thread, one recorder after another; a recorder that
fails (disk full) is dropped and logged, the call goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from media.recorder import FLUSH_SECONDS, Saved, TrackRecorder
from media.relay import Relay
from media.tasks import TaskOwner

from . import events as ev
from .messages import Participant

log = logging.getLogger("talkgate.recording")

#: What a conversation's call carries: (identity, kind) → (who, the relay of that track).
Routed = dict[tuple[str, str], tuple[Participant, Relay]]
Emit = Callable[[list[ev.Event]], None]
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_name(value: str) -> str:
    """A file-name part for any identity or conversation id: no separators, no dots."""
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{_UNSAFE.sub('_', value)[:48]}-{digest}"


@dataclass(eq=False)
class _Track:
    conversation: str
    participant: Participant
    kind: str
    relay: Relay
    recorder: TrackRecorder
    failed: bool = False


class Recordings:
    """This process's recorders, and the task that writes them."""

    def __init__(self, directory: Path, *, emit: Emit, clock: Callable[[], int], tasks: TaskOwner) -> None:
        self.directory = directory
        self._emit = emit
        self._clock = clock
        self._tasks = tasks
        #: conversation -> (identity, kind) -> the track being recorded
        self._live: dict[str, dict[tuple[str, str], _Track]] = {}
        #: Tracks that ended: their last packets and the file's end are written next.
        self._ending: list[_Track] = []
        self._writer: asyncio.Task[None] | None = None
        #: Set by ``close``: the writer finishes its flush and ends (a cancel could leave a
        #: worker thread writing a file that the last flush then writes too).
        self._stopping = asyncio.Event()
        #: Files finished, and recorders dropped because writing failed.
        self.saved = 0
        self.failures = 0

    def active(self, conversation: str) -> bool:
        return bool(self._live.get(conversation))

    def routed(self, conversation: str, tracks: Routed) -> None:
        """What the conversation's call carries now: record new tracks, finish ended ones."""
        live = self._live.get(conversation, {})
        was = bool(live)
        for key, track in list(live.items()):
            current = tracks.get(key)
            if current is None or current[1] is not track.relay:
                del live[key]
                track.relay.unsubscribe(track.recorder, drop_queued=False)
                self._ending.append(track)
        for key, (participant, relay) in tracks.items():
            if key not in live and not relay.finished:
                live[key] = self._start(conversation, participant, key[1], relay)
        if live:
            self._live[conversation] = live
        else:
            self._live.pop(conversation, None)
        if bool(live) != was:
            self._emit([ev.RecordingChanged(conversation=conversation, ts=self._clock(), active=bool(live))])
        if (live or self._ending) and self._writer is None and not self._stopping.is_set():
            self._writer = self._tasks.spawn(self._write_loop(), "talkgate-recordings")

    def _start(self, conversation: str, participant: Participant, kind: str, relay: Relay) -> _Track:
        folder = self.directory / safe_name(conversation)
        tail = f"{safe_name(participant.identity)}-{kind}.{'ogg' if kind == 'audio' else 'webm'}"

        def name(started: int) -> Path:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started / 1000)) + f"{started % 1000:03d}Z"
            return folder / f"{stamp}-{tail}"

        recorder = TrackRecorder(name, kind, clock=self._clock)
        relay.subscribe(recorder)
        return _Track(conversation, participant, kind, relay, recorder)

    async def _write_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        """Write what every recorder queued; finish the files of tracks that ended."""
        for live in list(self._live.values()):
            for track in list(live.values()):
                if not track.failed:
                    await self._run(track, track.recorder.write, track.recorder.take())
        ending, self._ending = self._ending, []
        for track in ending:
            if track.failed:
                continue
            recorder = track.recorder
            saved = await self._run(track, _finish, recorder, recorder.take())
            if isinstance(saved, Saved):
                self._saved(track, saved)

    async def _run(self, track: _Track, work: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(work, *args)
        except Exception as exc:
            track.failed = True
            track.relay.unsubscribe(track.recorder, drop_queued=False)
            self.failures += 1
            log.error("recording %s failed: %r; the call goes on unrecorded", track.recorder.path, exc, exc_info=exc)
            return None

    def _saved(self, track: _Track, saved: Saved) -> None:
        self.saved += 1
        event = ev.RecordingSaved(
            conversation=track.conversation,
            ts=self._clock(),
            participant=track.participant,
            media=track.kind,
            file=str(saved.path.relative_to(self.directory)),
            started=saved.started,
            duration_ms=saved.duration_ms,
            size=saved.size,
        )
        if saved.dropped:
            log.warning("recording %s lost %d packets (the disk was slower than the call)", saved.path, saved.dropped)
        self._emit([event])

    async def close(self) -> None:
        """Finish every file (the gateway stops): each track ends as if its call had."""
        for conversation in list(self._live):
            self.routed(conversation, {})
        self._stopping.set()
        if self._writer is not None:
            await asyncio.wait([self._writer])  # its last flush finishes the files (its owner logs a failure)
            self._writer = None
        await self.flush()  # what the writer did not see


def _finish(recorder: TrackRecorder, batch: list[Any]) -> Saved | None:
    recorder.write(batch)
    return recorder.close()
