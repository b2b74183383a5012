"""Job files from the network may only read what the server was told to share: its data roots.

Every model and task path must lie under a data root after resolving symlinks, must not climb with `..`, and
every file inside those folders must resolve under a data root too (a symlinked shard pointing at /etc is
refused like an absolute /etc path). An lm-eval task file is read as lm-eval would read it, without running
it: the files it includes and the data it loads must lie under the roots too, and its `!function` code
(which building the task imports, in the service's process) is refused unless the server allows task code.
`trust_remote_code` is refused unless the server allows it, and vLLM `engine_args` are limited to settings
that name no file and no code (`ENGINE_ARGS`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orchestrator.jobspec import JobError, JobSpec, parse_job

ENGINE_ARGS = frozenset({
    "dtype", "gpu_memory_utilization", "enforce_eager", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "seed", "swap_space", "kv_cache_dtype", "block_size", "enable_prefix_caching", "tensor_parallel_size",
    "quantization", "cpu_offload_gb", "max_seq_len_to_capture", "disable_custom_all_reduce",
})
"""vLLM engine arguments a job sent to a server may set: others can name files (tokenizer, download_dir) or
load code (trust_remote_code, hf_overrides)."""


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _check_path(field: str, raw: Any, base: Path, roots: list[Path], source: str) -> Path | None:
    """The resolved path `raw` names, refused unless it (and all under it) lies under the roots."""
    if not isinstance(raw, str):
        return None  # parse_job names the type error
    path = Path(raw)
    if ".." in path.parts:
        raise JobError(f"{source}: field '{field}': '..' is not allowed in paths sent to a server")
    resolved = (base / path).resolve()
    _check_read(field, resolved, roots, source)
    return resolved


def _check_read(field: str, path: Path, roots: list[Path], source: str, what: str = "") -> None:
    if not _inside(path.resolve(), roots):
        raise JobError(f"{source}: field '{field}': {what}{path} is outside the server's data roots")
    if path.is_dir():
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                if not _inside((Path(folder) / name).resolve(), roots):
                    raise JobError(
                        f"{source}: field '{field}': {Path(folder, name)} links outside the server's data roots"
                    )


def _check_task_file(field: str, path: Path, roots: list[Path], allow_code: bool, source: str) -> None:
    from evaluators.lm_eval_adapter import LMEvalError, task_file_reads

    try:
        reads = task_file_reads(path)
    except LMEvalError as exc:
        raise JobError(f"{source}: field '{field}': {exc}") from None
    for included in reads.files[1:]:
        _check_read(field, included, roots, source, "included file ")
    for data in reads.data:
        _check_read(field, data, roots, source, "data ")
    if reads.functions and not allow_code:
        raise JobError(
            f"{source}: field '{field}': runs Python code (!function {reads.functions[0]}), which this server "
            "does not allow (serve --allow-task-code)"
        )


def confine_job(
    data: Any,
    roots: list[Path],
    base: Path | None = None,
    allow_remote_code: bool = False,
    source: str = "job",
    allow_task_code: bool = False,
) -> JobSpec:
    """Validate a job dict sent to the server: paths under `roots`, resolved against `base` (default: roots[0])."""
    if not roots:
        raise JobError("the server has no data roots (start it with --data-root DIR)")
    roots = [r.resolve() for r in roots]
    base = (base or roots[0]).resolve()
    if not _inside(base, roots):
        raise JobError(f"{source}: field 'root': {base} is outside the server's data roots")
    if not isinstance(data, dict):
        raise JobError(f"{source}: a job file must be a YAML mapping")
    if data.get("trust_remote_code") and not allow_remote_code:
        raise JobError(f"{source}: field 'trust_remote_code': not allowed by this server")
    evaluation = data.get("evaluation") if isinstance(data.get("evaluation"), dict) else {}
    engine_args = evaluation.get("engine_args") if isinstance(evaluation.get("engine_args"), dict) else {}
    for key in engine_args:
        if key not in ENGINE_ARGS:
            raise JobError(
                f"{source}: field 'evaluation.engine_args.{key}': not allowed by a server ({', '.join(sorted(ENGINE_ARGS))})"
            )
    models = data.get("models") if isinstance(data.get("models"), dict) else {}
    _check_path("models.base", models.get("base"), base, roots, source)
    experts = models.get("experts") if isinstance(models.get("experts"), dict) else {}
    for name, raw in experts.items():
        _check_path(f"models.experts.{name}", raw, base, roots, source)
    tasks = data.get("tasks") if isinstance(data.get("tasks"), list) else []
    for i, task in enumerate(tasks):
        if isinstance(task, dict):
            _check_path(f"tasks.{i}.path", task.get("path"), base, roots, source)
            task_file = _check_path(f"tasks.{i}.lm_eval_yaml", task.get("lm_eval_yaml"), base, roots, source)
            if task_file is not None:
                _check_task_file(f"tasks.{i}.lm_eval_yaml", task_file, roots, allow_task_code, source)
    return parse_job(data, base, source, hub_ids=False)  # the server's Hugging Face cache is not a data root
