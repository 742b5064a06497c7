"""``talkgate`` as a real subprocess: for CLI tests, browser tests, load tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: WebRTC stays on loopback: advertise 127.0.0.1, accept only loopback candidates.
RTC_LOOPBACK_ARGS = ["--rtc-address", "127.0.0.1", "--rtc-allow-network", "127.0.0.0/8"]


class GatewayProcess:
    """Starts ``python -m gateway ARGS``; its first log line must name the URL it serves."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stderr is not None
        self.first_line = self.proc.stderr.readline()
        match = re.search(r"listening on (http://\S+)", self.first_line)
        if match is None:
            self.proc.kill()
            raise AssertionError(f"the first log line should name the URL: {self.first_line!r}")
        self.url = match.group(1)
        self.ws_url = self.url.replace("http://", "ws://", 1) + "/ws"

    def cpu_seconds(self) -> float:
        """User + system CPU time the gateway process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self, timeout: float = 15) -> str:
        """SIGTERM, wait for a clean exit (asserted), return the rest of the log.

        The rest is read through the same buffered file as the first line:
        communicate() reads the raw descriptor and would lose buffered lines.
        """
        assert self.proc.stderr is not None
        self.proc.send_signal(signal.SIGTERM)
        rest = self.proc.stderr.read()
        code = self.proc.wait(timeout=timeout)
        assert code == 0, f"gateway exited with {code}: {rest[-2000:]}"
        return rest
