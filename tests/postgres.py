"""A real PostgreSQL for the tests: `initdb` into a temp dir, the server on a free 127.0.0.1 port, stopped by pid.

Uses the Debian `postgresql` package (`/usr/lib/postgresql/*/bin`). If it is absent the fixture installs it
with `apt-get update && apt-get install -y postgresql` and skips the PostgreSQL tests only if that fails (no
network). PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user the package
creates (the subprocess itself switches user: no wrapper process, so the pid is the server's).

Registered in `tests/conftest.py` (`pytest_plugins`). `postgres` is one server per session; `postgres_url` is a
fresh, empty database on it per test.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

USER = "mergesearch"


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _install() -> Path | None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False).returncode != 0:
            return None
    return _bin_dir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One server process; `stop` and `start` again on the same data dir and port (an outage, in a test)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="mergesearch-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        subprocess.run(
            [self.bin / "initdb", "-D", self.data, "-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True, cwd=self.root, **self.as_user,
        )

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 — the server writes to it while it runs
        self.proc = subprocess.Popen(
            [self.bin / "postgres", "-D", self.data, "-p", str(self.port), "-h", "127.0.0.1",
             "-k", self.root, "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, **self.as_user,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run([self.bin / "pg_isready", "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True, check=False)
            if ready.returncode == 0:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("postgres did not become ready in 30 s")

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster, by pid): connections are cut, as in an outage."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = _bin_dir() or _install()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed and `apt-get install -y postgresql` failed")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture()
def postgres_url(postgres: PostgresServer) -> str:
    if postgres.proc is None:  # a test stopped it to simulate an outage and failed before restarting it
        postgres.start()
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def archive_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The archive URL for tests that must hold on both backends: SQLite (the default) and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'archive.db'}"
    return request.getfixturevalue("postgres_url")
