"""End to end as a user runs it: `mergesearch run` on the zoo with 2 Ray workers, `archive`, `pull`, reload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.archive import Archive

MERGESEARCH = str(Path(sys.executable).parent / "mergesearch")


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    return subprocess.run([MERGESEARCH, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def finished_run(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("e2e")
    db = f"sqlite:///{work / 'archive.db'}"
    proc = cli("run", str(zoo_dir / "job.yaml"), "--db", db, "--budget", "16", "--workers", "2",
               "--out", str(work / "best"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"report": report, "db": db, "work": work}


def test_run_reports_references_ideal_and_best(finished_run: dict, zoo_dir: Path) -> None:
    report = finished_run["report"]
    assert report["evaluations"] == 16
    tasks = {t["name"] for t in yaml.safe_load((zoo_dir / "job.yaml").read_text())["tasks"]}
    assert {"uniform", "task_arithmetic", "ties"} <= set(report["references"])
    assert set(report["ideal"]["test"]) == tasks
    best = report["best"]
    assert set(best["dev"]) == tasks and set(best["test"]) == tasks
    assert 0.0 <= best["fitness"] <= 1.0
    # The ideal is the per-task best expert, never below any single expert.
    for name, ref in report["references"].items():
        if name.startswith("expert:"):
            assert all(ref["test"][t] <= report["ideal"]["test"][t] for t in tasks)


def test_archive_lists_best_first(finished_run: dict) -> None:
    proc = cli("archive", str(finished_run["report"]["job_id"]), "--db", finished_run["db"], "--top", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 5
    fitness = [r["fitness"] for r in rows]
    assert fitness == sorted(fitness, reverse=True)
    # The job's model is the best finalist on the whole dev split: one of these five or the best reference.
    chosen = Archive(finished_run["db"]).candidate(finished_run["report"]["best"]["chosen_from"])
    assert chosen.kind == "reference" or chosen.id in {r["id"] for r in rows}
    assert {"id", "status", "fitness", "dev", "test", "recipe", "parents", "generation"} <= set(rows[0])


def test_pulled_model_loads_generates_and_reproduces_the_archived_scores(finished_run: dict, zoo_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.hf import HFBackend
    from evaluators.tasks import load_task

    folder = finished_run["work"] / "best"
    assert (folder / "recipe.json").is_file() and "candidate" in (folder / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("copy:abc=", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    job = yaml.safe_load((zoo_dir / "job.yaml").read_text())
    backend = HFBackend(tok, batch_size=64)
    best = finished_run["report"]["best"]
    for t in job["tasks"]:
        task = load_task(t["name"], zoo_dir / t["path"], max_new_tokens=t.get("max_new_tokens"))
        scores = backend.evaluate(model, task, task.test)
        assert sum(scores) / len(scores) == pytest.approx(best["test"][t["name"]], abs=1e-9)


def test_pull_a_chosen_candidate(finished_run: dict, tmp_path: Path) -> None:
    rows = json.loads(cli("archive", str(finished_run["report"]["job_id"]), "--db", finished_run["db"], "--json").stdout)
    proc = cli("pull", str(finished_run["report"]["job_id"]), "--db", finished_run["db"],
               "--candidate", str(rows[-1]["id"]), "--out", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "m" / "recipe.json").read_text()) == rows[-1]["recipe"]


def test_bad_job_file_is_refused_with_one_line(tmp_path: Path, zoo_dir: Path) -> None:
    job = yaml.safe_load((zoo_dir / "job.yaml").read_text())
    job["searhc"] = {"budget": 3}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    proc = cli("run", str(path), "--db", f"sqlite:///{tmp_path / 'a.db'}")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "searhc" in lines[0]


def test_expert_with_other_shapes_is_refused_naming_model_and_tensor(tmp_path: Path, zoo_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    job = yaml.safe_load((zoo_dir / "job.yaml").read_text())
    first = next(iter(job["models"]["experts"]))
    bad = tmp_path / "bad_expert"
    shutil.copytree(zoo_dir / job["models"]["experts"][first], bad)
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    job["models"] = {"base": str(zoo_dir / "base"), "experts": {**{k: str(zoo_dir / v) for k, v in job["models"]["experts"].items()}, first: str(bad)}}
    job["tasks"] = [{**t, "path": str(zoo_dir / t["path"])} for t in job["tasks"]]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    proc = cli("run", str(path), "--db", f"sqlite:///{tmp_path / 'a.db'}")
    assert proc.returncode == 2
    assert first in proc.stderr and name in proc.stderr
