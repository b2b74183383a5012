"""The job file: YAML validated with pydantic, paths resolved against the file's folder.

A bad job is refused before any work starts, with one line naming the field or file (`JobError`). Checks
that need the models themselves (architecture, tensor shapes) are done by `workers.sources.Sources`, which the
driver opens before the first candidate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from search.space import SpaceSpec


class JobError(ValueError):
    """A job file that cannot run; the message is one line naming the field or file."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelsSpec(Strict):
    base: Path
    experts: dict[str, Path] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self) -> ModelsSpec:
        if "base" in self.experts:
            raise ValueError("an expert may not be named 'base'")
        return self


class TaskSpec(Strict):
    """A JSONL task folder (`path`), or an lm-eval task by its name (`lm_eval`) or file (`lm_eval_yaml`).

    For lm-eval tasks `metric` is an lm-eval metric (`acc_norm`, `exact_match,strict-match`), generation
    settings come from the task's own config, and `limit` keeps a seeded sample of that many docs per split.
    For instruct models, `num_fewshot` puts that many solved dev examples before each prompt (lm-eval's own
    shots for lm-eval tasks) and `chat_template: true` wraps prompts in the base tokenizer's chat template.
    """

    name: str
    path: Path | None = None
    lm_eval: str | None = None
    lm_eval_yaml: Path | None = None
    metric: str | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = None
    limit: int | None = Field(None, ge=1)
    num_fewshot: int | None = Field(None, ge=0)
    chat_template: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        given = [key for key in ("path", "lm_eval", "lm_eval_yaml") if getattr(self, key) is not None]
        if len(given) != 1:
            got = ", ".join(given) or "none"
            raise ValueError(f"give exactly one of path, lm_eval, lm_eval_yaml (got {got})")
        if self.path is not None and self.limit is not None:
            raise ValueError("limit applies to lm-eval tasks; a JSONL task is sized by its files")
        if self.path is None and (self.max_new_tokens is not None or self.stop is not None):
            raise ValueError("max_new_tokens and stop come from an lm-eval task's generation_kwargs")
        return self


class EvaluationSpec(Strict):
    backend: Literal["hf", "vllm"] = "hf"
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """vLLM engine arguments (e.g. gpu_memory_utilization, dtype, max_model_len); only with backend 'vllm'."""
    device: str = "cpu"
    dev_subset: int = Field(64, ge=1)
    """Examples per task per candidate: the chunk size of the seeded dev shuffle."""
    batch_size: int = Field(32, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _engine_args_need_vllm(self) -> EvaluationSpec:
        if self.engine_args and self.backend != "vllm":
            raise ValueError("engine_args configure the vLLM engine: set backend 'vllm' or drop them")
        return self


class SearchSpec(Strict):
    strategy: str = "random"
    budget: int = Field(16, ge=1)
    seed: int = 0
    params: dict[str, Any] = Field(default_factory=dict)


class WorkersSpec(Strict):
    count: int = Field(2, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_attempts: int = Field(3, ge=1)
    """A candidate whose worker dies is retried on another worker at most this many times in all."""
    cache_gb: float = Field(1.0, ge=0)
    """Per worker, on its device: this much of float32 source tensors, and as much again of tensors derived
    from them (task vectors, magnitude ranks, DARE masks), are kept across candidates; 0 keeps none."""


class JobSpec(Strict):
    name: str = "job"
    models: ModelsSpec
    tasks: list[TaskSpec] = Field(min_length=1)
    evaluation: EvaluationSpec = EvaluationSpec()
    search: SearchSpec = SearchSpec()
    space: SpaceSpec = SpaceSpec()
    workers: WorkersSpec = WorkersSpec()
    references: bool = True
    trust_remote_code: bool = False

    def expert_names(self) -> list[str]:
        return list(self.models.experts)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _first_error(exc: ValidationError, source: str) -> JobError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "job"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return JobError(f"{source}: field '{where}': {msg}")


def parse_job(data: dict[str, Any], root: Path, source: str = "job") -> JobSpec:
    """Validate a job dict; relative paths are resolved against `root`. Checks folders and task files."""
    if not isinstance(data, dict):
        raise JobError(f"{source}: a job file must be a YAML mapping")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, source) from None
    models = ModelsSpec(
        base=_model_folder("models.base", spec.models.base, root, source),
        experts={
            n: _model_folder(f"models.experts.{n}", p, root, source) for n, p in spec.models.experts.items()
        },
    )
    local = ("path", "lm_eval_yaml")
    tasks = [
        t.model_copy(update={k: (root / getattr(t, k)).resolve() for k in local if getattr(t, k)})
        for t in spec.tasks
    ]
    spec = spec.model_copy(update={"models": models, "tasks": tasks})
    dev_sizes = _check_files(spec, source)
    params = _check_search(spec, source)
    return _apply_data_scale(spec, params, min(dev_sizes)) if dev_sizes else spec


def with_overrides(spec: JobSpec, **sections: dict[str, Any]) -> JobSpec:
    """The job with some fields of its sections replaced (e.g. `search={"budget": 8}`), validated again."""
    data = spec.to_json()
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return parse_job(data, Path("/"), f"job '{spec.name}'")


def load_job(path: Path | str) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise JobError(f"{path}: job file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise JobError(f"{path}{where}: not valid YAML") from None
    return parse_job(data, path.parent, str(path))


def _check_files(spec: JobSpec, source: str) -> list[int]:
    """Check task files; returns the dev-split size of each task."""
    from evaluators.tasks import TaskDataError, load_task

    names = [t.name for t in spec.tasks]
    if len(set(names)) != len(names):
        raise JobError(f"{source}: field 'tasks': task names must be distinct, got {names}")
    chat = next((i for i, t in enumerate(spec.tasks) if t.chat_template), None)
    if chat is not None and not _has_chat_template(spec.models.base, spec.trust_remote_code):
        raise JobError(
            f"{source}: field 'tasks.{chat}.chat_template': the base model's tokenizer has no chat template"
        )
    sizes = []
    for i, task in enumerate(spec.tasks):
        if task.path is None:
            sizes.append(_check_lm_eval_task(task, i, source))
            continue
        if not task.path.is_dir():
            raise JobError(f"{source}: field 'tasks.{i}.path': folder not found: {task.path}")
        try:
            sizes.append(len(load_task(task.name, task.path, num_fewshot=task.num_fewshot or 0).dev))
        except TaskDataError as exc:
            raise JobError(str(exc)) from None
    return sizes


def _has_chat_template(base: Path, trust_remote_code: bool) -> bool:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return False
    return bool(getattr(tokenizer, "chat_template", None))


def _model_folder(field: str, ref: Path, root: Path, source: str) -> Path:
    """A model's folder: a path relative to the job file, else a Hub id found in the Hugging Face cache."""
    from workers.hub import ModelNotFoundError, locate_model

    try:
        return locate_model(ref, root)
    except ModelNotFoundError as exc:
        raise JobError(f"{source}: field '{field}': {exc}") from None


def _check_lm_eval_task(task: TaskSpec, index: int, source: str) -> int:
    """Build the lm-eval task as a worker will (a hub download or a bad task file stops the job here);
    returns the size of its dev split."""
    from evaluators.lm_eval_adapter import LMEvalError, load_lm_eval_task

    field = "lm_eval" if task.lm_eval is not None else "lm_eval_yaml"
    try:
        loaded = load_lm_eval_task(
            task.name,
            task=task.lm_eval,
            yaml=task.lm_eval_yaml,
            metric=task.metric,
            limit=task.limit,
            num_fewshot=task.num_fewshot,
        )
    except (LMEvalError, ImportError) as exc:
        raise JobError(f"{source}: field 'tasks.{index}.{field}': {exc}") from None
    return len(loaded.dev)


def _check_search(spec: JobSpec, source: str) -> BaseModel:
    import search.strategies  # noqa: F401  (registers the strategies)
    from search.base import STRATEGIES

    cls = STRATEGIES.get(spec.search.strategy)
    if cls is None:
        known = ", ".join(sorted(STRATEGIES))
        raise JobError(
            f"{source}: field 'search.strategy': unknown strategy '{spec.search.strategy}' ({known})"
        )
    try:
        return cls.Params.model_validate(spec.search.params)
    except ValidationError as exc:
        err = _first_error(exc, source)
        raise JobError(str(err).replace("field '", "field 'search.params.", 1)) from None


def _apply_data_scale(spec: JobSpec, params: BaseModel, dev_size: int) -> JobSpec:
    """A strategy that cycles data in fractions (RMM's `data_scale`) sets the chunk size, so that its
    round(1/data_scale) chunks line up with the worker's chunks of the dev split."""
    scale = getattr(params, "data_scale", None)
    if scale is None:
        return spec
    chunk = max(1, dev_size // round(1 / scale))
    return spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"dev_subset": chunk})})
