"""A bad job file is refused before any work with one line naming the field or file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.jobspec import JobError, load_job
from orchestrator.pool import worker_setup


def write_job(root: Path, **overrides: object) -> Path:
    for name in ("base", "experts/a", "experts/b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text("{}")
    task = root / "tasks" / "t"
    task.mkdir(parents=True, exist_ok=True)
    for split in ("dev", "test"):
        (task / f"{split}.jsonl").write_text(json.dumps({"prompt": "a=", "target": "a"}) + "\n")
    job = {
        "name": "j",
        "models": {"base": "base", "experts": {"a": "experts/a", "b": "experts/b"}},
        "tasks": [{"name": "t", "path": "tasks/t"}],
        "search": {"strategy": "random", "budget": 4},
    }
    job.update(overrides)
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_valid_job_resolves_paths(tmp_path: Path) -> None:
    spec = load_job(write_job(tmp_path))
    assert spec.models.base == (tmp_path / "base").resolve()
    assert spec.models.experts["b"] == (tmp_path / "experts/b").resolve()
    assert spec.tasks[0].path.is_absolute()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"colour": "red"}, "field 'colour': unknown key"),
        (
            {"models": {"base": "nowhere", "experts": {"a": "experts/a"}}},
            "field 'models.base': model 'nowhere': no Hugging Face model folder",
        ),
        ({"search": {"strategy": "annealing"}}, "field 'search.strategy': unknown strategy 'annealing'"),
        ({"search": {"budget": 0}}, "field 'search.budget'"),
        ({"tasks": [{"name": "t", "path": "tasks/missing"}]}, "field 'tasks.0.path': folder not found"),
        ({"space": {"density_range": [0.5, 1.5]}}, "space.density_range"),
        (  # della keeps density ± epsilon in (0, 1): the default range's low end, 0.1, is below epsilon 0.15
            {"space": {"op": "della"}},
            "field 'space' at 0% of its ranges: op 'della': density 0.1 ± epsilon 0.15 must lie in (0, 1)",
        ),
        (  # ... and a range ending at 1 passes through 0.9, where 0.9 + 0.15 > 1
            {"space": {"op": "della", "density_range": [0.2, 1.0]}},
            "field 'space' at 90% of its ranges: op 'della': density 0.92 ± epsilon 0.15",
        ),
        ({"workers": {"cache_gb": -1}}, "field 'workers.cache_gb'"),
        (
            {"tasks": [{"name": "t", "path": "tasks/t", "chat_template": True}]},
            "field 'tasks.0.chat_template': the base model's tokenizer has no chat template",
        ),
        (
            {"tasks": [{"name": "t", "path": "tasks/t", "num_fewshot": 1}]},
            "task 't': num_fewshot 1 needs more than 1 dev examples, got 1",
        ),
    ],
)
def test_bad_job_gets_one_clear_line(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(JobError) as info:
        load_job(write_job(tmp_path, **overrides))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_task_file_that_is_not_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = write_job(tmp_path)
    (tmp_path / "tasks" / "t" / "dev.jsonl").write_text('{"prompt": "a=", "target": "a"}\nnot json\n')
    with pytest.raises(JobError, match=r"dev\.jsonl:2"):
        load_job(path)


def test_missing_and_malformed_job_files(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(JobError, match="not valid YAML"):
        load_job(bad)


def test_rmm_data_scale_sets_the_runs_chunk_size_and_leaves_the_spec_as_submitted(tmp_path: Path) -> None:
    from orchestrator.archive import Archive
    from orchestrator.jobqueue import queue_job
    from orchestrator.launch import run_settings

    path = write_job(tmp_path, search={"strategy": "rmm", "budget": 8, "params": {"data_scale": 0.25}},
                     evaluation={"dev_subset": 5})
    line = json.dumps({"prompt": "a=", "target": "a"}) + "\n"
    (tmp_path / "tasks" / "t" / "dev.jsonl").write_text(line * 8)
    spec = load_job(path)
    assert run_settings(spec, num_layers=1).dev_subset == 2  # 4 chunks of 8 dev examples, as DAR cycles them
    archive = Archive(f"sqlite:///{tmp_path / 'a.db'}")
    stored = archive.job(queue_job(archive, spec)).spec
    assert stored["evaluation"] == {**spec.evaluation.model_dump(mode="json"), "dev_subset": 5}
    assert stored["search"]["params"] == {"data_scale": 0.25}
    search = spec.search.model_copy(update={"strategy": "random", "params": {}})
    random = spec.model_copy(update={"search": search})
    assert run_settings(random, num_layers=1).dev_subset == 5


def test_overrides_are_validated_again(tmp_path: Path) -> None:
    from orchestrator.jobspec import with_overrides

    spec = load_job(write_job(tmp_path))
    assert with_overrides(spec, search={"budget": 9}).search.budget == 9
    with pytest.raises(JobError, match="search.budget"):
        with_overrides(spec, search={"budget": -1})


def test_cache_budget_reaches_the_workers(tmp_path: Path) -> None:
    assert worker_setup(load_job(write_job(tmp_path))).cache_bytes is None  # the worker sizes it by the model
    spec = load_job(write_job(tmp_path, workers={"cache_gb": 0.5}))
    assert worker_setup(spec).cache_bytes == 512 * 1024**2


def test_trust_remote_code_reaches_the_workers(tmp_path: Path) -> None:
    assert worker_setup(load_job(write_job(tmp_path))).trust_remote_code is False
    assert worker_setup(load_job(write_job(tmp_path, trust_remote_code=True))).trust_remote_code is True
