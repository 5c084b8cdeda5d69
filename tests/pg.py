"""A throwaway PostgreSQL 15 (Debian's binaries) for the tests, on a free 127.0.0.1 port.

Started once per test session (lazily, by the first test that needs it), in a temp dir with
its unix socket there too; stopped at the end of the session.  PostgreSQL refuses to run as
root, so as root the server runs as the ``postgres`` user the Debian package created.
``MEDCLF_REQUIRE_POSTGRES=1`` (``make test``) turns "PostgreSQL unavailable" into a failure.

``dsn_for(key)``: one database per key (e.g. a node's data directory), so a node restarted on
the same data directory finds its state again and unrelated tests never share one.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

PG_BIN = Path(os.environ.get("MEDCLF_PG_BIN", "/usr/lib/postgresql/15/bin"))


class Unavailable(RuntimeError):
    """No PostgreSQL can be started here (the reason says why)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self, *, durable: bool = False) -> None:
        if not (PG_BIN / "initdb").is_file():
            raise Unavailable(f"no PostgreSQL binaries in {PG_BIN} (apt-get install postgresql-15)")
        self.root = Path(tempfile.mkdtemp(prefix="medclf-pg-"))
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise Unavailable("running as root and runuser is missing (PostgreSQL refuses to run as root)")
            shutil.chown(self.root, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        data = self.root / "data"
        self._run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                   "--no-sync", "--no-instructions"])
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root}"
                " -c max_connections=400 -c shared_buffers=64MB")
        if not durable:  # test data: a crash of the *server* is not what the tests exercise
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(self.root / "log"),
                   "-o", opts, "start"])
        self.data = data
        self._n = 0
        self._dbs: dict[str, str] = {}
        self._lock = threading.Lock()

    def _run(self, cmd: list[str]) -> None:
        res = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise Unavailable(f"{Path(cmd[0]).name} failed: {(res.stderr or res.stdout).strip()[-800:]}")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def create_database(self) -> str:
        import psycopg

        with self._lock:
            self._n += 1
            name = f"t{self._n}"
        with psycopg.connect(self.dsn(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def dsn_for(self, key: str) -> str:
        """The DSN of the database kept for ``key`` (created on first use)."""
        with self._lock:
            have = self._dbs.get(key)
        if have is not None:
            return have
        dsn = self.create_database()
        with self._lock:
            return self._dbs.setdefault(key, dsn)

    def stop(self) -> None:
        try:
            self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        except Unavailable:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


_server: PgServer | None = None
_error: str | None = None
_lock = threading.Lock()


def server() -> PgServer:
    """The session's server (started on first call); raises :class:`Unavailable`."""
    global _server, _error
    with _lock:
        if _server is None and _error is None:
            try:
                _server = PgServer()
                atexit.register(stop_server)
            except (Unavailable, OSError, subprocess.SubprocessError) as exc:
                _error = str(exc)
        if _server is None:
            raise Unavailable(_error or "PostgreSQL unavailable")
        return _server


def stop_server() -> None:
    global _server
    with _lock:
        if _server is not None:
            _server.stop()
            _server = None


def required() -> bool:
    return os.environ.get("MEDCLF_REQUIRE_POSTGRES") == "1"


def on_postgres() -> bool:
    """``MEDCLF_TEST_STORE=postgresql``: node-level tests run their store on PostgreSQL."""
    return os.environ.get("MEDCLF_TEST_STORE", "sqlite") == "postgresql"
