"""Tasks for instruct models on the zoo: `chat_template: true` and `num_fewshot`, for JSONL and lm-eval tasks.

The zoo's tokenizer gets a chat template written in the zoo's own alphabet (a user turn is its text, an
assistant turn its text and a '+'), so formatted prompts stay readable by the tiny model and checkable here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from orchestrator.driver import reference_recipes
from workers.worker import ModelWorker, TaskSetup, WorkerSetup

TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}+{% endif %}{% endfor %}"
)
LM_EVAL_COPY = Path(__file__).parent / "data" / "lm_eval" / "zoo_copy.yaml"


@pytest.fixture(scope="module")
def chat_base(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo's base with a chat template in its tokenizer."""
    base = tmp_path_factory.mktemp("chat") / "base"
    shutil.copytree(zoo_dir / "base", base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    return base


def worker_with(chat_base: Path, zoo_dir: Path, task: TaskSetup) -> ModelWorker:
    return ModelWorker(
        WorkerSetup(
            base=str(chat_base),
            experts={n: str(zoo_dir / "experts" / n) for n in ("copy", "reverse")},
            tasks=[task],
            dev_subset=4,
        )
    )


def test_jsonl_task_with_chat_template_and_one_shot(chat_base: Path, zoo_dir: Path) -> None:
    task = TaskSetup(
        name="copy",
        path=str(zoo_dir / "tasks" / "copy"),
        max_new_tokens=12,
        chat_template=True,
        num_fewshot=1,
    )
    worker = worker_with(chat_base, zoo_dir, task)
    plain = worker_with(chat_base, zoo_dir, TaskSetup(name="copy", path=task.path, max_new_tokens=12))
    for formatted, raw in zip(worker.tasks[0].dev, plain.tasks[0].dev, strict=True):
        shot, question = formatted.prompt.split("+")
        assert question == raw.prompt and formatted.id == raw.id
        solved = [f"{e.prompt}{e.target}" for e in plain.tasks[0].dev if e.id != raw.id]
        assert shot in solved
    result = worker.evaluate(
        reference_recipes(["copy", "reverse"], num_layers=worker.sources.num_layers)["expert:copy"], subset=0
    )
    assert result["ok"], result
    assert len(result["per_example"]["copy"]) == 4 and 0.0 <= result["dev"]["copy"] <= 1.0


def test_lm_eval_task_gets_shots_and_the_chat_template(chat_base: Path, zoo_dir: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra 'lmeval'")
    task = TaskSetup(name="copy", lm_eval_yaml=str(LM_EVAL_COPY), num_fewshot=2, chat_template=True)
    worker = worker_with(chat_base, zoo_dir, task)
    result = worker.evaluate(
        reference_recipes(["copy", "reverse"], num_layers=worker.sources.num_layers)["expert:copy"], subset=0
    )
    assert result["ok"], result
    harness = worker.tasks[0].harness["dev"]
    assert harness.config.num_fewshot == 2
    context = harness.instances[0].args[0]
    # Two solved shots as user/assistant turns (each closed by the template's '+'), then the question.
    assert context.count("+") == 2 and context.endswith("=") and context.count("copy:") == 3
