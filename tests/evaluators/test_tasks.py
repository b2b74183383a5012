"""Task loading (and each way bad data is refused with FILE:LINE), and seeded chunking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from evaluators.tasks import Example, TaskDataError, chunk, load_task, num_chunks
from workers.zoo.tokenizer import char_tokenizer


def write_task(folder: Path, dev: list | str, test: list | str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("dev", dev), ("test", dev if test is None else test)):
        text = rows if isinstance(rows, str) else "\n".join(json.dumps(r) for r in rows) + "\n"
        (folder / f"{split}.jsonl").write_text(text)
    return folder


GEN = [{"prompt": "1+1=", "target": "2"}, {"prompt": "2+2=", "target": "4"}]
CHOICE = [{"prompt": "sky is", "choices": [" blue", " green"], "label": 0}]


def test_generation_task_loads_with_ids_and_defaults(tmp_path: Path) -> None:
    task = load_task("add", write_task(tmp_path, GEN, GEN[:1]), max_new_tokens=4)
    assert task.kind == "generate" and task.metric == "exact_match"
    assert [e.id for e in task.dev] == [0, 1] and len(task.test) == 1
    assert task.dev[1] == Example(id=1, prompt="2+2=", target="4")
    assert task.max_new_tokens == 4 and task.stop == ("\n",)


def test_choice_task_defaults_to_choice_accuracy(tmp_path: Path) -> None:
    task = load_task("sky", write_task(tmp_path, CHOICE), stop=("#",))
    assert task.kind == "choice" and task.metric == "choice_accuracy" and task.stop == ("#",)
    assert task.dev[0].choices == (" blue", " green") and task.dev[0].label == 0


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    text = "\n" + json.dumps(GEN[0]) + "\n\n" + json.dumps(GEN[1]) + "\n\n"
    task = load_task("t", write_task(tmp_path, text))
    assert [e.prompt for e in task.dev] == ["1+1=", "2+2="]


@pytest.mark.parametrize(
    ("dev_text", "line", "message"),
    [
        ('{"prompt": "a", "target": "b"}\n{not json\n', 2, "not JSON"),
        ('{"prompt": "a"}\n', 1, "missing field 'target'"),
        ('{"target": "a"}\n', 1, "missing field 'prompt'"),
        ('{"prompt": "a", "choices": ["x"]}\n', 1, "missing field 'label'"),
        ('{"prompt": "a", "choices": ["x", "y"], "label": 2}\n', 1, "label"),
        ('{"prompt": "a", "choices": ["x", "y"], "label": -1}\n', 1, "label"),
        ('{"prompt": "a", "label": 0}\n', 1, "missing field 'choices'"),
        ('{"prompt": "a", "choices": [], "label": 0}\n', 1, "non-empty list of strings"),
        ('{"prompt": "a", "choices": ["x", "y"], "label": true}\n', 1, "field 'label' must be int"),
        ('{"prompt": "a", "target": 3}\n', 1, "field 'target' must be str"),
        ('[1, 2]\n', 1, "expected a JSON object"),
        ('{"prompt": "a", "target": "b"}\n{"prompt": "a", "choices": ["x"], "label": 0}\n', 2, "line 1"),
    ],
)
def test_bad_line_is_refused_with_file_and_line(tmp_path: Path, dev_text: str, line: int, message: str) -> None:
    folder = write_task(tmp_path, dev_text, GEN)
    with pytest.raises(TaskDataError) as err:
        load_task("t", folder)
    text = str(err.value)
    assert text.startswith(f"{folder / 'dev.jsonl'}:{line}: ") and message in text
    assert "\n" not in text


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    folder = write_task(tmp_path, GEN, text)
    with pytest.raises(TaskDataError, match=r"test\.jsonl: no examples"):
        load_task("t", folder)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    folder = write_task(tmp_path, GEN)
    (folder / "test.jsonl").unlink()
    with pytest.raises(TaskDataError, match=r"test\.jsonl: file not found"):
        load_task("t", folder)


def test_dev_and_test_of_different_kinds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"test\.jsonl:1: choice examples"):
        load_task("t", write_task(tmp_path, GEN, CHOICE))


@pytest.mark.parametrize(("rows", "metric"), [(GEN, "choice_accuracy"), (CHOICE, "exact_match"), (GEN, "bleu")])
def test_metric_must_exist_and_fit_the_kind(tmp_path: Path, rows: list, metric: str) -> None:
    with pytest.raises(TaskDataError, match=f"task 't': metric '{metric}'"):
        load_task("t", write_task(tmp_path, rows), metric=metric)


def test_regex_metric_is_accepted_for_generation(tmp_path: Path) -> None:
    assert load_task("t", write_task(tmp_path, GEN), metric=r"regex:= (\d+)").metric == r"regex:= (\d+)"


def examples(n: int) -> list[Example]:
    return [Example(id=i, prompt=str(i), target=str(i)) for i in range(n)]


def test_chunk_minus_one_is_everything_in_order() -> None:
    assert chunk(examples(10), 3, -1, seed=5) == examples(10)


def test_chunks_partition_the_split_when_size_divides_it() -> None:
    parts = [chunk(examples(12), 4, i, seed=1) for i in range(num_chunks(12, 4))]
    assert sorted(e.id for part in parts for e in part) == list(range(12))
    assert chunk(examples(12), 4, 3, seed=1) == parts[0]


def test_chunks_are_seeded() -> None:
    assert chunk(examples(50), 10, 2, seed=7) == chunk(examples(50), 10, 2, seed=7)
    assert chunk(examples(50), 10, 2, seed=7) != chunk(examples(50), 10, 2, seed=8)
    assert [e.id for e in chunk(examples(50), 10, 0, seed=7)] != list(range(10))


@given(n=st.integers(1, 60), size=st.integers(1, 70), index=st.integers(0, 20), seed=st.integers(0, 2**32))
def test_every_chunk_is_full_and_distinct_and_one_cycle_covers_all(n: int, size: int, index: int, seed: int) -> None:
    data = examples(n)
    part = chunk(data, size, index, seed)
    assert len(part) == min(size, n) and len({e.id for e in part}) == len(part)
    covered = {e.id for i in range(num_chunks(n, size)) for e in chunk(data, size, i, seed)}
    assert covered == set(range(n))


def test_bad_chunk_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="chunk index"):
        chunk(examples(5), 2, -2, seed=0)
    with pytest.raises(ValueError, match="chunk size"):
        chunk(examples(5), 0, 0, seed=0)
    with pytest.raises(ValueError, match="chunk size"):
        num_chunks(5, 0)


def test_num_chunks_rounds_up() -> None:
    assert (num_chunks(256, 64), num_chunks(250, 64), num_chunks(3, 64), num_chunks(0, 4)) == (4, 4, 1, 1)


SUMS = [{"prompt": f"{a}+{a}=", "target": str(2 * a)} for a in range(10)]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def chat_tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    tokenizer = char_tokenizer("0123456789+=[]abcdefghijklmnopqrstuvwxyz")
    tokenizer.chat_template = template
    return tokenizer


def test_few_shot_prompts_are_seeded_dev_examples_other_than_the_scored_one(tmp_path: Path) -> None:
    task = load_task("sum", write_task(tmp_path, SUMS, SUMS[:3]), num_fewshot=3, seed=7)
    solved = {f"{r['prompt']}{r['target']}" for r in SUMS}
    for split, raw in ((task.dev, SUMS), (task.test, SUMS[:3])):
        for example in split:
            *shots, own = example.prompt.split("\n\n")
            assert own == raw[example.id]["prompt"] and len(shots) == 3 and len(set(shots)) == 3
            assert set(shots) <= solved
    assert all(f"{e.id}+{e.id}={2 * e.id}" not in e.prompt for e in task.dev)
    again = load_task("sum", tmp_path, num_fewshot=3, seed=7)
    other = load_task("sum", tmp_path, num_fewshot=3, seed=8)
    assert again.dev == task.dev and other.dev != task.dev
    assert [e.id for e in task.dev] == list(range(10)) and task.dev[4].target == "8"


def test_chat_template_wraps_shots_as_turns_without_a_second_bos(tmp_path: Path) -> None:
    tokenizer = chat_tokenizer(CHAT_TEMPLATE)
    task = load_task("sum", write_task(tmp_path, SUMS), num_fewshot=1, chat_tokenizer=tokenizer)
    prompt = task.dev[0].prompt
    shot = next(r for r in SUMS if f"[user]{r['prompt']}[assistant]{r['target']}" in prompt)
    assert prompt == f"[user]{shot['prompt']}[assistant]{shot['target']}[user]0+0=[assistant]"
    ids = tokenizer(prompt)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_fewshot": 10}, "num_fewshot 10 needs more than 10 dev examples, got 10"),
        (
            {"chat_tokenizer": chat_tokenizer(None)},
            "chat_template is set, but the base model's tokenizer has no",
        ),
    ],
)
def test_prompt_formats_that_cannot_work_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(TaskDataError, match=f"task 'sum': {message}"):
        load_task("sum", write_task(tmp_path, SUMS), **kwargs)
