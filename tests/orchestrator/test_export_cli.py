"""`mergesearch export`: archived candidates as mergekit YAML, with what cannot be expressed on stderr."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from orchestrator.archive import Archive
from orchestrator.cli import app
from workers.recipe import FORMAT, canonical_hash

SPEC = {"name": "j", "models": {"base": "/m/base", "experts": {"a": "/m/a", "b": "/m/b"}},
        "search": {"strategy": "random", "budget": 2}}


def recipe(op: str, params: dict) -> dict:
    return {"format": FORMAT, "models": {"base": "base", "experts": ["a", "b"]},
            "layers": [{"from": i, "op": op, "params": params} for i in range(2)],
            "rest": {"op": op, "params": params}, "seed": 0}


def archive_with(tmp_path: Path, recipes: list[dict]) -> tuple[str, int, list[int]]:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    archive = Archive(url)
    job = archive.create_job(SPEC, "j")
    ids = archive.add_candidates(job, [{"number": i, "recipe": r, "recipe_hash": canonical_hash(r)}
                                       for i, r in enumerate(recipes)])
    for cid, f in zip(ids, (0.9, 0.5)):
        archive.finish(cid, {"status": "done", "fitness": f})
    return url, job, ids


def test_best_candidate_exports_as_mergekit_ties(tmp_path: Path) -> None:
    ties = recipe("ties", {"weights": [0.7, 0.3], "density": 0.4})
    url, job, _ = archive_with(tmp_path, [ties, recipe("linear", {"weights": [1.0, 1.0]})])
    result = CliRunner().invoke(app, ["export", str(job), "--db", url])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(result.stdout)
    assert config["merge_method"] == "ties"
    assert config["base_model"] == "/m/base"


def test_unexpressible_parts_are_listed(tmp_path: Path) -> None:
    cabs = recipe("cabs", {"weights": [1.0, 1.0], "n": 1, "m": 4})
    url, job, ids = archive_with(tmp_path, [cabs, cabs])
    result = CliRunner().invoke(app, ["export", str(job), "--candidate", str(ids[0]), "--db", url,
                                      "--out", str(tmp_path / "m.yaml")])
    assert result.exit_code == 0, result.output
    assert "not expressible in mergekit" in result.output and "cabs" in result.output
    assert (tmp_path / "m.yaml").is_file()


def test_unknown_format_and_candidate_are_one_line_errors(tmp_path: Path) -> None:
    url, job, _ = archive_with(tmp_path, [recipe("linear", {"weights": [1.0, 1.0]})] * 2)
    bad = CliRunner().invoke(app, ["export", str(job), "--format", "gguf", "--db", url])
    assert bad.exit_code == 2 and "unknown format 'gguf'" in bad.output
    missing = CliRunner().invoke(app, ["export", str(job), "--candidate", "999", "--db", url])
    assert missing.exit_code == 2 and "job 1 has no candidate 999" in missing.output


def test_whole_layer_copies_export_as_a_passthrough_frankenmerge(tmp_path: Path) -> None:
    copies = {**recipe("copy", {"model": "a"}), "rest": {"op": "copy", "params": {"model": "a"}}}
    copies["layers"] = [
        {"from": f, "op": "copy", "params": {"model": m}} for f, m in ((0, "a"), (1, "a"), (1, "b"), (0, "b"))
    ]
    url, job, _ = archive_with(tmp_path, [copies, copies])
    result = CliRunner().invoke(app, ["export", str(job), "--db", url])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(result.stdout)
    assert config["merge_method"] == "passthrough"
    ranges = [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in config["slices"]]
    assert ranges == [("/m/a", [0, 2]), ("/m/b", [1, 2]), ("/m/b", [0, 1])]
    assert "head: copies 'a'; passthrough takes it from the last slice's model" in result.output
