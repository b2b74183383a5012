"""A real service on a free loopback port (uvicorn in a thread), real zoo jobs for it, and a headless Chromium:
what the terminal view's and the browser's tests and `python -m tests.dashboard.screenshots` run against.

Chromium comes from the Debian `chromium` and `chromium-driver` packages; `ensure_chromium` installs them with
`apt-get update && apt-get install -y chromium chromium-driver` when `/usr/bin/chromium` is absent.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from fastapi import FastAPI

from orchestrator.jobspec import JobSpec
from orchestrator.pool import LocalPool, Pool, worker_setup
from tests.service.fixtures import TOKEN, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


class ZooCluster:
    """Workers that really merge and score zoo models, one `ModelWorker` per job evaluating in the driver's
    thread: a real job without starting Ray."""

    def __init__(self, cpus: int = 2) -> None:
        self.cpus = cpus

    def capacity(self) -> dict[str, float]:
        return {"CPU": float(self.cpus)}

    def pool(self, spec: JobSpec, workers: int, should_stop: Callable[[], bool] = lambda: False) -> Pool:
        from workers.worker import ModelWorker

        worker = ModelWorker(worker_setup(spec))
        return LocalPool.of_worker(worker, workers)

    def close(self) -> None:
        pass


def zoo_job(zoo_dir: Path, name: str, search: dict[str, Any], dev_subset: int = 16) -> str:
    """The zoo's own job file with another search, smaller dev chunks and one worker, as YAML."""
    job = yaml.safe_load((zoo_dir / "job.yaml").read_text())
    job.update(name=name, search=search, workers={"count": 1, "num_cpus": 1})
    job["evaluation"].update(dev_subset=dev_subset, batch_size=dev_subset)
    return yaml.safe_dump(job)


def submit(url: str, job_yaml: str, root: Path) -> int:
    r = httpx.post(
        f"{url}/jobs",
        content=job_yaml,
        params={"root": str(root)},
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/yaml"},
        timeout=60,
    )
    r.raise_for_status()
    return int(r.json()["id"])


def ensure_chromium() -> str | None:
    """Install Chromium and its driver if absent; returns why the browser cannot run, or None."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        subprocess.run(
            "apt-get update && apt-get install -y chromium chromium-driver",
            shell=True,
            capture_output=True,
            timeout=900,
            check=False,
        )
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    return (
        f"{' and '.join(missing)} missing: `apt-get install -y chromium chromium-driver` failed"
        if missing
        else None
    )


@contextmanager
def browser(downloads: Path, width: int = 1360, height: int = 900) -> Iterator[Any]:
    """Headless Chromium driven by Selenium, with a fresh profile that downloads into `downloads`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = Path(tempfile.mkdtemp(prefix="mergesearch-chromium-"))
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def full_page_screenshot(driver: Any, path: Path, width: int = 1360, most: int = 1700) -> Path:
    """The page down to `most` pixels, not just the viewport: the window is stretched to the document first."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(height, most))
    driver.save_screenshot(str(path))
    return path
