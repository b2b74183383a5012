"""The job file: YAML validated with pydantic, paths resolved against the file's folder.

A bad job is refused before any work starts, with one line naming the field or file (`JobError`). Parsing
is two steps: `validate_job` (fields, bounds, registries; no I/O) and `parse_job`'s file checks (folders,
task files). Checks that need the models themselves (architecture, tensor shapes) are done by
`workers.sources.Sources`, which a run opens when it starts (`orchestrator.launch`). The spec stays as it was
submitted: what a run derives from it (layer count, dev chunk size) is `launch.RunSettings`.

Every number a job carries is bounded (the `le=`/`max_length=` of each field below, `MAX_INT` for numbers in
free-form dicts such as `search.params`), floats must be finite, and the YAML itself is limited to
`MAX_YAML_BYTES` of scalars and `MAX_YAML_DEPTH` levels after its aliases are expanded: a job comes from the
network too, and the service drives it in its own process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import UserError
from search.space import SpaceSpec

MAX_INT = 2**63 - 1
"""Largest integer anywhere in a job (SQLite's and PostgreSQL's BIGINT); ids in requests share it."""
MAX_SEED = 2**32 - 1
MAX_YAML_BYTES = 1 << 20
"""Scalars' characters in a job after expanding its aliases (a 1 KB alias bomb expands to gigabytes)."""
MAX_YAML_DEPTH = 32


class JobError(UserError):
    """A job file that cannot run; the message is one line naming the field or file."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelsSpec(Strict):
    base: Path
    experts: dict[str, Path] = Field(min_length=1, max_length=64)
    tokenizer_source: Literal["base", "union"] = "base"
    """The merged vocabulary when experts add tokens, as mergekit's: the base's, or the union of all models'."""

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

    name: str = Field(min_length=1, max_length=100)
    path: Path | None = None
    lm_eval: str | None = Field(None, max_length=200)
    lm_eval_yaml: Path | None = None
    metric: str | None = Field(None, max_length=200)
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    stop: list[str] | None = Field(None, max_length=16)
    limit: int | None = Field(None, ge=1, le=10**7)
    num_fewshot: int | None = Field(None, ge=0, le=64)
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
    device: str = Field("cpu", max_length=32)
    dev_subset: int = Field(64, ge=1, le=10**7)
    """Examples per task per candidate: the chunk size of the seeded dev shuffle."""
    batch_size: int = Field(32, ge=1, le=65536)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _engine_args_need_vllm(self) -> EvaluationSpec:
        if self.engine_args and self.backend != "vllm":
            raise ValueError("engine_args configure the vLLM engine: set backend 'vllm' or drop them")
        return self


class SearchSpec(Strict):
    strategy: str = Field("random", max_length=50)
    budget: int = Field(16, ge=1, le=1_000_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    params: dict[str, Any] = Field(default_factory=dict)
    """Validated by the strategy's own `Params` (each bounds its sizes, e.g. CMA-ES `popsize`)."""
    max_minutes: float | None = Field(None, gt=0, le=525_600)
    """Stop asking after this much wall-clock time, budget or not: counted from the driver's start, over every
    run of the job (a resumed job has what is left; time it was stopped does not count)."""
    promote: int = Field(5, ge=1, le=1000)
    """The top candidates (by their chunk fitness) re-scored on the whole dev split for the final choice."""


class ObjectiveSpec(Strict):
    """The fitness: Σ_t w_t·s_t / Σ_t w_t over dev task scores s_t, each normalised or not."""

    weights: dict[str, float] = Field(default_factory=dict, max_length=1000)
    """Per-task weight (≥ 0); a task not named weighs 1."""
    normalize: Literal["none", "base_expert"] = "none"
    """base_expert: s_t becomes (s_t − base_t) / (best expert_t − base_t), from the references' scores."""

    @model_validator(mode="after")
    def _weights(self) -> ObjectiveSpec:
        if any(w < 0 for w in self.weights.values()) or (self.weights and not any(self.weights.values())):
            raise ValueError("weights must be ≥ 0 and not all 0")
        return self


class WorkersSpec(Strict):
    count: int = Field(2, ge=1, le=1024)
    num_cpus: float = Field(1.0, ge=0, le=1024)
    num_gpus: float = Field(0.0, ge=0, le=64)
    max_attempts: int = Field(3, ge=1, le=100)
    """A candidate whose worker dies is retried on another worker at most this many times in all."""
    cache_gb: float | None = Field(None, ge=0, le=4096)
    """Per worker, on its device: this much of source tensors (as stored; on the CPU these are memory-mapped
    and cost nothing), as much again of tensors derived from them (task vectors, magnitude ranks, DARE masks)
    and of merged layers beyond those in use are kept across candidates; 0 keeps none. Unset: a quarter of the
    model's size, within [0.25, 1] GiB (a CPU worker then peaks within 2.5 × the model from 1 GB up)."""


class JobSpec(Strict):
    name: str = Field("job", min_length=1, max_length=200)
    models: ModelsSpec
    tasks: list[TaskSpec] = Field(min_length=1, max_length=64)
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


def validate_job(data: dict[str, Any], source: str = "job") -> JobSpec:
    """Validate a job dict without touching the filesystem: fields, bounds, the strategy's parameters and the
    operators against their registries. Paths are kept as written (`parse_job` resolves and checks them)."""
    if not isinstance(data, dict):
        raise JobError(f"{source}: a job file must be a YAML mapping")
    _check_values(data, source)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, source) from None
    _check_operators(spec, strategy_params(spec, source), source)
    return spec


def parse_job(data: dict[str, Any], root: Path, source: str = "job", hub_ids: bool = True) -> JobSpec:
    """`validate_job`, then the I/O: relative paths resolved against `root`, model folders found, task files
    read. `hub_ids`: models may be Hub ids from the local Hugging Face cache (a server confined to its data
    roots says False). The spec is returned as submitted, paths aside: settings a run derives from it live
    in `orchestrator.launch.RunSettings`."""
    spec = validate_job(data, source)
    models = spec.models.model_copy(
        update={
            "base": _model_folder("models.base", spec.models.base, root, source, hub_ids),
            "experts": {
                n: _model_folder(f"models.experts.{n}", p, root, source, hub_ids)
                for n, p in spec.models.experts.items()
            },
        }
    )
    local = ("path", "lm_eval_yaml")
    tasks = [
        t.model_copy(update={k: (root / getattr(t, k)).resolve() for k in local if getattr(t, k)})
        for t in spec.tasks
    ]
    spec = spec.model_copy(update={"models": models, "tasks": tasks})
    _check_files(spec, source)
    return spec


def import_registries() -> None:
    """Import every strategy and operator (seconds: RMM brings torch and stable-baselines3), so that a service
    pays for it at startup rather than in its first request."""
    import search.strategies  # noqa: F401
    import workers.operators  # noqa: F401


def _check_values(data: Any, source: str, where: str = "") -> None:
    """Refuse numbers no field could hold: non-finite floats and integers beyond `MAX_INT`, at any depth
    (free-form dicts such as `search.params` included)."""
    if isinstance(data, dict):
        for key, value in data.items():
            _check_values(value, source, f"{where}.{key}" if where else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _check_values(value, source, f"{where}.{i}")
    elif isinstance(data, float) and not math.isfinite(data):
        raise JobError(f"{source}: field '{where}': {data} is not a finite number")
    elif isinstance(data, int) and not isinstance(data, bool) and abs(data) > MAX_INT:
        raise JobError(f"{source}: field '{where}': {data} is beyond the largest integer, {MAX_INT}")


def with_overrides(spec: JobSpec, **sections: dict[str, Any]) -> JobSpec:
    """The job with some fields of its sections replaced (e.g. `search={"budget": 8}`), validated again.
    Its files were checked when it was parsed, so only `validate_job` runs (no I/O)."""
    data = spec.to_json()
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return validate_job(data, f"job '{spec.name}'")


def load_job(path: Path | str) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise JobError(f"{path}: job file not found")
    return parse_job(load_yaml_text(path.read_bytes(), str(path)), path.parent, str(path))


def load_yaml_text(text: bytes | str, source: str = "job") -> Any:
    """Safe-load one YAML document, refused (JobError) if it is not valid, or too big or deep once its
    aliases are expanded, or refers to itself (a recursive alias): checked on the node graph, before any
    object is built."""
    try:
        loader = yaml.SafeLoader(text.decode("utf-8") if isinstance(text, bytes) else text)
    except UnicodeDecodeError:
        raise JobError(f"{source}: not UTF-8 text") from None
    try:
        node = loader.get_single_node()
        if node is not None:
            _expanded_size(node, source, {}, set(), 0)
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise JobError(f"{source}{where}: not valid YAML") from None
    except RecursionError:
        raise JobError(f"{source}: YAML nested deeper than {MAX_YAML_DEPTH} levels") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, source: str, sizes: dict[int, int], open_: set[int], depth: int) -> int:
    """Characters of the scalars under `node` with every alias expanded; a node reached through several
    aliases is counted each time but measured once (`sizes`), so a bomb is measured in microseconds."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise JobError(f"{source}: a YAML alias refers to a node that contains it (a recursive alias)")
    if depth > MAX_YAML_DEPTH:
        raise JobError(f"{source}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
    if isinstance(node, yaml.ScalarNode):
        size = len(node.value) + 1
    else:
        open_.add(key)
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        size = 1
        for child in children:
            size += _expanded_size(child, source, sizes, open_, depth + 1)
            if size > MAX_YAML_BYTES:
                raise JobError(f"{source}: YAML over {MAX_YAML_BYTES} bytes once its aliases are expanded")
        open_.discard(key)
    sizes[key] = size
    return size


def _check_files(spec: JobSpec, source: str) -> None:
    """Check task names, the chat template a task asks for, and every task's files."""
    names = [t.name for t in spec.tasks]
    if len(set(names)) != len(names):
        raise JobError(f"{source}: field 'tasks': task names must be distinct, got {names}")
    chat = next((i for i, t in enumerate(spec.tasks) if t.chat_template), None)
    if chat is not None and not _has_chat_template(spec.models.base, spec.trust_remote_code):
        raise JobError(
            f"{source}: field 'tasks.{chat}.chat_template': the base model's tokenizer has no chat template"
        )
    dev_sizes(spec, source)


def dev_sizes(spec: JobSpec, source: str = "job") -> list[int]:
    """The dev-split size of each task, read as a worker will read it (a bad file: JobError naming it)."""
    from evaluators.tasks import TaskDataError, load_task

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


def _model_folder(field: str, ref: Path, root: Path, source: str, hub_ids: bool) -> Path:
    """A model's folder: a path relative to the job file, else a Hub id found in the Hugging Face cache."""
    from workers.hub import ModelNotFoundError, locate_model

    try:
        return locate_model(ref, root, hub_ids=hub_ids)
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


def strategy_params(spec: JobSpec, source: str = "job") -> BaseModel:
    """The job's strategy parameters, validated by the strategy's own `Params` (its defaults filled in)."""
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


def _check_operators(spec: JobSpec, params: BaseModel, source: str) -> None:
    """`space.op` with `space.params`, and every operator a strategy's parameters name (RMM's pool, which
    gives weights 1 per expert where it names none), against the operator registry: a recipe the workers
    would refuse is refused here, before the job is queued."""
    from search.space import SearchSpace
    from workers.operators import resolve
    from workers.recipe import OpSpec, Recipe, RecipeError

    experts = spec.expert_names()
    space = SearchSpace(spec.space, 1, "base", experts)
    lower, upper = space.bounds()
    checked: list[tuple[str, OpSpec]] = []
    # The center, and 11 points along the box's diagonal (every range at 0%, 10%, ..., 100%): an operator's
    # own limits (della's density ± epsilon inside (0, 1)) must hold wherever a strategy may sample.
    diagonal = [
        (f" at {10 * i}% of its ranges", [lo + i / 10 * (hi - lo) for lo, hi in zip(lower, upper)])
        for i in range(11)
    ]
    for where, genome in [("", space.center()), *diagonal]:
        try:
            checked += [(f"field 'space'{where}", op) for op in Recipe.parse(space.decode(genome)).ops()]
        except (RecipeError, ValueError) as exc:
            raise JobError(f"{source}: field 'space'{where}: {exc}") from None
    for key, value in params:
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, OpSpec):
                field = f"search.params.{key}" + (f".{i}" if isinstance(value, list) else "")
                checked.append((f"field '{field}'", item.weighted(len(experts))))
    for label, op in checked:
        try:
            resolve(op, len(experts), ("base", *experts))
        except RecipeError as exc:
            raise JobError(f"{source}: {label}: {exc}") from None
