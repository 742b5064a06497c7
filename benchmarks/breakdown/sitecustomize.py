"""loadtest.py --breakdown: where a talkgate process's CPU goes per received packet.

Python imports this module at startup when its directory is on PYTHONPATH (loadtest puts
it there for the target only). When ``TALKGATE_BREAKDOWN_FILE`` is set, a thread waits for
the gateway's media modules, wraps the functions below with ``perf_counter`` accumulators
(about 0.2 µs each per call, which the figures include), and every half second writes the
running totals to that file as JSON: seconds and calls per function, the process's CPU
seconds. loadtest.py reads it at the window's start and end. Nothing here runs without
the variable, and nothing of it is part of the gateway. Each figure is per *received*
packet; ``calls`` says how often the function ran per received packet.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

#: What is timed: (module, class, method, name in the output).
WRAPPED = (
    ("media.inbound", "FastRtp", "data_received", "in_path"),
    ("media.inbound", "Unprotect", "__call__", "srtp"),
    ("media.opus", "Decoder", "decode", "decode"),
    ("media.vad", "WebRtcVad", "is_speech", "vad"),
    ("gateway.bot.connector", "BotConnector", "_write_now", "bot_write"),
    # The bot's voice (the echo shape), outside the packet path: a 20 ms tick per talking
    # session encodes a frame and sends it.
    ("media.playback", "PlaybackTrack", "_tick", "voice_tick"),
    ("media.opus", "Encoder", "encode", "voice_encode"),
    ("media.outbound", "DirectAudio", "send", "voice_send"),
)


def _wrap(cls: Any, method: str, totals: list[float]) -> None:
    original = getattr(cls, method)
    clock = time.perf_counter

    def timed(*args: Any) -> Any:
        start = clock()
        try:
            return original(*args)
        finally:
            totals[0] += clock() - start
            totals[1] += 1

    setattr(cls, method, timed)


def _run(path: str) -> None:
    while not all(module in sys.modules for module, *_ in WRAPPED):
        time.sleep(0.01)
    time.sleep(0.2)  # the modules' own imports done
    totals: dict[str, list[float]] = {}
    for module, cls, method, name in WRAPPED:
        totals[name] = [0.0, 0]
        _wrap(getattr(sys.modules[module], cls), method, totals[name])
    while True:
        snapshot = {"cpu": time.process_time(), **{k: list(v) for k, v in totals.items()}}
        with open(path + ".tmp", "w") as f:
            json.dump(snapshot, f)
        os.replace(path + ".tmp", path)
        time.sleep(0.5)


if os.environ.get("TALKGATE_BREAKDOWN_FILE"):
    threading.Thread(target=_run, args=(os.environ["TALKGATE_BREAKDOWN_FILE"],), daemon=True).start()
