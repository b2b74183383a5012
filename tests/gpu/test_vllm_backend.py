"""A short search on the zoo with the vLLM backend, its scores checked against the HF backend's.

Both backends run in float32 on the same GPU, so greedy decoding agrees except on near-ties in the logits,
where different attention kernels may pick different tokens: at most one example per task may differ.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from orchestrator.archive import Archive
from orchestrator.driver import Driver
from orchestrator.jobspec import JobSpec, load_job
from orchestrator.pool import LocalPool, Work, worker_setup
from workers.worker import ModelWorker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="needs vLLM (the optional extra 'vllm')"
    ),
]

DEV_SUBSET = 32


def zoo_spec(zoo_dir: Path, backend: str) -> JobSpec:
    spec = load_job(zoo_dir / "job.yaml")
    engine_args = {"dtype": "float32", "gpu_memory_utilization": 0.3, "enforce_eager": True, "seed": 0}
    evaluation = spec.evaluation.model_copy(
        update={
            "backend": backend,
            "device": "cuda",
            "dev_subset": DEV_SUBSET,
            "engine_args": engine_args if backend == "vllm" else {},
        }
    )
    search = spec.search.model_copy(update={"budget": 6})
    return spec.model_copy(update={"evaluation": evaluation, "search": search, "references": False})


def test_a_short_vllm_search_scores_its_candidates_as_the_hf_backend_does(
    zoo_dir: Path, tmp_path: Path
) -> None:
    spec = zoo_spec(zoo_dir, "vllm")
    on_vllm = ModelWorker(worker_setup(spec))
    archive = Archive(f"sqlite:///{tmp_path / 'archive.db'}")
    job = archive.create_job(spec.to_json(), "vllm")

    def evaluate(work: Work) -> dict:
        return on_vllm.evaluate(work.recipe, work.subset, work.splits)

    Driver(archive, spec, job, LocalPool(evaluate, 1), num_layers=on_vllm.sources.num_layers).run()
    candidates = archive.candidates(job, kind="search", status="done")
    assert len(candidates) == 6

    on_hf = ModelWorker(worker_setup(zoo_spec(zoo_dir, "hf")))
    for cand in candidates:
        hf = on_hf.evaluate(cand.recipe, cand.subset)
        assert hf["ok"], hf
        for task, score in hf["dev"].items():
            assert abs(cand.dev[task] - score) <= 1 / DEV_SUBSET + 1e-9, (
                cand.id,
                task,
                cand.dev[task],
                score,
            )
    assert len({tuple(sorted(c.dev.items())) for c in candidates}) > 1  # the engine's weights did change
