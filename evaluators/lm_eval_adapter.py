"""lm-eval tasks as mergesearch tasks, scored on the model a worker already holds (optional extra `lmeval`).

A job names an lm-eval task by its registered name (`lm_eval: hellaswag`) or by a local task YAML with its own
data files (`lm_eval_yaml: tasks/mine.yaml`). The task is built once per worker; each candidate is scored by
lm-eval's own `evaluate` on an `HFLM` that wraps the resident model object, so a candidate is never reloaded
from disk, on the doc ids of its subset (`samples=`). Each doc's value of the task's primary metric becomes
its per-example score, so lm-eval tasks feed the archive, fitness and DAR exactly as JSONL tasks do.

Splits: the search must never see what is reported. A task with both a validation and a test split uses them
as dev and test; a task with one evaluation split (most hub tasks hide their test labels) is divided by a
seeded shuffle, first half dev, second half test. `limit` keeps a seeded sample of that many docs per split.

No downloads: workers run without the network, so a task whose data is not local (a packaged loader such as
`json` with local `data_files`, or a local folder) is refused when the job is loaded, naming the dataset;
`HF_HUB_OFFLINE=1` (or `HF_DATASETS_OFFLINE=1`) lifts the refusal for a dataset already in the local cache.
Relative data files and folders are resolved against the YAML's own folder, so a job folder can be moved.

A server that takes task files from the network checks them first with `task_file_reads`, which lists what
building the task would read (the YAML, its `include`s, its data files and folders) and the Python it would
import (`!function`), without importing or running anything.

This uses lm-eval 0.4.13's task API (`TaskManager.load`, the task YAML loader); lm-eval is imported lazily.
"""

from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from yaml import Node, SafeLoader, YAMLError

from evaluators.tasks import Example

if TYPE_CHECKING:
    from lm_eval.api.task import Task as HarnessTask
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

Split = Literal["dev", "test"]
LOCAL_LOADERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
"""`datasets` loaders that read files; with local data files they never touch the network."""
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class LMEvalError(ValueError):
    """An lm-eval task that cannot be used; the message is one line naming the task (and file)."""


@dataclass
class TaskFileReads:
    """What building the task of one task file reads and runs."""

    files: list[Path]
    """The task file and every file it includes, resolved."""
    data: list[Path]
    """Local data files and folders its dataset reads (globs expanded), resolved."""
    functions: list[str]
    """`!function` references: Python that building the task imports and runs."""


class _RecordingLoader(SafeLoader):
    """A safe loader that records `!function` tags instead of importing them."""

    functions: list[str]


def _record_function(loader: _RecordingLoader, node: Node) -> str:
    value = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    loader.functions.append(value)
    return value


_RecordingLoader.add_constructor("!function", _record_function)


def task_file_reads(path: Path) -> TaskFileReads:
    """The files, data and code the task in `path` would use, found as lm-eval's loader walks it (includes
    first, the including file's keys winning; data paths relative to the top file's folder) but without
    importing anything."""
    reads = TaskFileReads([], [], [])
    config = _read_config(Path(path).expanduser().resolve(), reads)
    folder = Path(path).expanduser().resolve().parent
    dataset = config.get("dataset_path")
    kwargs = config.get("dataset_kwargs") if isinstance(config.get("dataset_kwargs"), dict) else {}
    paths = [*_flat(kwargs.get("data_files")), *_flat(kwargs.get("data_dir"))]
    if isinstance(dataset, str) and dataset not in LOCAL_LOADERS and (folder / dataset).expanduser().exists():
        paths.append(dataset)
    for raw in paths:
        pattern = (folder / str(raw)).expanduser()
        found = glob.glob(str(pattern))
        reads.data += [Path(f).resolve() for f in found] or [pattern.resolve()]
    return reads


def _read_config(path: Path, reads: TaskFileReads) -> dict[str, Any]:
    if path in reads.files:
        raise LMEvalError(f"include cycle at {path}")
    reads.files.append(path)
    if not path.is_file():
        return {}
    loader = _RecordingLoader(path.read_text())
    loader.functions = reads.functions
    try:
        config = loader.get_single_data()
    except YAMLError as exc:
        raise LMEvalError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    finally:
        loader.dispose()
    if not isinstance(config, dict):
        return {}
    merged: dict[str, Any] = {}
    includes = config.pop("include", [])
    for include in includes if isinstance(includes, list) else [includes]:
        merged.update(_read_config((path.parent / str(include)).expanduser().resolve(), reads))
    return {**merged, **config}


def _flat(value: Any) -> list[Any]:
    """The leaves of a path, a list of paths, or a split -> path(s) mapping."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _flat(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _flat(v)]
    return [] if value is None else [value]


@dataclass
class LMEvalTask:
    """An lm-eval task as a search sees it: each split's example ids are doc ids of `harness[split]`."""

    name: str
    source: str
    """What the job named, for messages: `lm_eval:hellaswag` or the YAML's path."""
    metric: str
    filter: str
    dev: list[Example]
    test: list[Example]
    harness: dict[Split, HarnessTask]
    chat_template: bool = False
    """Prompts go through the tokenizer's chat template (lm-eval's `apply_chat_template`, shots as turns)."""


def load_lm_eval_task(
    name: str,
    task: str | None = None,
    yaml: Path | None = None,
    metric: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    num_fewshot: int | None = None,
    chat_template: bool = False,
) -> LMEvalTask:
    """Build the lm-eval task named `task` (registered) or defined in `yaml`, checked and split into dev/test.

    `metric` is an lm-eval result key, `METRIC` or `METRIC,FILTER` (`acc_norm`, `exact_match,strict-match`);
    by default the task's first per-example-mean, higher-is-better metric under its first filter.
    `num_fewshot` overrides the task's own; lm-eval draws the shots (from the task's few-shot split).
    """
    if (task is None) == (yaml is None):
        raise ValueError("give exactly one of task (a registered lm-eval name) or yaml (a task file)")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError("lm-eval tasks need lm-eval: pip install 'mergesearch[lmeval]'") from None
    source = f"lm_eval:{task}" if task is not None else str(yaml)
    where = f"task '{name}': {source}"
    try:
        config, folder = _config_from_yaml(Path(yaml)) if yaml is not None else _registered_config(str(task))
    except LMEvalError as exc:
        raise LMEvalError(f"{where}: {exc}") from None
    config = _with_local_data(config, folder, where)
    if num_fewshot is not None:
        config = {**config, "num_fewshot": num_fewshot}
    harness = _build(config, where)
    if config.get("validation_split") and config.get("test_split"):
        harness_dev = _build({**config, "test_split": config["validation_split"]}, where)
        dev_ids, test_ids = list(range(len(harness_dev.eval_docs))), list(range(len(harness.eval_docs)))
        splits: dict[Split, HarnessTask] = {"dev": harness_dev, "test": harness}
    else:
        docs = list(range(len(harness.eval_docs)))
        random.Random(seed).shuffle(docs)
        half = (len(docs) + 1) // 2
        dev_ids, test_ids = docs[:half], docs[half:]
        splits = {"dev": harness, "test": harness}
    if not dev_ids or not test_ids:
        raise LMEvalError(f"{where}: needs docs for dev and test, got {len(dev_ids)} and {len(test_ids)}")
    metric_name, filter_name = _primary_metric(harness, metric, where)
    return LMEvalTask(
        name=name,
        source=source,
        metric=metric_name,
        filter=filter_name,
        dev=_examples(dev_ids, limit, seed),
        test=_examples(test_ids, limit, seed),
        harness=splits,
        chat_template=chat_template,
    )


class LMEvalScorer:
    """Scores `LMEvalTask`s with lm-eval on a resident Hugging Face model, wrapped once in `HFLM`."""

    def __init__(self, tokenizer: Any, batch_size: int = 32) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._lm: HFLM | None = None

    def evaluate(self, model: Any, task: LMEvalTask, split: Split, examples: list[Example]) -> list[float]:
        """Per-example values of the task's metric, in [0, 1] and in the order of `examples`."""
        if not examples:
            return []
        from lm_eval.evaluator import evaluate

        harness = task.harness[split]
        # lm-eval maps the k-th selected doc back to samples[k], which is only right for sorted ids.
        doc_ids = sorted({ex.id for ex in examples})
        results = evaluate(
            lm=self._wrap(model),
            task_dict={"tasks": {harness.task_name: harness}},
            samples={harness.task_name: doc_ids},
            bootstrap_iters=0,
            log_samples=True,
            apply_chat_template=task.chat_template,
            fewshot_as_multiturn=task.chat_template,
        )
        by_doc = {
            row["doc_id"]: float(row[task.metric])
            for row in results["samples"][harness.task_name]
            if row["filter"] == task.filter
        }
        values = [by_doc[ex.id] for ex in examples]
        outside = next((v for v in values if not 0.0 <= v <= 1.0), None)
        if outside is not None:
            raise LMEvalError(
                f"task '{task.name}': {task.source}: metric '{task.metric}' gave {outside}, outside [0, 1]"
            )
        return values

    def _wrap(self, model: Any) -> HFLM:
        """HFLM around the model object itself; rebuilt only if the worker ever swaps the object."""
        if self._lm is None or self._lm.model is not model:
            from lm_eval.models.huggingface import HFLM

            # add_bos_token: encode prompts as the HF backend does (with the tokenizer's special tokens).
            self._lm = HFLM(
                pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size, add_bos_token=True
            )
        return self._lm


@cache
def _registered_tasks() -> TaskManager:
    """lm-eval's index of its built-in tasks; scanning its YAMLs takes seconds, so it is built once."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _registered_config(task: str) -> tuple[dict[str, Any], Path]:
    """A built-in task's full config (includes merged, functions imported) and the folder of its YAML."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = _registered_tasks().task_index.get(task)
    if entry is None:
        raise LMEvalError("not a registered lm-eval task")
    if entry.kind not in (Kind.TASK, Kind.PY_TASK) or entry.yaml_path is None:
        raise LMEvalError(f"an lm-eval {entry.kind.name.lower()}, not one task: name one of its tasks")
    return load_yaml(entry.yaml_path, resolve_func=True), entry.yaml_path.parent


def _config_from_yaml(path: Path) -> tuple[dict[str, Any], Path]:
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise LMEvalError("task file not found")
    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as exc:  # noqa: BLE001 — YAML, include and !function errors all mean a bad task file
        raise LMEvalError(f"not a usable lm-eval task file ({_one_line(exc)})") from None
    if "task" not in config or "group" in config:
        raise LMEvalError("an lm-eval task file must define one task (a 'task' key, no 'group')")
    return config, path.resolve().parent


def _with_local_data(config: dict[str, Any], folder: Path, where: str) -> dict[str, Any]:
    """The config with its local data paths made absolute; refused if its data would come from the hub."""
    if config.get("custom_dataset") is not None:
        return config
    dataset = config.get("dataset_path") or getattr(config.get("class"), "DATASET_PATH", None)
    kwargs = dict(config.get("dataset_kwargs") or {})
    if dataset in LOCAL_LOADERS:
        if "data_files" not in kwargs and "data_dir" not in kwargs:
            raise LMEvalError(f"{where}: dataset_path '{dataset}' needs local dataset_kwargs.data_files")
        if "data_files" in kwargs:
            kwargs["data_files"] = _local_files(kwargs["data_files"], folder, where)
        if "data_dir" in kwargs:
            kwargs["data_dir"] = str(_local_dir(kwargs["data_dir"], folder, where))
        return {**config, "dataset_kwargs": kwargs}
    if isinstance(dataset, str) and (folder / dataset).expanduser().is_dir():
        return {**config, "dataset_path": str((folder / dataset).expanduser().resolve())}
    if not any(os.environ.get(var, "").lower() in ("1", "true", "yes") for var in OFFLINE_ENV):
        raise LMEvalError(
            f"{where}: its data '{dataset}' would be downloaded from the Hugging Face hub, and workers do "
            "not download: use lm_eval_yaml with local data files, or fill the datasets cache and set "
            "HF_HUB_OFFLINE=1"
        )
    return config


def _local_files(files: Any, folder: Path, where: str) -> Any:
    """`data_files` (a path, a list, or a split -> path(s) mapping) with each path absolute and present."""
    if isinstance(files, dict):
        return {split: _local_files(paths, folder, where) for split, paths in files.items()}
    if isinstance(files, list):
        return [_local_files(path, folder, where) for path in files]
    path = (folder / str(files)).expanduser()
    if not glob.glob(str(path)):
        raise LMEvalError(f"{where}: data file not found: {path}")
    return str(path.resolve())


def _local_dir(data_dir: str, folder: Path, where: str) -> Path:
    path = (folder / data_dir).expanduser()
    if not path.is_dir():
        raise LMEvalError(f"{where}: data folder not found: {path}")
    return path.resolve()


def _build(config: dict[str, Any], where: str) -> HarnessTask:
    from lm_eval.tasks import TaskManager

    try:
        return next(iter(TaskManager(include_defaults=False).load([config])["tasks"].values()))
    except Exception as exc:  # noqa: BLE001 — data and template errors surface here, as one line
        raise LMEvalError(f"{where}: cannot build the task ({_one_line(exc)})") from None


def _primary_metric(harness: HarnessTask, metric: str | None, where: str) -> tuple[str, str]:
    """The (metric, filter) whose per-doc values are the scores; refused unless a higher-is-better mean."""
    filters = [f["name"] for f in harness.config.filter_list or []] or ["none"]
    aggregations = harness.aggregation()
    higher = harness.higher_is_better()
    usable = [m for m in aggregations if higher.get(m) and aggregations[m].__name__ == "mean"]
    known = ", ".join(aggregations)
    if metric is None:
        if not usable:
            raise LMEvalError(f"{where}: no metric ({known}) is a higher-is-better per-example mean")
        return usable[0], filters[0]
    name, _, filter_name = metric.partition(",")
    if name not in aggregations:
        raise LMEvalError(f"{where}: metric '{name}' is not one of the task's metrics ({known})")
    if name not in usable:
        raise LMEvalError(f"{where}: metric '{name}' is not a higher-is-better per-example mean")
    if filter_name and filter_name not in filters:
        raise LMEvalError(f"{where}: filter '{filter_name}' is not one of the task's ({', '.join(filters)})")
    return name, filter_name or filters[0]


def _examples(doc_ids: list[int], limit: int | None, seed: int) -> list[Example]:
    """Examples for `doc_ids` (a seeded sample of `limit` of them), in doc order; prompts stay in lm-eval."""
    if limit is not None and limit < len(doc_ids):
        doc_ids = random.Random(seed).sample(doc_ids, limit)
    return [Example(id=doc, prompt="") for doc in sorted(doc_ids)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
