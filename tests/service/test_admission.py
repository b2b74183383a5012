"""Hardened admission, against a live service on loopback: every attack a token holder tried is refused with
one 4xx line, before anything is archived or run (issue 15)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from orchestrator.archive import MAX_ID
from orchestrator.service.app import create_app
from orchestrator.service.settings import ServiceSettings
from tests.dashboard.live import serving
from tests.service.fixtures import TOKEN, FakeCluster, job_data, wait_for

LM_EVAL_DATA = Path(__file__).parents[1] / "evaluators" / "data" / "lm_eval"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOMB = """\
name: bomb
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
"""


@pytest.fixture()
def url(settings: ServiceSettings, cluster: FakeCluster) -> Iterator[str]:
    with serving(create_app(settings, cluster=cluster)) as base:
        yield base


def post(url: str, body: str, **params: str) -> httpx.Response:
    return httpx.post(f"{url}/jobs", content=body, params=params, timeout=60,
                      headers={**AUTH, "Content-Type": "application/yaml"})


def edited(path: str, value: Any, **kwargs: Any) -> str:
    """The test job with the value at a dotted path set (lists by index)."""
    data = job_data(**kwargs)
    *parents, last = path.split(".")
    node: Any = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[int(last) if isinstance(node, list) else last] = value
    return yaml.safe_dump(data)


def with_bomb_in(section: str) -> str:
    """The 1 KB billion-laughs document inside a free-form dict of an otherwise valid job."""
    body = yaml.safe_dump(job_data())
    lines = "".join("    " + line + "\n" for line in BOMB.splitlines()[1:])
    return body + f"{section}:\n  params:\n" + lines


REFUSED = {
    "popsize 1e9": (edited("search", {"strategy": "cmaes", "budget": 4, "params": {"popsize": 1e9}}),
                    "field 'search.params.popsize'"),
    "alias bomb in space.params": (with_bomb_in("space"), "aliases are expanded"),
    "recursive alias": ("name: &a [*a]\n", "recursive alias"),
    "deep nesting": ("a: " + "[" * 3000 + "]" * 3000 + "\n", "nested deeper"),
    "budget beyond int64": (edited("search.budget", 2**63), "field 'search.budget'"),
    "an integer beyond int64 in params": (edited("search.params", {"seed_of_my_own": 2**70}), "beyond the largest"),
    "nan": (edited("search", {"strategy": "cmaes", "budget": 4, "params": {"sigma0": float("nan")}}),
            "not a finite number"),
    "inf in a range": (edited("space.weight_range", [0.0, float("inf")]), "not a finite number"),
    "workers.count": (edited("workers.count", 100_000), "field 'workers.count'"),
    "num_cpus": (edited("workers.num_cpus", 1e9), "field 'workers.num_cpus'"),
    "unknown operator": (edited("space.op", "nuke"), "unknown op 'nuke'"),
    "operator parameter": (edited("space.params", {"densty": 0.5}), "field 'space'"),
    "operator in a strategy's pool": (
        edited("search", {"strategy": "rmm", "budget": 4, "params": {"operators": [{"op": "nuke"}]}}),
        "field 'search.params.operators.0'"),
    "strategy parameter": (edited("search.params", {"popsize": 4}), "field 'search.params.popsize'"),
    "grid size": (edited("search", {"strategy": "grid", "params": {"points": 10**6}}),
                  "field 'search.params.points'"),
    "network net": (edited("search", {"strategy": "rmm", "params": {"ppo": {"net_arch": [10**6]}}}),
                    "net_arch"),
    "a name too long": (edited("name", "x" * 1000), "field 'name'"),
    "engine argument naming a file": (
        edited("evaluation", {"backend": "vllm", "engine_args": {"tokenizer": "/etc"}}),
        "field 'evaluation.engine_args.tokenizer'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_attacks_are_refused_with_one_line_and_nothing_archived(url: str, case: str) -> None:
    body, expected = REFUSED[case]
    r = post(url, body)
    assert r.status_code == 400, (case, r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert expected in detail and "\n" not in detail and len(detail) < 400, detail
    assert httpx.get(f"{url}/jobs", headers=AUTH).json() == []


def test_ids_beyond_the_archives_range_are_422_not_500(url: str) -> None:
    job = post(url, yaml.safe_dump(job_data(budget=2))).json()["id"]
    for path, params in [
        (f"/jobs/{MAX_ID + 1}", {}),
        (f"/jobs/{10**30}/candidates", {}),
        (f"/jobs/{job}/candidates", {"offset": str(MAX_ID + 1)}),
        (f"/jobs/{job}/model", {"candidate": str(MAX_ID + 1)}),
        (f"/dashboard/api/jobs/{MAX_ID + 1}", {}),
        (f"/dashboard/api/jobs/{job}/candidates/{MAX_ID + 1}", {}),
    ]:
        r = httpx.get(f"{url}{path}", params=params, headers=AUTH)
        assert r.status_code == 422, (path, r.status_code, r.text)
    assert httpx.get(f"{url}/jobs/{MAX_ID}", headers=AUTH).status_code == 404
    assert httpx.post(f"{url}/jobs/{MAX_ID + 1}/cancel", headers=AUTH).status_code == 422


def test_a_task_named_with_a_quote_is_accepted_and_curved(url: str) -> None:
    data = job_data(budget=3)
    data["tasks"][0]["name"] = 'say "echo"'
    r = post(url, yaml.safe_dump(data))
    assert r.status_code == 201, r.text


@pytest.fixture()
def task_dir(data_root: Path, tmp_path: Path) -> Path:
    """A copy of the lm-eval test task under the data root (a folder of this test's own)."""
    folder = data_root / f"lm-{tmp_path.name}"
    shutil.copytree(LM_EVAL_DATA, folder)
    return folder


def lm_eval_job(task_file: Path) -> str:
    data = job_data()
    data["tasks"] = [{"name": "copy", "lm_eval_yaml": str(task_file)}]
    return yaml.safe_dump(data)


def write_task(folder: Path, name: str, **changes: Any) -> Path:
    config = yaml.safe_load((folder / "zoo_copy.yaml").read_text())
    config.update(changes)
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_lm_eval_task_files_may_not_read_outside_the_data_roots(url: str, task_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"prompt": "x", "target": "y"}\n')
    outside = write_task(task_dir, "outside.yaml",
                         dataset_kwargs={"data_files": {"validation": str(secret), "test": "copy_test.jsonl"}})
    r = post(url, lm_eval_job(outside))
    assert r.status_code == 400 and "data " in r.json()["detail"] and "outside" in r.json()["detail"], r.text
    climbing = write_task(task_dir, "climb.yaml", dataset_kwargs={"data_files": "../../" + secret.name})
    assert post(url, lm_eval_job(climbing)).status_code == 400
    (tmp_path / "base.yaml").write_text((task_dir / "zoo_copy.yaml").read_text())
    included = task_dir / "included.yaml"
    included.write_text(yaml.safe_dump({"include": str(tmp_path / "base.yaml"), "task": "inc"}))
    r = post(url, lm_eval_job(included))
    assert r.status_code == 400 and "included file" in r.json()["detail"], r.text
    assert post(url, lm_eval_job(task_dir / "zoo_copy.yaml")).status_code == 201  # the same task, inside


def function_task(task_dir: Path, marker: Path) -> Path:
    (task_dir / "hooks.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "def process_docs(docs):\n    return docs\n"
    )
    path = write_task(task_dir, "coded.yaml")
    path.write_text(path.read_text() + "process_docs: !function hooks.process_docs\n")
    return path


def test_task_code_runs_only_with_the_servers_opt_in(
    settings: ServiceSettings, cluster: FakeCluster, task_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    body = lm_eval_job(function_task(task_dir, marker))
    with serving(create_app(settings, cluster=cluster)) as url:
        r = post(url, body)
        assert r.status_code == 400 and "--allow-task-code" in r.json()["detail"], r.text
    assert not marker.exists()  # refused without importing the file
    with serving(create_app(settings.model_copy(update={"allow_task_code": True}), cluster=cluster)) as url:
        assert post(url, body).status_code == 201
    assert marker.read_text() == "ran"


def test_an_unschedulable_job_fails_with_its_reason_and_holds_up_no_one(
    settings: ServiceSettings, cluster: FakeCluster
) -> None:
    quick = settings.model_copy(update={"unschedulable_seconds": 1.0})
    with serving(create_app(quick, cluster=cluster)) as url:
        big = post(url, edited("workers.num_cpus", 64, name="big")).json()["id"]
        small = post(url, yaml.safe_dump(job_data(budget=3, name="small"))).json()["id"]
        done = wait_for(lambda: (v := httpx.get(f"{url}/jobs/{small}", headers=AUTH).json())["status"] == "done"
                        and v, timeout=60)
        failed = wait_for(lambda: (v := httpx.get(f"{url}/jobs/{big}", headers=AUTH).json())["status"] == "failed"
                          and v, timeout=60)
    assert done["done"] == 3
    assert "unschedulable" in failed["error"] and "64 CPU" in failed["error"] and "4 CPU" in failed["error"]


def test_cancel_stops_a_job_in_every_state(url: str, cluster: FakeCluster) -> None:
    def view(job: int) -> dict:
        return httpx.get(f"{url}/jobs/{job}", headers=AUTH).json()

    starting_gate = cluster.hold_start("starting")
    running_gate = cluster.hold("running")  # in the driver's thread: its evaluation waits, as on a slow worker
    starting = post(url, yaml.safe_dump(job_data(budget=4, workers=1, name="starting"))).json()["id"]
    running = post(url, yaml.safe_dump(job_data(budget=4, workers=1, name="running"))).json()["id"]
    queued = post(url, yaml.safe_dump(job_data(budget=4, workers=1, name="queued"))).json()["id"]
    # starting: a driver slot and workers, its pool not up (the archive still says queued); running: its driver
    # has begun; queued: behind them (two driver slots).
    wait_for(lambda: view(starting)["workers"] and view(running)["status"] == "running")
    assert view(starting)["status"] == "queued" and view(starting)["phase"] == "starting"
    assert view(queued)["status"] == "queued" and view(queued)["workers"] is None
    for job in (queued, starting, running):
        r = httpx.post(f"{url}/jobs/{job}/cancel", headers=AUTH)
        assert r.status_code == 200, r.text
    running_gate.set()  # the evaluation in flight ends; the driver stops instead of asking for more
    for job in (queued, starting, running):
        wait_for(lambda job=job: view(job)["status"] == "cancelled", timeout=30)
    wait_for(lambda: all(view(j)["workers"] is None for j in (queued, starting, running)))  # drivers gone
    starting_gate.set()
    assert view(starting)["done"] == 0 and view(queued)["done"] == 0 and view(running)["done"] <= 1
