"""A throwaway PostgreSQL cluster for the tests: Debian's server binaries, no system service.

``PostgresCluster.start()`` runs initdb in a fresh directory under the system temp dir,
starts the server on 127.0.0.1 on a free port (its unix socket in that directory, fsync
off: nothing here must survive a crash), creates the database ``talkgate`` and returns
the running cluster; ``stop()`` kills it and removes the directory. PostgreSQL refuses to
run as root, so as root the server runs as the ``postgres`` user (``runuser``).
``create_database()`` gives each test an empty database of its own, cheaply.

Works in the loopback-only network namespace of ``tests/run`` (it needs nothing but lo).
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

#: Where Debian's postgresql-NN packages put the server (initdb, pg_ctl, postgres, psql).
DEBIAN_ROOT = Path("/usr/lib/postgresql")
#: The role initdb creates; also the system user the server runs as when we are root.
SUPERUSER = "postgres"
#: A test cluster needs no durability: no fsync, no full-page writes, no waiting on WAL.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "timezone": "'UTC'",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",  # tests provoke errors on purpose: keep the log short
}
START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it


class PostgresUnavailable(RuntimeError):
    """The cluster cannot be started here: the reason, and what to install, in the message."""


def find_bin_dir(root: Path | None = None) -> Path | None:
    """The newest ``/usr/lib/postgresql/NN/bin`` that has initdb, pg_ctl and psql, if any."""
    root = root or DEBIAN_ROOT
    candidates = [p for p in root.glob("*/bin") if p.parent.name.isdigit()]
    for bin_dir in sorted(candidates, key=lambda p: int(p.parent.name), reverse=True):
        if all(os.access(bin_dir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return bin_dir
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class PostgresCluster:
    """A running throwaway cluster; also a context manager that stops it on exit."""

    def __init__(self, bin_dir: Path, directory: Path, run_as: str | None, durable: bool = False) -> None:
        self.bin_dir = bin_dir
        #: fsync, full-page writes and synchronous commit on, as a deployment runs (benchmarks)
        self.durable = durable
        self.directory = directory  # holds data/, the unix socket and server.log
        self.run_as = run_as  # the system user the server runs as (None: ourselves)
        self.port = 0
        self.database = "talkgate"
        self._numbers = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def start(cls, bin_dir: Path | None = None, *, durable: bool = False) -> PostgresCluster:
        """initdb, start, create the database ``talkgate``; raises PostgresUnavailable.
        ``durable``: commit as a deployment does (the tests do not need to)."""
        bin_dir = bin_dir or find_bin_dir()
        if bin_dir is None:
            raise PostgresUnavailable(
                f"no PostgreSQL server binaries in {DEBIAN_ROOT}/*/bin: install Debian's `postgresql` "
                "package (bash tests/run does)"
            )
        run_as = None
        if os.geteuid() == 0:  # the server refuses to run as root
            run_as = SUPERUSER
            try:
                owner = pwd.getpwnam(SUPERUSER)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root and there is no {SUPERUSER!r} user to run the server as"
                ) from None
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root and `runuser` (util-linux) is missing")
        # Straight under the system temp dir (world-traversable), not under pytest's tmp_path
        # (mode 0700, owned by root): the postgres user must reach it.
        directory = Path(tempfile.mkdtemp(prefix="talkgate-pg-", dir=tempfile.gettempdir()))
        if run_as is not None:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        cluster = cls(bin_dir, directory, run_as, durable)
        try:
            cluster._initdb()
            cluster._start_server()
            cluster.psql(f'CREATE DATABASE "{cluster.database}" TEMPLATE template0')
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def stop(self) -> None:
        """Kill the server (no checkpoint: it is thrown away) and remove its directory."""
        if (self.directory / "data" / "postmaster.pid").exists():
            self._run(self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "30"), check=False)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- databases ---------------------------------------------------------------------

    def url(self, database: str | None = None) -> str:
        """The SQLAlchemy URL of a database in this cluster (``talkgate`` by default)."""
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{database or self.database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (``test_N`` by default, from template0); returns its name."""
        name = name or f"test_{next(self._numbers)}"
        _check_identifier(name)
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever still uses it (an engine a test left open)."""
        _check_identifier(name)
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser through the unix socket; returns psql's unaligned output."""
        # psql is only a client: it may run as root. -X: no ~/.psqlrc.
        cmd = [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        cmd += ["-h", str(self.directory), "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql]
        return self._run(cmd, as_server_user=False).stdout

    # -- internals ---------------------------------------------------------------------

    def _initdb(self) -> None:
        data = self.directory / "data"
        initdb = [str(self.bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8"]
        self._run([*initdb, "--no-locale", "--no-sync", "--no-instructions"])
        settings = {**SETTINGS, "unix_socket_directories": f"'{self.directory}'"}
        if self.durable:
            settings |= {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
        # Appending keeps the file's owner (the server user).
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/databases.py\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))

    def _start_server(self) -> None:
        log = self.directory / "server.log"
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            result = self._run(
                self._pg_ctl("start", "-w", "-t", "30", "-l", str(log), "-o", f"-p {self.port}"), check=False
            )
            if result.returncode == 0:
                return
            port_taken = "could not bind" in _tail(log)
            if not port_taken or attempt == START_ATTEMPTS:
                raise PostgresUnavailable(
                    f"PostgreSQL did not start (pg_ctl exit {result.returncode}):\n{result.stdout}{result.stderr}"
                    f"\n--- {log} ---\n{_tail(log)}"
                )
            time.sleep(0.05)

    def _pg_ctl(self, *args: str) -> list[str]:
        return [str(self.bin_dir / "pg_ctl"), "-D", str(self.directory / "data"), *args]

    def _run(
        self, cmd: list[str], *, check: bool = True, as_server_user: bool = True
    ) -> subprocess.CompletedProcess[str]:
        if as_server_user and self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        # cwd: the server user may not be allowed into ours (initdb would complain).
        # LC_ALL: no dependence on which locales this machine has generated.
        env = {**os.environ, "LC_ALL": "C"}
        result = subprocess.run(cmd, cwd=self.directory, env=env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise PostgresUnavailable(
                f"{' '.join(cmd)} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result


def _check_identifier(name: str) -> None:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain database name: {name!r}")
