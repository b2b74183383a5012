"""Fair sharing: progressive filling over the cluster's resources, rebalanced as jobs start and end."""

from __future__ import annotations

import threading
from collections.abc import Callable

from fastapi.testclient import TestClient

from orchestrator.jobspec import JobSpec
from orchestrator.pool import Pool
from orchestrator.service.scheduler import fair_shares
from tests.service.fixtures import FakeCluster, job_yaml, wait_for

CPU = {"CPU": 1.0}
GPU = {"CPU": 1.0, "GPU": 1.0}
YAML = {"Content-Type": "application/yaml"}


def test_fair_shares_fill_evenly_and_respect_wants_and_resources() -> None:
    assert fair_shares([(4, CPU), (4, CPU)], {"CPU": 4}) == [2, 2]
    assert fair_shares([(1, CPU), (8, CPU)], {"CPU": 6}) == [1, 5]
    assert fair_shares([(4, CPU), (4, CPU), (4, CPU)], {"CPU": 4}) == [2, 1, 1]
    assert fair_shares([(4, GPU), (4, CPU)], {"CPU": 8, "GPU": 2}) == [2, 4]
    assert fair_shares([(2, GPU)], {"CPU": 8}) == [0]
    assert fair_shares([(1, CPU)] * 5, {"CPU": 4}) == [1, 1, 1, 1, 0]


def test_workers_move_between_jobs_as_they_start_and_end(client: TestClient, cluster: FakeCluster) -> None:
    a_gate, b_gate = cluster.hold("a"), cluster.hold("b")
    a = client.post("/jobs", content=job_yaml(budget=12, workers=4, name="a"), headers=YAML).json()["id"]
    wait_for(lambda: client.get(f"/jobs/{a}").json()["workers"] == 4)
    b = client.post("/jobs", content=job_yaml(budget=4, workers=4, name="b"), headers=YAML).json()["id"]
    wait_for(lambda: client.get(f"/jobs/{b}").json()["workers"] == 2)
    view = client.get(f"/jobs/{a}").json()
    assert view["workers"] == 2, view  # 4 CPUs: two each
    b_gate.set()  # b runs to the end while a is held
    wait_for(lambda: client.get(f"/jobs/{b}").json()["status"] == "done")
    wait_for(lambda: client.get(f"/jobs/{a}").json()["workers"] == 4)  # a gets b's workers back
    assert client.get(f"/jobs/{b}").json()["done"] == 4
    a_gate.set()
    wait_for(lambda: client.get(f"/jobs/{a}").json()["status"] == "done")
    assert cluster.pools["a"].size == 4 and client.get(f"/jobs/{a}").json()["done"] == 12


def test_a_share_changed_while_a_pool_starts_reaches_the_pool(client: TestClient, cluster: FakeCluster) -> None:
    """A Ray pool takes seconds to start; a rebalance landing meanwhile must still resize it."""
    starting, release = threading.Event(), threading.Event()
    make_pool = cluster.pool

    def slow_pool(spec: JobSpec, workers: int, should_stop: Callable[[], bool]) -> Pool:
        if spec.name == "a":
            starting.set()
            release.wait(30)
        return make_pool(spec, workers, should_stop)

    cluster.pool = slow_pool  # type: ignore[method-assign]
    a_gate, b_gate = cluster.hold("a"), cluster.hold("b")
    a = client.post("/jobs", content=job_yaml(budget=4, workers=4, name="a"), headers=YAML).json()["id"]
    assert starting.wait(30)
    b = client.post("/jobs", content=job_yaml(budget=4, workers=4, name="b"), headers=YAML).json()["id"]
    wait_for(lambda: client.get(f"/jobs/{a}").json()["workers"] == 2)  # a's share halved before its pool exists
    release.set()
    wait_for(lambda: "a" in cluster.pools)
    wait_for(lambda: cluster.pools["a"].target == 2)
    a_gate.set()
    b_gate.set()
    for job in (a, b):
        wait_for(lambda job=job: client.get(f"/jobs/{job}").json()["status"] == "done")


def test_a_job_waits_while_the_cluster_is_full(client: TestClient, cluster: FakeCluster) -> None:
    cluster.cpus = 1  # room for one worker: a second job cannot get its minimum of one
    cluster.gate.clear()
    first = client.post("/jobs", content=job_yaml(budget=2, workers=1, name="x"), headers=YAML).json()["id"]
    second = client.post("/jobs", content=job_yaml(budget=2, workers=1, name="y"), headers=YAML).json()["id"]
    wait_for(lambda: client.get(f"/jobs/{first}").json()["status"] == "running")
    assert client.get(f"/jobs/{second}").json()["queue_position"] == 1  # max_running is 2, capacity says no
    cluster.gate.set()
    wait_for(lambda: client.get(f"/jobs/{second}").json()["status"] == "done")
    assert (
        client.get(f"/jobs/{first}").json()["finished_at"]
        <= client.get(f"/jobs/{second}").json()["started_at"]
    )
