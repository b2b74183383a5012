"""lm-eval tasks on the zoo: local task YAMLs (shipped in data/lm_eval), scored on the resident model object.

lm-eval's scores are checked against mergesearch's own HF backend on the same examples: two independent
implementations of greedy exact match and of choice log-likelihood must agree doc by doc.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from evaluators.hf import HFBackend
from evaluators.lm_eval_adapter import LMEvalError, LMEvalScorer, LMEvalTask, load_lm_eval_task
from evaluators.tasks import Example, Task
from orchestrator.driver import reference_recipes
from orchestrator.jobspec import JobError, load_job
from workers.worker import ModelWorker, TaskSetup, WorkerSetup

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra 'lmeval'")

DATA = Path(__file__).parent / "data" / "lm_eval"
COPY_YAML = DATA / "zoo_copy.yaml"
CHOICE_YAML = DATA / "zoo_add_choice.yaml"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer(zoo_dir: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(zoo_dir / "base")


@pytest.fixture(scope="module")
def base(zoo_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(zoo_dir / "base").eval()


@pytest.fixture(scope="module")
def copy_task() -> LMEvalTask:
    return load_lm_eval_task("copy", yaml=COPY_YAML)


@pytest.fixture(scope="module")
def choice_task() -> LMEvalTask:
    return load_lm_eval_task("add", yaml=CHOICE_YAML, seed=3)


def test_validation_and_test_files_become_dev_and_test(copy_task: LMEvalTask) -> None:
    assert [e.id for e in copy_task.dev] == list(range(12)) and [e.id for e in copy_task.test] == list(
        range(12)
    )
    dev_docs = [d["prompt"] for d in copy_task.harness["dev"].eval_docs]
    test_docs = [d["prompt"] for d in copy_task.harness["test"].eval_docs]
    assert dev_docs == [r["prompt"] for r in rows("copy_dev.jsonl")]
    assert test_docs == [r["prompt"] for r in rows("copy_test.jsonl")]
    assert (copy_task.metric, copy_task.filter) == ("exact_match", "none")


def test_a_single_split_is_divided_into_disjoint_seeded_halves(choice_task: LMEvalTask) -> None:
    dev, test = {e.id for e in choice_task.dev}, {e.id for e in choice_task.test}
    assert len(dev) == len(test) == 8 and dev | test == set(range(16)) and not dev & test
    again = load_lm_eval_task("add", yaml=CHOICE_YAML, seed=3)
    other = load_lm_eval_task("add", yaml=CHOICE_YAML, seed=4)
    assert [e.id for e in again.dev] == [e.id for e in choice_task.dev]
    assert [e.id for e in other.dev] != [e.id for e in choice_task.dev]


def test_limit_keeps_a_seeded_sample_per_split() -> None:
    first = load_lm_eval_task("copy", yaml=COPY_YAML, limit=5, seed=1)
    assert len(first.dev) == len(first.test) == 5
    assert [e.id for e in load_lm_eval_task("copy", yaml=COPY_YAML, limit=5, seed=1).dev] == [
        e.id for e in first.dev
    ]
    assert [e.id for e in load_lm_eval_task("copy", yaml=COPY_YAML, limit=5, seed=2).dev] != [
        e.id for e in first.dev
    ]


def test_generation_scores_match_the_hf_backend_doc_by_doc(
    copy_task: LMEvalTask, base: torch.nn.Module, tokenizer: PreTrainedTokenizerFast
) -> None:
    examples = [
        Example(id=i, prompt=r["prompt"], target=r["target"]) for i, r in enumerate(rows("copy_test.jsonl"))
    ]
    reference = Task("copy", "generate", examples, [], max_new_tokens=12, stop=("=",))
    expected = HFBackend(tokenizer, batch_size=8).evaluate(base, reference, examples)
    picked = copy_task.test[::2] + copy_task.test[1::2]  # out of doc order, to check the order of the scores
    got = LMEvalScorer(tokenizer, batch_size=8).evaluate(base, copy_task, "test", picked)
    assert got == [expected[e.id] for e in picked]
    assert 0 < sum(expected) < len(expected)  # the base copies some strings, not all: the comparison bites


def test_choice_accuracy_matches_the_hf_backend_doc_by_doc(
    choice_task: LMEvalTask, zoo_dir: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "base").eval()
    data = rows("add_choice.jsonl")
    examples = [
        Example(
            id=e.id,
            prompt=data[e.id]["prompt"],
            choices=tuple(data[e.id]["choices"]),
            label=data[e.id]["label"],
        )
        for e in choice_task.dev
    ]
    expected = HFBackend(tokenizer).evaluate(
        model, Task("add", "choice", examples, [], metric="choice_accuracy"), examples
    )
    assert LMEvalScorer(tokenizer).evaluate(model, choice_task, "dev", choice_task.dev) == expected
    assert 0 < sum(expected) < len(expected)


def test_the_worker_scores_lm_eval_tasks_on_each_materialized_candidate(zoo_dir: Path) -> None:
    """HFLM wraps the resident model itself: scores follow each in-place merge, no reload from disk."""
    setup = WorkerSetup(
        base=str(zoo_dir / "base"),
        experts={n: str(zoo_dir / "experts" / n) for n in ("copy", "reverse")},
        tasks=[TaskSetup(name="copy", lm_eval_yaml=str(COPY_YAML))],
        dev_subset=4,
    )
    worker = ModelWorker(setup)
    recipes = reference_recipes(["copy", "reverse"], num_layers=worker.sources.num_layers)
    copy_expert = worker.evaluate(recipes["expert:copy"], subset=1, splits=("dev", "test"))
    reverse_expert = worker.evaluate(recipes["expert:reverse"], subset=1, splits=("dev",))
    assert copy_expert["ok"] and reverse_expert["ok"], (copy_expert, reverse_expert)
    assert copy_expert["dev"]["copy"] == 1.0 and copy_expert["test"]["copy"] == 1.0
    assert reverse_expert["dev"]["copy"] == 0.0 and "test" not in reverse_expert
    assert len(copy_expert["per_example"]["copy"]) == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"dataset_path": "Rowan/hellaswag", "dataset_kwargs": None},
            "its data 'Rowan/hellaswag' would be downloaded from the Hugging Face hub",
        ),
        (
            {"dataset_kwargs": {"data_files": {"validation": "nowhere.jsonl", "test": "copy_test.jsonl"}}},
            "data file not found: .*nowhere.jsonl",
        ),
        (
            {"metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": False}]},
            "no metric .* is a higher-is-better per-example mean",
        ),
    ],
)
def test_bad_task_files_are_refused_in_one_line_naming_task_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict, message: str
) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for name in ("copy_dev.jsonl", "copy_test.jsonl"):
        shutil.copy(DATA / name, tmp_path / name)
    config = {**yaml.safe_load(COPY_YAML.read_text()), **change}
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(LMEvalError, match=f"^task 'mine': {path}: {message}") as err:
        load_lm_eval_task("mine", yaml=path)
    assert "\n" not in str(err.value)


def test_an_unknown_metric_is_refused_with_the_known_ones() -> None:
    with pytest.raises(LMEvalError, match=r"metric 'f1' is not one of the task's metrics \(acc, acc_norm\)"):
        load_lm_eval_task("add", yaml=CHOICE_YAML, metric="f1")
    assert load_lm_eval_task("add", yaml=CHOICE_YAML, metric="acc_norm,none").metric == "acc_norm"


def write_job(folder: Path, zoo: Path, task: dict) -> Path:
    job = {
        "models": {"base": str(zoo / "base"), "experts": {"copy": str(zoo / "experts" / "copy")}},
        "tasks": [{"name": "t", **task}],
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    return folder / "job.yaml"


def test_a_job_resolves_task_files_against_its_folder(tmp_path: Path, zoo_dir: Path) -> None:
    shutil.copytree(DATA, tmp_path / "tasks")
    spec = load_job(write_job(tmp_path, zoo_dir, {"lm_eval_yaml": "tasks/zoo_copy.yaml", "limit": 3}))
    assert spec.tasks[0].lm_eval_yaml == tmp_path / "tasks" / "zoo_copy.yaml"


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (
            {"path": "tasks", "lm_eval": "hellaswag"},
            "field 'tasks.0': give exactly one of path, lm_eval, lm_eval_yaml",
        ),
        ({}, "field 'tasks.0': give exactly one of path, lm_eval, lm_eval_yaml \\(got none\\)"),
        ({"lm_eval_yaml": "t.yaml", "stop": ["x"]}, "max_new_tokens and stop come from an lm-eval task"),
        ({"path": "tasks", "limit": 3}, "limit applies to lm-eval tasks"),
        (
            {"lm_eval_yaml": "missing.yaml"},
            "field 'tasks.0.lm_eval_yaml': task 't': .*missing.yaml: task file not found",
        ),
    ],
)
def test_bad_task_entries_are_refused_with_one_line(
    tmp_path: Path, zoo_dir: Path, task: dict, message: str
) -> None:
    with pytest.raises(JobError, match=message) as err:
        load_job(write_job(tmp_path, zoo_dir, task))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_registered_hub_task_is_refused_before_any_download(
    tmp_path: Path, zoo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Needs lm-eval's index of its ~15k built-in task files (tens of seconds), hence slow."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(JobError, match="'Rowan/hellaswag' would be downloaded from the Hugging Face hub"):
        load_job(write_job(tmp_path, zoo_dir, {"lm_eval": "hellaswag"}))
    with pytest.raises(JobError, match="not a registered lm-eval task"):
        load_job(write_job(tmp_path, zoo_dir, {"lm_eval": "no_such_task_anywhere"}))


def test_a_server_confines_task_files_to_its_data_roots(tmp_path: Path, zoo_dir: Path) -> None:
    """A task file can import Python from its folder (`!function`), so a job sent to a server may not name one
    outside the server's data roots."""
    from orchestrator.service.confine import confine_job

    job = yaml.safe_load(write_job(tmp_path, zoo_dir, {"lm_eval_yaml": str(COPY_YAML)}).read_text())
    with pytest.raises(
        JobError, match=r"field 'tasks\.0\.lm_eval_yaml': .* is outside the server's data roots"
    ):
        confine_job(job, roots=[zoo_dir])
