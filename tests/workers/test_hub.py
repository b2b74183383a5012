"""Models named by Hub id: found in a Hugging Face cache folder the test builds, offline; local paths win."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.jobspec import JobError, load_job
from orchestrator.service.confine import confine_job
from tests.workers.synthetic import make_models, tiny_config
from workers.hub import ModelNotFoundError, locate_model
from workers.mergekit_config import recipe_from_mergekit

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache (HF_HUB_CACHE) holding `org/base` and `org/expert` as the hub lays them out."""
    cache = tmp_path / "hf-cache"
    base, experts = make_models(tmp_path / "made", n_experts=1, config=tiny_config(layers=2, hidden=16))
    for repo, folder in (("base", base), ("expert", experts["expert0"])):
        repo_dir = cache / f"models--org--{repo}"
        shutil.copytree(folder, repo_dir / "snapshots" / REVISION)
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(REVISION)
    # huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at import: set what it read.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_is_found_in_the_cache(hub_cache: Path, tmp_path: Path) -> None:
    snapshot = hub_cache / "models--org--base" / "snapshots" / REVISION
    assert locate_model("org/base", tmp_path / "jobs") == snapshot


def test_a_local_folder_wins_over_the_cache(hub_cache: Path, tmp_path: Path) -> None:
    local = tmp_path / "jobs" / "org" / "base"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    assert locate_model("org/base", tmp_path / "jobs") == local


def test_unknown_hub_id_offline_is_one_line_naming_the_model(hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        locate_model("org/missing", tmp_path)
    message = str(info.value)
    assert message.startswith("model 'org/missing': ") and "HF_HUB_OFFLINE" in message
    assert "\n" not in message


def test_job_file_and_mergekit_config_take_hub_ids(hub_cache: Path, tmp_path: Path) -> None:
    task = tmp_path / "tasks" / "t"
    task.mkdir(parents=True)
    for split in ("dev", "test"):
        (task / f"{split}.jsonl").write_text('{"prompt": "a=", "target": "a"}\n')
    job = {
        "models": {"base": "org/base", "experts": {"e": "org/expert"}},
        "tasks": [{"name": "t", "path": "tasks/t"}],
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    spec = load_job(tmp_path / "job.yaml")
    assert spec.models.base == hub_cache / "models--org--base" / "snapshots" / REVISION
    assert spec.models.experts["e"] == hub_cache / "models--org--expert" / "snapshots" / REVISION

    _, paths = recipe_from_mergekit(
        "merge_method: task_arithmetic\nbase_model: org/base\n"
        "models: [{model: org/expert, parameters: {weight: 0.5}}]\n"
    )
    assert paths["base"] == spec.models.base and list(paths.values())[1] == spec.models.experts["e"]

    job["models"]["experts"] = {"e": "org/nothere"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    with pytest.raises(JobError, match=r"field 'models.experts.e': model 'org/nothere': .*HF_HUB_OFFLINE"):
        load_job(tmp_path / "job.yaml")


def test_merge_command_takes_hub_ids_in_a_recipe_json(hub_cache: Path, tmp_path: Path) -> None:
    config = tmp_path / "recipe.json"
    config.write_text(
        json.dumps(
            {
                "models": {"base": "base", "experts": ["e"]},
                "layers": [{"from": i, "op": "copy", "params": {"model": "e"}} for i in range(2)],
                "rest": {"op": "copy", "params": {"model": "base"}},
                "sources": {"base": "org/base", "e": "org/expert"},
            }
        )
    )
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_server_takes_no_hub_ids(hub_cache: Path, tmp_path: Path) -> None:
    """A job sent to the service reads only its data roots: not the server's cache, nor the hub."""
    job = {
        "models": {"base": "org/base", "experts": {"e": "org/expert"}},
        "tasks": [{"name": "t", "path": "t"}],
    }
    with pytest.raises(JobError, match="field 'models.base': model 'org/base': no Hugging Face model folder"):
        confine_job(job, roots=[tmp_path / "data"])
