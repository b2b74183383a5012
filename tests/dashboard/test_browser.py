"""The dashboard in headless Chromium against a live service running a real SAE job on the zoo: sign in, watch
the chart grow without a reload, sort the archive, open a candidate, download, cancel and resume.

Needs the Debian `chromium` and `chromium-driver` packages (installed by `ensure_chromium` when absent; the
tests skip, saying so, if that fails) and the quick zoo (`zoo_dir`, built once and cached).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from orchestrator.service.app import create_app
from orchestrator.service.settings import ServiceSettings
from tests.dashboard.live import ZooCluster, browser, ensure_chromium, serving, submit, zoo_job
from tests.service.fixtures import TOKEN

SAE = {
    "strategy": "sae",
    "budget": 60,
    "seed": 0,
    "params": {"archive_size": 6, "initial_sparsities": [0.3], "t0": 2},
}


@pytest.fixture(scope="module")
def chromium() -> None:
    reason = ensure_chromium()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def service(chromium: None, zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    state = tmp_path_factory.mktemp("dashboard-browser")
    settings = ServiceSettings(
        db=f"sqlite:///{state / 'archive.db'}",
        data_roots=[zoo_dir],
        token=TOKEN,
        state_dir=state / "state",
        rebalance_seconds=0.5,
    )
    with serving(create_app(settings, cluster=ZooCluster())) as url:
        yield url


@pytest.fixture()
def driver(chromium: None, tmp_path: Path) -> Iterator[Any]:
    with browser(tmp_path / "downloads") as d:
        d.downloads = tmp_path / "downloads"
        yield d


def until(driver: Any, predicate: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll `predicate` until it is truthy (rows the page redraws may go stale in between: try again)."""
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]
    )
    return wait.until(lambda _d: predicate())


def js(driver: Any, script: str) -> Any:
    """Read the page in one step (no element handle can go stale between finding and reading it)."""
    return driver.execute_script(f"return {script}")


def sign_in(driver: Any, url: str, token: str) -> None:
    driver.get(f"{url}/")
    field = until(driver, lambda: driver.find_element(By.ID, "token"))
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()


def reference_id(url: str, job_id: int, name: str) -> int:
    r = httpx.get(
        f"{url}/jobs/{job_id}/candidates",
        params={"kind": "reference", "limit": 20},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    return next(c["id"] for c in r.json()["items"] if c["name"] == name)


def click(driver: Any, selector: str) -> None:
    until(driver, lambda: driver.find_element(By.CSS_SELECTOR, selector).click() or True)


def test_without_the_token_there_is_only_the_login_form(driver: Any, service: str) -> None:
    driver.get(f"{service}/#/jobs/1")
    until(driver, lambda: driver.find_element(By.ID, "login"))
    assert js(driver, "document.querySelector('#job-title')") is None
    sign_in(driver, service, "not-the-token-0123456789")
    until(driver, lambda: "refused" in driver.find_element(By.ID, "login-error").text)
    assert js(driver, "sessionStorage.getItem('mergesearch.token')") is None
    sign_in(driver, service, TOKEN)
    until(driver, lambda: driver.find_element(By.ID, "jobs"))
    assert js(driver, "sessionStorage.getItem('mergesearch.token')") == TOKEN
    driver.find_element(By.ID, "logout").click()
    until(driver, lambda: driver.find_element(By.ID, "login"))


def test_watch_sort_open_download_cancel_and_resume_a_real_job(
    driver: Any, service: str, zoo_dir: Path
) -> None:
    job_id = submit(service, zoo_job(zoo_dir, "zoo-sae", SAE), zoo_dir)
    sign_in(driver, service, TOKEN)
    click(driver, f'#jobs tr[data-job="{job_id}"]')

    # The chart appears with the first finished candidate and grows as more finish, without a reload.
    until(driver, lambda: int(js(driver, "document.querySelector('#curve').dataset.points || 0")) >= 1, 120)
    driver.execute_script("window.sameDocument = true")
    seen = int(js(driver, "document.querySelector('#curve').dataset.evaluations"))
    until(driver, lambda: int(js(driver, "document.querySelector('#curve').dataset.evaluations")) > seen, 120)
    assert js(driver, "window.sameDocument") is True
    legend = driver.find_element(By.CSS_SELECTOR, "#curve .u-legend").text
    assert all(
        name in legend
        for name in ("best so far", "each evaluation", "ideal", "uniform", "ties", "expert:copy")
    )
    until(driver, lambda: "SAE sparsity schedule" in driver.find_element(By.ID, "strategy-panel").text)

    # Sorting is done by the server: ascending fitness, then back to descending.
    def fitness_column() -> list[float]:
        cells = js(
            driver, "[...document.querySelectorAll('#candidates td.fitness')].map(td => td.textContent)"
        )
        return [float(c) for c in cells if c != "–"]

    click(driver, 'th[data-sort="fitness"]')
    until(driver, lambda: js(driver, "document.querySelector('th.sorted.asc[data-sort=fitness]') !== null"))
    until(driver, lambda: len(fitness_column()) >= 2)
    column = fitness_column()  # read once: the live table may refresh between two reads
    assert column == sorted(column)
    click(driver, 'th[data-sort="fitness"]')
    until(
        driver,
        lambda: js(driver, "document.querySelector('th.sorted:not(.asc)[data-sort=fitness]') !== null"),
    )
    column = fitness_column()
    assert column == sorted(column, reverse=True)

    # Open the newest finished child: its recipe heatmap, scores, lineage back to its parents, mergekit YAML.
    Select(driver.find_element(By.ID, "status-filter")).select_by_value("done")
    click(driver, 'th[data-sort="generation"]')
    first_generation = "document.querySelector('#candidates tbody tr td:nth-child(2)')?.textContent"
    until(driver, lambda: int(js(driver, first_generation) or 0) >= 1, 180)
    click(driver, "#candidates tbody tr")
    until(driver, lambda: driver.find_element(By.ID, "recipe-heatmap"))
    assert js(driver, "document.querySelectorAll('#recipe-heatmap tbody tr').length") == 5  # 4 layers + rest
    assert js(driver, "document.querySelectorAll('#scores tbody tr').length") == 5  # 4 tasks + mean
    assert js(driver, "document.querySelectorAll('#lineage .node').length") >= 3  # the child and two parents
    problems = driver.find_element(By.CSS_SELECTOR, ".problems").text  # SAE prunes the merged task vector
    assert "no mergekit merge method" in problems
    assert js(driver, "document.querySelector('#mergekit-candidate').disabled") is True

    # A reference that mergekit can express exports its YAML, as a file.
    ties = reference_id(service, job_id, "ties")
    driver.get(f"{service}/#/jobs/{job_id}/candidates/{ties}")
    until(driver, lambda: "merge_method: ties" in driver.find_element(By.ID, "mergekit").text)
    assert "No parents" in driver.find_element(By.ID, "lineage").text
    click(driver, "#mergekit-candidate")
    yaml_file = until(driver, lambda: next(driver.downloads.glob("*.mergekit.yaml"), None))
    assert "merge_method: ties" in yaml_file.read_text()

    # Back on the job page: cancel (after confirming), then resume.
    driver.find_element(By.CSS_SELECTOR, f'#crumbs a[href="#/jobs/{job_id}"]').click()
    click(driver, "#cancel:not([disabled])")
    until(driver, lambda: driver.switch_to.alert).accept()
    until(driver, lambda: "cancelled" in driver.find_element(By.ID, "job-title").text, 120)
    assert js(driver, "document.querySelector('#cancel').disabled") is True
    click(driver, "#download-best")
    until(driver, lambda: next(driver.downloads.glob("job-*-candidate-*.tar"), None), 120)
    click(driver, "#resume:not([disabled])")
    until(driver, lambda: "cancelled" not in driver.find_element(By.ID, "job-title").text)
