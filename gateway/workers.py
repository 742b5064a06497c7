"""``talkgate serve --workers N``: N gateway processes on one port, under one supervisor.

One asyncio process uses one core; a machine's other cores take more processes. Each
worker is a whole gateway node (``talkgate serve``, its own node id ``BASE-wI``) on
the same Redis and database; they bind the same port with ``SO_REUSEPORT``, so the
kernel spreads new connections over them, and the bus (``bus.py``) makes them one
gateway. The supervisor:

- reserves the port (and the API's) first, so that ``--port 0`` means one free port
  for all of them;
- prints ``talkgate listening on URL`` once every worker listens (the first line, as
  a single process does), then each worker's log lines prefixed with its name;
- restarts a worker that dies (after ``RESTART_SECONDS``, as a new node: the others
  reap the dead one's participants, who reconnect and carry on);
- forwards SIGTERM and SIGINT to every worker (each drains) and exits 0 when all
  exited 0; a second signal is forwarded too (the workers skip their drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

from .errors import ConfigError

log = logging.getLogger("talkgate.workers")

#: How long a dead worker's replacement waits before starting (a crash loop stays slow).
RESTART_SECONDS = 1.0
#: prctl(2): the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1
#: How long a worker may take to say it listens.
START_SECONDS = 60.0


def _die_with_parent() -> None:
    """In a worker, before it runs: the kernel sends it SIGTERM if the supervisor dies
    (killed with SIGKILL), so no worker outlives it holding the port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_count(value: str) -> int:
    """``--workers``: a number, or ``auto`` (one per core this process may use)."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    try:
        count = int(value)
    except ValueError:
        raise ConfigError(f"--workers is a number or 'auto', not {value[:40]!r}") from None
    if not 1 <= count <= 256:
        raise ConfigError("--workers is 1 to 256")
    return count


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with SO_REUSEPORT: port 0 picks one
    free port the workers then share; held open until they stop, so nobody else takes it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


@dataclass(eq=False)
class Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    starts: int = 0
    #: Set when its first line said it listens.
    listening: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return f"w{self.index}"


class Supervisor:
    """Starts and keeps ``count`` workers running ``python -m gateway ARGS``; ``run`` returns
    the exit code."""

    def __init__(self, count: int, args: list[str], node_base: str, url_of: str, node_port: int | None = None) -> None:
        self.count = count
        #: Worker i's own port for /healthz and /metrics is this + i - 1 (None or 0: a free one).
        self.node_port = node_port
        self.args = args
        self.node_base = node_base
        #: What the first line names (``http://HOST:PORT``).
        self.url = url_of
        self.workers = [Worker(i + 1) for i in range(count)]
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        #: The workers' lines until the supervisor's first line is out (None: since then).
        self._held: list[str] | None = []

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        self._tasks = [asyncio.create_task(self._keep(w), name=f"talkgate-{w.name}") for w in self.workers]
        try:
            async with asyncio.timeout(START_SECONDS):
                while not all(w.listening.is_set() for w in self.workers):
                    if any(task.done() for task in self._tasks):
                        raise ConfigError("a worker could not start (its log says why)")
                    await asyncio.sleep(0.05)
        except (TimeoutError, ConfigError) as exc:
            self._flush()
            log.error("the workers did not start: %s", exc or f"not listening after {START_SECONDS:g} s")
            await self._stop(signal.SIGKILL)
            return 2
        log.info("talkgate listening on %s", self.url)
        self._flush()
        pids = ", ".join(f"{w.name} pid {w.process.pid}" for w in self.workers if w.process is not None)
        log.info("%d workers: %s", self.count, pids)
        await stop.wait()
        log.info("stopping %d workers (a second signal skips their drain)", self.count)
        stop.clear()
        self._stopping = True
        self._signal(signal.SIGTERM)
        while not all(task.done() for task in self._tasks):
            second = asyncio.create_task(stop.wait())
            await asyncio.wait({*self._tasks, second}, return_when=asyncio.FIRST_COMPLETED)
            if second.done():
                stop.clear()
                self._signal(signal.SIGTERM)
            second.cancel()
        codes = [w.process.returncode if w.process else 0 for w in self.workers]
        log.info("workers exited: %s", ", ".join(f"{w.name} {c}" for w, c in zip(self.workers, codes, strict=True)))
        return 0 if all(c == 0 for c in codes) else 1

    def _live(self) -> list[Worker]:
        return [w for w in self.workers if w.process is not None and w.process.returncode is None]

    def _signal(self, sig: signal.Signals) -> None:
        for worker in self._live():
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(sig)

    async def _stop(self, sig: signal.Signals) -> None:
        self._stopping = True
        self._signal(sig)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _keep(self, worker: Worker) -> None:
        """Run the worker; restart it when it dies, until the supervisor stops."""
        while True:
            worker.starts += 1
            node = f"{self.node_base}-{worker.name}" + (f"-r{worker.starts - 1}" if worker.starts > 1 else "")
            process = worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                *self.args,
                "--workers",
                "1",
                "--reuse-port",
                "--node-id",
                node,
                "--node-port",
                str(self.node_port + worker.index - 1 if self.node_port else 0),
                stdin=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
            try:
                await self._relay(worker, process)
                code = await process.wait()
            except asyncio.CancelledError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                raise
            if self._stopping:
                return
            if not worker.listening.is_set():
                log.error("worker %s exited with %s before it listened", worker.name, code)
                return  # a start-up error (a bad option, Redis unreachable): restarting repeats it
            log.warning("worker %s (pid %d) exited with %s: starting a new one", worker.name, process.pid, code)
            await asyncio.sleep(RESTART_SECONDS)

    async def _relay(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        """The worker's log lines to ours, with its name; its first line says it listens."""
        assert process.stderr is not None
        first = True
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            if first:
                first = False
                if "listening on" in line:
                    worker.listening.set()
                    if worker.starts == 1:
                        continue  # the supervisor's own first line says it once for all
            if self._held is not None:
                self._held.append(f"[{worker.name}] {line}\n")
            else:
                sys.stderr.write(f"[{worker.name}] {line}\n")
                sys.stderr.flush()

    def _flush(self) -> None:
        for line in self._held or ():
            sys.stderr.write(line)
        sys.stderr.flush()
        self._held = None
