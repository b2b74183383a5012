"""`mergesearch compare` on the zoo: every (strategy, seed) is a job; table, JSON and plot are written."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_run_pull import cli


def test_compare_two_strategies_two_seeds(zoo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    proc = cli("compare", str(zoo_dir / "job.yaml"), "--strategies", "random,cmaes", "--seeds", "2",
               "--budget", "3", "--db", f"sqlite:///{tmp_path / 'a.db'}", "--out", str(out), "--json",
               "--ceiling", "0.9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "compare.json").read_text())
    assert [(r["strategy"], r["seed"]) for r in result["runs"]] == [
        ("random", 0), ("random", 1), ("cmaes", 0), ("cmaes", 1)]
    assert len({r["job_id"] for r in result["runs"]}) == 4
    for run in result["runs"]:
        assert len(run["curve"]) == 3 and run["curve"] == sorted(run["curve"])
        assert run["report"]["best"]["test"] is not None
        # Every job has the references (evaluated once, copied with their scores) to warm-start and choose from.
        assert run["report"]["references"] == result["references"]
    static = max(sum(v["test"].values()) / len(v["test"]) for k, v in result["references"].items()
                 if k in ("uniform", "task_arithmetic", "ties"))
    for row in result["summary"]:
        assert len(row["test_means"]) == 2 and row["fraction_of_ceiling"] == row["test_mean"] / 0.9
        assert row["worst_vs_best_static"] == min(row["test_means"]) - static
    assert [r["strategy"] for r in result["summary"]] == ["random", "cmaes"]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ideal |" in (out / "compare.md").read_text()


def test_unknown_strategy_is_refused(zoo_dir: Path, tmp_path: Path) -> None:
    proc = cli("compare", str(zoo_dir / "job.yaml"), "--strategies", "random,annealing",
               "--db", f"sqlite:///{tmp_path / 'a.db'}")
    assert proc.returncode == 2 and "unknown strategy 'annealing'" in proc.stderr
