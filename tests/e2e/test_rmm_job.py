"""A short RMM job on the zoo with 2 workers: episodes are archived candidates, the policy can be inspected."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.archive import Archive
from tests.e2e.test_run_pull import cli


def test_rmm_job_runs_resumable_and_its_policy_is_inspectable(zoo_dir: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'a.db'}"
    proc = cli("run", str(zoo_dir / "job.yaml"), "--strategy", "rmm", "--budget", "8", "--db", db, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    archive = Archive(db)
    rows = archive.candidates(report["job_id"], kind="search")
    assert 0 < len(rows) <= 8 and all(r.status == "done" for r in rows)
    finals = [r for r in rows if r.info.get("final")]
    assert finals and all(r.subset == -1 and r.test is not None for r in finals)
    # Episodes with skips and repeats materialize: every recipe's depth is what its layers say.
    assert all(len(r.recipe["layers"]) >= 1 for r in rows)
    png = tmp_path / "policy.png"
    shown = cli("inspect-policy", str(report["job_id"]), "--db", db, "--plot", str(png), "--json")
    assert shown.returncode == 0, shown.stderr
    merge_map = json.loads(shown.stdout)
    assert len(merge_map["count_map"]) == len(merge_map["layer_labels"])
    assert sum(map(sum, merge_map["count_map"])) >= 1
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_inspect_policy_refuses_other_strategies(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'a.db'}"
    job = Archive(db).create_job({"search": {"strategy": "random", "budget": 1}}, "j")
    proc = cli("inspect-policy", str(job), "--db", db)
    assert proc.returncode == 2 and "not rmm" in proc.stderr
