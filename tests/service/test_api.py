"""The HTTP API against an in-process cluster: auth, submission, progress, paging, queue, cancel and resume."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.service.fixtures import TOKEN, FakeCluster, job_data, job_yaml, wait_for

YAML = {"Content-Type": "application/yaml"}


def submit(client: TestClient, body: str, **params: str) -> dict:
    r = client.post("/jobs", content=body, headers=YAML, params=params)
    assert r.status_code == 201, r.text
    return r.json()


def finished(client: TestClient, job_id: int) -> dict | None:
    view = client.get(f"/jobs/{job_id}").json()
    return view if view["status"] in ("done", "failed", "cancelled") else None


def test_health_needs_no_token_and_everything_else_does(client: TestClient) -> None:
    bare = TestClient(client.app)
    assert bare.get("/health").json()["status"] == "ok"
    for method, path in [("get", "/jobs"), ("get", "/jobs/1"), ("post", "/jobs/1/cancel"), ("get", "/openapi.json")]:
        r = getattr(bare, method)(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"detail": "missing bearer token"}
    wrong = bare.get("/jobs", headers={"Authorization": f"Bearer {TOKEN[:-1]}x"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong bearer token"
    assert bare.get("/jobs", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401


def test_openapi_schema_lists_the_endpoints(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/candidates", "/jobs/{job_id}/best",
            "/jobs/{job_id}/cancel", "/jobs/{job_id}/resume", "/jobs/{job_id}/model", "/health"} <= set(paths)
    assert "application/yaml" in paths["/jobs"]["post"]["requestBody"]["content"]


def test_a_submitted_job_runs_exactly_its_budget(client: TestClient) -> None:
    view = submit(client, job_yaml(budget=7, references=True))
    assert view["status"] in ("queued", "running") and view["budget"] == 7
    done = wait_for(lambda: finished(client, view["id"]))
    assert done["status"] == "done" and done["done"] == 7 and done["failed"] == 0
    page = client.get(f"/jobs/{view['id']}/candidates", params={"limit": 3}).json()
    assert page["total"] == 7 and len(page["items"]) == 3
    fitness = [c["fitness"] for c in page["items"]]
    assert fitness == sorted(fitness, reverse=True)
    rest = client.get(f"/jobs/{view['id']}/candidates", params={"limit": 10, "offset": 3}).json()["items"]
    assert len(rest) == 4 and max(c["fitness"] for c in rest) <= fitness[-1]
    by_id = client.get(f"/jobs/{view['id']}/candidates", params={"order": "id", "descending": False}).json()
    assert [c["id"] for c in by_id["items"]] == sorted(c["id"] for c in by_id["items"])
    refs = client.get(f"/jobs/{view['id']}/candidates", params={"kind": "reference"}).json()
    assert refs["total"] == 6 and all(c["status"] == "done" for c in refs["items"])  # base, 2 experts, 3 merges
    best = client.get(f"/jobs/{view['id']}/best").json()
    assert best["kind"] == "final" and best["test"] is not None  # the finalist best on the whole dev split
    assert done["best_fitness"] == best["fitness"]  # its whole-dev score, not the best chunk score
    events = [e["message"] for e in client.get(f"/jobs/{view['id']}/events").json()]
    assert "job done" in events
    listed = client.get("/jobs").json()
    assert [j["id"] for j in listed] == [view["id"]]
    assert client.get("/jobs", params={"status": "running"}).json() == []


def test_candidate_filters_are_validated(client: TestClient) -> None:
    job = submit(client, job_yaml(budget=2))
    wait_for(lambda: finished(client, job["id"]))
    r = client.get(f"/jobs/{job['id']}/candidates", params={"order": "name"})
    assert r.status_code == 422 and "order" in json.dumps(r.json()["detail"])
    assert client.get(f"/jobs/{job['id']}/candidates", params={"limit": 0}).status_code == 422
    failed = client.get(f"/jobs/{job['id']}/candidates", params={"status": "failed"}).json()
    assert failed == {"total": 0, "offset": 0, "limit": 50, "items": []}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d, root: d["models"].update(base="../../etc"), "models.base"),
        (lambda d, root: d["models"]["experts"].update(e1="/etc"), "models.experts.e1"),
        (lambda d, root: d["tasks"][0].update(path=str(root.parent)), "tasks.0.path"),
        (lambda d, root: d.update(trust_remote_code=True), "trust_remote_code"),
        (lambda d, root: d["search"].update(budget=0), "search.budget"),
    ],
)
def test_bad_jobs_are_refused_naming_the_field(client: TestClient, data_root: Path, change, field: str) -> None:
    data = job_data()
    change(data, data_root)
    r = client.post("/jobs", content=yaml.safe_dump(data), headers=YAML)
    assert r.status_code == 400, r.text
    assert f"field '{field}'" in r.json()["detail"]
    assert client.get("/jobs").json() == []


def test_symlinks_out_of_the_data_root_are_refused(client: TestClient, data_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    link = data_root / "models" / "sneaky"
    link.symlink_to(outside)
    shard_link = data_root / "models" / "expert1" / "extra.safetensors"
    shard_link.symlink_to(outside / "config.json")
    try:
        data = job_data()
        data["models"]["experts"]["e1"] = "models/sneaky"
        r = client.post("/jobs", content=yaml.safe_dump(data), headers=YAML)
        assert r.status_code == 400 and "field 'models.experts.e1'" in r.json()["detail"]
        r = client.post("/jobs", content=job_yaml(), headers=YAML)
        assert r.status_code == 400 and "extra.safetensors links outside" in r.json()["detail"]
    finally:
        link.unlink()
        shard_link.unlink()


def test_root_must_be_inside_the_data_roots(client: TestClient, data_root: Path) -> None:
    r = client.post("/jobs", content=job_yaml(), headers=YAML, params={"root": str(data_root.parent)})
    assert r.status_code == 400 and "field 'root'" in r.json()["detail"]
    relative_to_models = job_data()
    relative_to_models["models"] = {"base": "base", "experts": {"e0": "expert0", "e1": "expert1"}}
    relative_to_models["tasks"][0]["path"] = "../tasks/echo"
    r = client.post("/jobs", content=yaml.safe_dump(relative_to_models), headers=YAML,
                    params={"root": str(data_root / "models")})
    assert r.status_code == 400 and "'..'" in r.json()["detail"]


def test_bad_yaml_and_oversized_bodies(client: TestClient) -> None:
    r = client.post("/jobs", content="models: [unclosed", headers=YAML)
    assert r.status_code == 400 and r.json()["detail"].startswith("job:")
    r = client.post("/jobs", content="x" * (65 * 1024), headers=YAML)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(70):
            yield b"#" * 1024

    r = client.post("/jobs", content=chunks(), headers=YAML)
    assert r.status_code == 413


def test_jobs_beyond_capacity_wait_in_order(client: TestClient, cluster: FakeCluster) -> None:
    cluster.gate.clear()  # hold every evaluation
    ids = [submit(client, job_yaml(budget=3, name=f"j{i}"))["id"] for i in range(4)]
    wait_for(lambda: [j["status"] for j in client.get("/jobs").json()][:2] == ["running", "running"])
    views = {j["id"]: j for j in client.get("/jobs").json()}
    assert [views[i]["queue_position"] for i in ids] == [None, None, 1, 2]
    assert [views[i]["status"] for i in ids[2:]] == ["queued", "queued"]
    assert views[ids[0]]["workers"] == 2 and views[ids[1]]["workers"] == 2
    cluster.gate.set()
    for i in ids:
        assert wait_for(lambda i=i: finished(client, i))["done"] == 3
    views = [client.get(f"/jobs/{i}").json() for i in ids]
    first_end = min(views[0]["finished_at"], views[1]["finished_at"])
    assert views[2]["started_at"] >= first_end and views[3]["started_at"] >= first_end


def test_one_at_a_time_runs_in_submission_order(settings, cluster: FakeCluster) -> None:
    from orchestrator.service.app import create_app

    app = create_app(settings.model_copy(update={"max_running": 1}), cluster=cluster)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        cluster.gate.clear()
        ids = [submit(client, job_yaml(budget=2, name=f"j{i}"))["id"] for i in range(3)]
        wait_for(lambda: client.get(f"/jobs/{ids[0]}").json()["status"] == "running")
        assert [client.get(f"/jobs/{i}").json()["queue_position"] for i in ids] == [None, 1, 2]
        cluster.gate.set()
        views = [wait_for(lambda i=i: finished(client, i)) for i in ids]
    assert views[0]["finished_at"] <= views[1]["started_at"] and views[1]["finished_at"] <= views[2]["started_at"]


def test_cancel_and_resume_lose_and_repeat_nothing(client: TestClient, cluster: FakeCluster) -> None:
    cluster.hold_after(4)
    job = submit(client, job_yaml(budget=12, workers=2))["id"]
    wait_for(lambda: client.get(f"/jobs/{job}").json()["done"] >= 2)
    r = client.post(f"/jobs/{job}/cancel")
    assert r.status_code == 200
    cluster.gate.set()
    view = wait_for(lambda: finished(client, job))
    assert view["status"] == "cancelled" and view["done"] < 12
    assert client.post(f"/jobs/{job}/cancel").status_code == 409
    resumed = client.post(f"/jobs/{job}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] in ("queued", "running")
    view = wait_for(lambda: finished(client, job))
    assert view["status"] == "done" and view["done"] == 12
    items = client.get(f"/jobs/{job}/candidates", params={"limit": 100}).json()["items"]
    assert len(items) == 12 and len({c["recipe_hash"] for c in items}) == 12
    assert sorted(c["number"] for c in items) == list(range(12))
    r = client.post(f"/jobs/{job}/resume")
    assert r.status_code == 409 and "done" in r.json()["detail"]


def test_cancel_a_queued_job(client: TestClient, cluster: FakeCluster) -> None:
    cluster.gate.clear()
    ids = [submit(client, job_yaml(budget=2, name=f"j{i}"))["id"] for i in range(3)]
    wait_for(lambda: client.get(f"/jobs/{ids[1]}").json()["status"] == "running")
    r = client.post(f"/jobs/{ids[2]}/cancel")
    assert r.json()["status"] == "cancelled" and r.json()["queue_position"] is None
    cluster.gate.set()
    for i in ids[:2]:
        assert wait_for(lambda i=i: finished(client, i))["status"] == "done"
    assert client.get(f"/jobs/{ids[2]}/candidates").json()["total"] == 0


def test_unknown_jobs_are_404(client: TestClient) -> None:
    for method, path in [("get", "/jobs/99"), ("get", "/jobs/99/candidates"), ("get", "/jobs/99/best"),
                         ("post", "/jobs/99/cancel"), ("post", "/jobs/99/resume"), ("get", "/jobs/99/model")]:
        r = getattr(client, method)(path)
        assert r.status_code == 404 and r.json()["detail"] == "job 99 not found", path


def test_download_streams_the_pulled_model_as_tar(client: TestClient, settings) -> None:
    job = submit(client, job_yaml(budget=2))["id"]
    wait_for(lambda: finished(client, job))
    best = client.get(f"/jobs/{job}/best").json()
    with client.stream("GET", f"/jobs/{job}/model") as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
        body = b"".join(r.iter_bytes())
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = tar.getnames()
        prefix = f"job-{job}-candidate-{best['id']}/"
        assert all(n.startswith(prefix) for n in names)
        assert {prefix + "config.json", prefix + "recipe.json", prefix + "README.md"} <= set(names)
        assert any(n.endswith(".safetensors") for n in names)
        recipe = json.load(tar.extractfile(prefix + "recipe.json"))
    assert recipe == best["recipe"]
    cached = settings.state_dir / "models" / f"job-{job}-candidate-{best['id']}"
    assert cached.is_dir()
    again = client.get(f"/jobs/{job}/model", params={"candidate": best["id"]})
    assert again.content == body
    other = client.get(f"/jobs/{job}/model", params={"candidate": 10_000})
    assert other.status_code == 404


def test_download_refuses_unfinished_and_unbuildable_candidates(client: TestClient) -> None:
    from sqlalchemy import update

    from orchestrator.archive import Candidate

    job = submit(client, job_yaml(budget=3))["id"]
    wait_for(lambda: finished(client, job))
    first, second = client.get(f"/jobs/{job}/candidates", params={"limit": 2}).json()["items"]
    archive = client.app.state.archive
    archive.transaction(lambda s: s.execute(update(Candidate).where(Candidate.id == first["id"])
                                            .values(status="failed")))
    r = client.get(f"/jobs/{job}/model", params={"candidate": first["id"]})
    assert r.status_code == 409 and r.json()["detail"] == f"candidate {first['id']} is failed, not done"
    archive.transaction(lambda s: s.execute(update(Candidate).where(Candidate.id == second["id"])
                                            .values(recipe={"format": "mergesearch.recipe/0"})))
    r = client.get(f"/jobs/{job}/model", params={"candidate": second["id"]})
    assert r.status_code == 500 and r.json()["detail"].startswith(f"cannot materialize candidate {second['id']}")
