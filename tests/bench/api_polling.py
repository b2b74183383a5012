"""The API under 50 concurrent clients polling a running job's status for 30 s, over loopback.

    python -m tests.bench.api_polling [--clients 50] [--seconds 30]

A server process (the real app on uvicorn, SQLite archive, an in-process cluster whose workers score in
50 ms, so the job keeps changing) and, in this process, `--clients` httpx clients each polling
`GET /jobs/{id}` back to back (one request in flight per client, a 10 s timeout each). Prints one JSON line:
requests, errors (any non-200 or transport error), requests/s and latency percentiles. Target: no errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.postgres import free_port
from tests.service.fixtures import TOKEN, job_yaml


def serve(port: int, root: Path) -> None:
    """The server side (run in a child process)."""
    import uvicorn

    from orchestrator.service.app import create_app
    from orchestrator.service.settings import ServiceSettings
    from tests.service.fixtures import FakeCluster, make_data_root

    make_data_root(root / "data")
    settings = ServiceSettings(db=f"sqlite:///{root / 'archive.db'}", data_roots=[root / "data"], token=TOKEN,
                               state_dir=root / "state")
    uvicorn.run(create_app(settings, cluster=FakeCluster(delay=0.05)), host="127.0.0.1", port=port,
                log_level="error")


async def poll(client: httpx.AsyncClient, path: str, until: float, latencies: list[float], errors: list[str]) -> None:
    while time.monotonic() < until:
        start = time.perf_counter()
        try:
            r = await client.get(path)
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:100]}")
        except httpx.HTTPError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        latencies.append(time.perf_counter() - start)


async def load(url: str, job: int, clients: int, seconds: float) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10,
                                 limits=limits) as client:
        start = time.monotonic()
        await asyncio.gather(*(poll(client, f"/jobs/{job}", start + seconds, latencies, errors)
                               for _ in range(clients)))
        return latencies, errors, time.monotonic() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), Path(args.serve[1]))
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([sys.executable, "-m", "tests.bench.api_polling", "--serve", str(port), tmp])
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.3)
            r = httpx.post(f"{url}/jobs", content=job_yaml(budget=1_000_000),
                           headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/yaml"})
            r.raise_for_status()
            job = r.json()["id"]
            latencies, errors, wall = asyncio.run(load(url, job, args.clients, args.seconds))
            done = httpx.get(f"{url}/jobs/{job}", headers={"Authorization": f"Bearer {TOKEN}"}).json()["done"]
        finally:
            server.terminate()
            server.wait(30)
    print(json.dumps({
        "bench": "api_polling", "clients": args.clients, "seconds": round(wall, 1), "requests": len(latencies),
        "errors": len(errors), "first_error": errors[0] if errors else None,
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(1000 * percentile(latencies, 0.50), 1), "p95_ms": round(1000 * percentile(latencies, 0.95), 1),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 1), "max_ms": round(1000 * max(latencies), 1),
        "job_candidates_done_meanwhile": done, "ok": not errors,
    }))


if __name__ == "__main__":
    main()
