"""Screenshots of the dashboard for the README: `python -m tests.dashboard.screenshots [OUT_DIR]` (default docs/).

Runs the service on a temp archive with real zoo jobs: an SAE search to the end, a PSO search still running and
a random search waiting in the queue behind it (one job runs at a time); then shoots the jobs list, the SAE
job's page and the page of its best candidate with headless Chromium. Takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx

from orchestrator.service.app import create_app
from orchestrator.service.settings import ServiceSettings
from tests.dashboard.live import (
    ZooCluster,
    browser,
    ensure_chromium,
    full_page_screenshot,
    serving,
    submit,
    zoo_job,
)
from tests.service.fixtures import TOKEN, wait_for

SAE = {"strategy": "sae", "budget": 96, "seed": 0, "params": {"archive_size": 8, "t0": 3}}
PSO = {"strategy": "pso", "budget": 90, "seed": 0}
RANDOM = {"strategy": "random", "budget": 64, "seed": 0}


def main(out: Path) -> None:
    from workers.zoo import ZOO_VERSION, build_zoo

    reason = ensure_chromium()
    if reason:
        raise SystemExit(reason)
    zoo = Path(f"~/.cache/mergesearch/test-zoo-{ZOO_VERSION}").expanduser()
    build_zoo(zoo, profile="quick")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        settings = ServiceSettings(
            db=f"sqlite:///{tmp}/archive.db",
            data_roots=[zoo],
            token=TOKEN,
            state_dir=Path(tmp) / "state",
            max_running=1,
        )
        with serving(create_app(settings, cluster=ZooCluster())) as url:
            api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
            sae = submit(url, zoo_job(zoo, "zoo-sae", SAE), zoo)
            wait_for(lambda: api.get(f"/jobs/{sae}").json()["status"] == "done", timeout=1800, every=2)
            pso = submit(url, zoo_job(zoo, "zoo-pso", PSO), zoo)
            submit(url, zoo_job(zoo, "zoo-random", RANDOM), zoo)
            wait_for(lambda: api.get(f"/jobs/{pso}").json()["done"] >= 20, timeout=1800, every=2)
            best = api.get(f"/jobs/{sae}/best").json()["id"]
            with browser(Path(tmp) / "downloads") as driver:
                driver.get(f"{url}/")
                driver.find_element("id", "token").send_keys(TOKEN)
                driver.find_element("css selector", "#login button").click()
                for name, hash_ in [
                    ("jobs", "#/"),
                    ("job", f"#/jobs/{sae}"),
                    ("candidate", f"#/jobs/{sae}/candidates/{best}"),
                ]:
                    driver.set_window_size(1360, 900)
                    driver.get(f"{url}/{hash_}")
                    time.sleep(4)  # two polls: every panel drawn
                    print(full_page_screenshot(driver, out / f"dashboard-{name}.png"))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs"))
