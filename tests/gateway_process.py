"""``talkgate`` as a real subprocess: for CLI tests, browser tests, load tests and benchmarks."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: WebRTC stays on loopback: advertise 127.0.0.1, accept only loopback candidates.
RTC_LOOPBACK_ARGS = ["--rtc-address", "127.0.0.1", "--rtc-allow-network", "127.0.0.0/8"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class GatewayProcess:
    """Starts ``python -m gateway ARGS``; its first log line must name the URL it serves.

    ``command`` replaces ``python -m gateway`` (the load test's baseline server). With
    ``drain``, a thread keeps reading the log (the last lines are kept) so that a long,
    chatty run never blocks on a full pipe.
    """

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, command: list[str] | None = None, drain: bool = False
    ) -> None:
        #: A fresh records database per process unless the test names one (never the
        #: repository's working directory, never another test's rows).
        self.data = tempfile.TemporaryDirectory(prefix="talkgate-records-")
        if command is None and args and args[0] in ("serve", "demo") and "--database" not in args:
            args = (*args, "--database", f"sqlite:///{self.data.name}/talkgate.db")
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "gateway"]), *args],
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
        self.log_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._drain: threading.Thread | None = None
        if drain:
            self._drain = threading.Thread(target=self._read_log, daemon=True)
            self._drain.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log_tail.append(line)

    def cpu_seconds(self) -> float:
        """User + system CPU time the gateway process has used so far."""
        return cpu_seconds(self.proc.pid)

    def stop(self, timeout: float = 15) -> str:
        """SIGTERM, wait for a clean exit (asserted), return the rest of the log.

        The rest is read through the same buffered file as the first line:
        communicate() reads the raw descriptor and would lose buffered lines.
        """
        assert self.proc.stderr is not None
        self.proc.send_signal(signal.SIGTERM)
        if self._drain is not None:
            self._drain.join(timeout)
            rest = "".join(self.log_tail)
        else:
            rest = self.proc.stderr.read()
        code = self.proc.wait(timeout=timeout)
        assert code == 0, f"gateway exited with {code}: {rest[-2000:]}"
        return rest
