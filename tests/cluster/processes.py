"""Real processes for the fault and cluster tests: Ray nodes (`ray start --block`) and `mergesearch serve`.

Each runs in its own session (session id = the pid we started), so killing the processes of that session
takes down exactly that node or service and everything it spawned, and nothing else on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.postgres import free_port

BIN = Path(sys.executable).parent
# Ray's own token auth, with a token of this test session (not ~/.ray/auth_token, which other Rays share).
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
# Detect a dead node in about 3 s instead of Ray's default of about 30 s.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


class Process:
    """A child process in its own session, with its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def session(self) -> list[int]:
        """Every live process of this process's session (Ray moves its workers to process groups of their own,
        but they stay in the session)."""
        assert self.proc is not None
        members = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp session ...
            if fields[0] != "Z" and int(fields[3]) == self.proc.pid:
                members.append(int(entry))
        return members

    def kill(self) -> None:
        """SIGKILL the process and everything in its session, as a crash or a lost machine."""
        if self.proc is None:
            return
        for _ in range(50):
            members = self.session()
            if not members:
                break
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        self.proc.wait()

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process, then SIGKILL its whole session after `grace` seconds at most."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@contextmanager
def short_tempdir() -> Iterator[Path]:
    """A temp dir with a short path: Ray's socket paths under it must stay within 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="msray-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def ray_node(
    tmp: Path, name: str, head_address: str | None = None, num_cpus: int = 1,
    resources: dict[str, float] | None = None, port: int | None = None,
) -> Process:
    """A Ray head (`head_address` None) or worker node; every port distinct, so several share one machine.

    `tmp` must be short (`short_tempdir`): the head puts the cluster's session and sockets under it.
    """
    args = [str(BIN / "ray"), "start", "--block", f"--num-cpus={num_cpus}", "--disable-usage-stats",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            "--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=100000000",
            "--node-ip-address=127.0.0.1"]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    if head_address is None:
        args += ["--head", f"--port={port or free_port()}", "--include-dashboard=false",
                 f"--ray-client-server-port={free_port()}", f"--temp-dir={tmp / 'ray'}"]
    else:
        args += [f"--address={head_address}"]
    return Process(args, tmp / f"{name}.log", env={**RAY_AUTH, **FAST_HEALTH_CHECKS})


def wait_for_nodes(address: str, count: int, nodes: list[Process], timeout: float = 120.0) -> None:
    """Until `count` nodes are alive in the cluster at `address` (asked with `ray status`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            if not node.alive():
                raise AssertionError(f"a Ray node exited:\n{node.tail()}")
        out = subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], capture_output=True, text=True,
                             env={**os.environ, **RAY_AUTH}, check=False)
        if out.returncode == 0 and out.stdout.count(" node_") >= count:
            return
        time.sleep(1.0)
    raise AssertionError(f"the Ray cluster at {address} did not reach {count} nodes in {timeout}s")


def serve(tmp: Path, port: int, db: str, token: str, data_root: Path, *extra: str, log: str = "service") -> Process:
    args = [str(BIN / "mergesearch"), "serve", "--host", "127.0.0.1", "--port", str(port), "--db", db,
            "--data-root", str(data_root), "--state-dir", str(tmp / "state"), *extra]
    return Process(args, tmp / f"{log}.log", env={"MERGESEARCH_TOKEN": token, **RAY_AUTH})


def wait_healthy(url: str, service: Process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise AssertionError(f"the service exited:\n{service.tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the service did not become healthy in {timeout}s:\n{service.tail()}")


def get(url: str, token: str, path: str, **kwargs: Any) -> Any:
    r = httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30, **kwargs)
    r.raise_for_status()
    return r.json()
