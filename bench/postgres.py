"""A real PostgreSQL server of one's own: Debian's ``postgresql`` binaries, ``initdb`` + ``pg_ctl`` in a
temporary directory, listening on a loopback port with password authentication.

The tests start one per session (each test that asks gets a fresh database on it); the benches
start one when no ``--db`` DSN is given. As root (CI, this machine) the server runs as the
``postgres`` system user, since PostgreSQL refuses to run as root. ``make test`` installs the
package when it is missing.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PostgresServer", "find_bin_dir"]

USER = "kdgate"


def find_bin_dir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are (the newest installed version), or None."""
    env = os.environ.get("PG_BIN_DIR")
    if env and (Path(env) / "initdb").exists():
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """Start with :meth:`start`, stop with :meth:`stop`; :meth:`create_database` gives a DSN."""

    def __init__(self, bin_dir: Path, *, durable: bool = False):
        self.bin_dir = bin_dir
        # Fast by default (no fsync, asynchronous commits): a test server's data never outlives it.
        # A test that kills the server and counts rows afterwards needs commits to be durable.
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="kdgate-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.password = secrets.token_hex(16)
        self.as_postgres = os.geteuid() == 0
        self._n = 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> "PostgresServer":
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_postgres:
            shutil.chown(self.root, "postgres")
            shutil.chown(pwfile, "postgres")
        os.chmod(self.root, 0o700)
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                  "-E", "UTF8", "--no-instructions", *([] if self.durable else ["--no-sync"]))
        pwfile.unlink()
        conf = self.data / "postgresql.conf"
        with open(conf, "a") as fh:
            fh.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.root}'\n"
                     "max_connections = 200\nshared_buffers = 64MB\nlog_min_messages = warning\n")
            if not self.durable:
                fh.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its DSN."""
        import psycopg

        self._n += 1
        name = f"kdgate_test_{os.getpid()}_{self._n}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[-1]
        try:
            with psycopg.connect(self.url(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error:
            pass

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def kill(self) -> None:
        """Stop the server at once (a lost database, for the tests that need one)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def restart(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")
