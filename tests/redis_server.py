"""A throwaway Redis server for the tests and benchmarks: Debian's ``redis-server``, no
system service.

``RedisServer.start()`` runs ``redis-server`` on 127.0.0.1 on a free port with nothing
saved (no RDB, no AOF: nothing here must survive), in a fresh directory under the system
temp dir; ``stop()`` ends it and removes the directory, ``restart()`` stops and starts it
on the same port (every key is gone: what a Redis that lost its memory looks like).
Works in the loopback-only network namespace of ``tests/run``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.databases import free_port

START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it


class RedisUnavailable(RuntimeError):
    """The server cannot be started here: the reason, and what to install, in the message."""


class RedisServer:
    """A running throwaway Redis; also a context manager that stops it on exit."""

    def __init__(self, binary: str, directory: Path, port: int) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisUnavailable("redis-server is not installed (Debian: apt-get install redis-server)")
        directory = Path(tempfile.mkdtemp(prefix="talkgate-redis-"))
        server = cls(binary, directory, free_port())
        for attempt in range(START_ATTEMPTS):
            try:
                server._run()
                return server
            except RedisUnavailable:
                if attempt == START_ATTEMPTS - 1:
                    shutil.rmtree(directory, ignore_errors=True)
                    raise
                server.port = free_port()
        raise AssertionError("unreachable")

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _run(self) -> None:
        log = self.directory / "redis.log"
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.directory), "--logfile", str(log), "--databases", "64"]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RedisUnavailable(f"redis-server exited with {self._proc.returncode}: {_tail(log)}")
            if self._pong():
                return
            time.sleep(0.02)
        self._kill()
        raise RedisUnavailable(f"redis-server did not answer within 10 s: {_tail(log)}")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        """Stop and start on the same port (an empty Redis comes back)."""
        self._kill()
        self._run()

    def down(self) -> None:
        """Stop serving (``up`` starts an empty Redis on the same port)."""
        self._kill()

    def up(self) -> None:
        self._run()

    def stop(self) -> None:
        self._kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
