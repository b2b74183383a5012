"""Candidates that fail (NaN weights, an evaluation error, out of memory) are recorded with their reason and
count toward the budget; the search goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from orchestrator.pool import Work
from orchestrator.service.app import create_app
from orchestrator.service.settings import ServiceSettings
from tests.service.fixtures import TOKEN, FakeCluster, hashed_score, job_yaml, wait_for

FAILURES = [
    {"ok": False, "kind": "nan_output", "error": "nan_output: model.layers.0.mlp.up_proj.weight has NaN"},
    {"ok": False, "kind": "evaluation_error", "error": "evaluation_error: index out of range"},
    {"ok": False, "kind": "out_of_memory", "error": "out_of_memory: CUDA out of memory"},
]


class FailingCluster(FakeCluster):
    """Every third candidate fails, cycling through the failure kinds a worker reports."""

    def evaluate(self, work: Work) -> dict[str, Any]:
        if work.cand_id % 3 == 0:
            return FAILURES[(work.cand_id // 3) % 3]
        return hashed_score(work)


def test_failures_are_recorded_and_the_search_goes_on(tmp_path: Path, slow_root: Path) -> None:
    settings = ServiceSettings(db=f"sqlite:///{tmp_path / 'a.db'}", data_roots=[slow_root], token=TOKEN,
                               state_dir=tmp_path / "state", rebalance_seconds=0.2)
    with TestClient(create_app(settings, cluster=FailingCluster()),
                    headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        job = client.post("/jobs", content=job_yaml(budget=18),
                          headers={"Content-Type": "application/yaml"}).json()["id"]
        view = wait_for(lambda: (v := client.get(f"/jobs/{job}").json())["status"] == "done" and v)
        failed = client.get(f"/jobs/{job}/candidates", params={"status": "failed"}).json()
        events = [e["message"] for e in client.get(f"/jobs/{job}/events", params={"limit": 1000}).json()]
    assert view["status"] == "done" and view["done"] + view["failed"] == 18
    assert view["failed"] == failed["total"] == 6
    assert {c["error"].split(":")[0] for c in failed["items"]} == {"nan_output", "evaluation_error", "out_of_memory"}
    assert all(c["fitness"] is None for c in failed["items"])
    assert sum("failed: out_of_memory" in e for e in events) == 2
