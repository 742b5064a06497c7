"""What a gateway process hears with: a voice detector per stream, one end-of-turn worker.

Built once at start-up from the ``VadSettings``: ``--vad silero`` loads Silero's session
and ``--turn-detection smart`` Smart Turn's and starts its worker thread here, so a
missing model fails the start, not the first call, and every stream shares one copy.
``close`` stops the worker (the broker does, at shutdown).
"""

from __future__ import annotations

from .pipeline import VoicePipeline
from .silero import SileroModel, SileroVad
from .tasks import Tally, Timer
from .turn import SmartTurn, TurnWorker
from .vad import VadSettings, VoiceDetector, WebRtcVad


class Ears:
    def __init__(
        self,
        settings: VadSettings,
        *,
        turn_timer: Timer | None = None,
        turn_overloaded: Tally | None = None,
        turn_failures: Tally | None = None,
    ) -> None:
        self.settings = settings
        #: Silero's network (None: webrtcvad, which needs nothing loaded).
        self.silero = SileroModel() if settings.detector == "silero" else None
        #: Decides every stream's turns (None: turns end on silence).
        self.turns = (
            TurnWorker(
                SmartTurn(),
                threshold=settings.turn_threshold,
                timer=turn_timer,
                overloaded=turn_overloaded,
                failures=turn_failures,
            )
            if settings.smart
            else None
        )

    def detector(self) -> VoiceDetector:
        """A fresh detector for one stream (each keeps its own state)."""
        if self.silero is not None:
            return SileroVad(self.silero, self.settings.silero_threshold)
        return WebRtcVad(self.settings.aggressiveness)

    def pipeline(self, *, listener_failures: Tally | None = None) -> VoicePipeline:
        """A customer's voice pipeline, hearing with these ears."""
        return VoicePipeline(
            self.settings, detector=self.detector(), turns=self.turns, listener_failures=listener_failures
        )

    def close(self) -> None:
        if self.turns is not None:
            self.turns.close()
