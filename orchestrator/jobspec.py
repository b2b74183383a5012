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
    """

    name: str
    path: Path | None = None
    lm_eval: str | None = None
    lm_eval_yaml: Path | None = None
    metric: str | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = None
    limit: int | None = Field(None, ge=1)

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
    max_minutes: float | None = Field(None, gt=0)
    """Stop asking after this much wall-clock time (counted from the driver's start), budget or not."""
    promote: int = Field(5, ge=1)
    """The top candidates (by their chunk fitness) re-scored on the whole dev split for the final choice."""


class ObjectiveSpec(Strict):
    """The fitness: Σ_t w_t·s_t / Σ_t w_t over dev task scores s_t, each normalised or not."""

    weights: dict[str, float] = Field(default_factory=dict)
    """Per-task weight (≥ 0); a task not named weighs 1."""
    normalize: Literal["none", "base_expert"] = "none"
    """base_expert: s_t becomes (s_t − base_t) / (best expert_t − base_t), from the references' scores."""

    @model_validator(mode="after")
    def _weights(self) -> ObjectiveSpec:
        if any(w < 0 for w in self.weights.values()) or (self.weights and not any(self.weights.values())):
            raise ValueError("weights must be ≥ 0 and not all 0")
        return self


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
    objective: ObjectiveSpec = ObjectiveSpec()

    @model_validator(mode="after")
    def _objective(self) -> JobSpec:
        unknown = set(self.objective.weights) - {t.name for t in self.tasks}
        if unknown:
            raise ValueError(f"objective.weights: no task named {min(unknown)!r}")
        if self.objective.normalize != "none" and not self.references:
            raise ValueError("objective.normalize needs the references (base and experts): set references: true")
        return self

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
        base=(root / spec.models.base).resolve(),
        experts={n: (root / p).resolve() for n, p in spec.models.experts.items()},
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
    """Check model folders and task files; returns the dev-split size of each task."""
    from evaluators.tasks import TaskDataError, load_task

    for field, folder in [("models.base", spec.models.base)] + [
        (f"models.experts.{n}", p) for n, p in spec.models.experts.items()
    ]:
        if not (folder / "config.json").is_file():
            raise JobError(
                f"{source}: field '{field}': no Hugging Face model folder (config.json) at {folder}"
            )
    names = [t.name for t in spec.tasks]
    if len(set(names)) != len(names):
        raise JobError(f"{source}: field 'tasks': task names must be distinct, got {names}")
    sizes = []
    for i, task in enumerate(spec.tasks):
        if task.path is None:
            sizes.append(_check_lm_eval_task(task, i, source))
            continue
        if not task.path.is_dir():
            raise JobError(f"{source}: field 'tasks.{i}.path': folder not found: {task.path}")
        try:
            sizes.append(len(load_task(task.name, task.path).dev))
        except TaskDataError as exc:
            raise JobError(str(exc)) from None
    return sizes


def _check_lm_eval_task(task: TaskSpec, index: int, source: str) -> int:
    """Build the lm-eval task as a worker will (a hub download or a bad task file stops the job here);
    returns the size of its dev split."""
    from evaluators.lm_eval_adapter import LMEvalError, load_lm_eval_task

    field = "lm_eval" if task.lm_eval is not None else "lm_eval_yaml"
    try:
        loaded = load_lm_eval_task(
            task.name, task=task.lm_eval, yaml=task.lm_eval_yaml, metric=task.metric, limit=task.limit
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
