"""A short search on the zoo with the vLLM backend, its scores checked against the HF backend's.

Both backends run in float32 on the same GPU. vLLM serves float32 with its Triton attention kernel, whose
float32 dot products default to TF32; TRITON_F32_DEFAULT=ieee keeps them in float32. Greedy decoding then
agrees except on near-ties in the logits, where different kernels may pick different tokens: at most one
example per task may differ.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from evaluators.vllm_backend import VLLMBackend
from orchestrator.archive import Archive
from orchestrator.driver import Driver, reference_recipes
from orchestrator.jobspec import JobSpec, load_job
from orchestrator.launch import run_settings
from orchestrator.pool import LocalPool, worker_setup
from workers.worker import ModelWorker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="needs vLLM (the optional extra 'vllm')"
    ),
]

DEV_SUBSET = 32
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""vLLM's fused tensors and the Hugging Face tensors stacked (dim 0) in them, in order."""


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


def assert_engine_holds(engine: Any, model: torch.nn.Module) -> None:
    """Every tensor of `model` is in the engine's model, under vLLM's names and fused layout."""
    ours = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    theirs = engine.collective_rpc(
        lambda worker: {n: p.detach().cpu() for n, p in worker.get_model().named_parameters()}
    )[0]
    matched: set[str] = set()
    for name, tensor in theirs.items():
        fused = next((f for f in FUSED if f".{f}." in name), None)
        sources = [name.replace(fused, part) for part in FUSED[fused]] if fused else [name]
        if not all(s in ours for s in sources):
            continue  # vLLM-only parameters; the final check below catches a name that failed to map
        expected = torch.cat([ours[s] for s in sources]).to(tensor.dtype)
        assert torch.equal(tensor[: len(expected)], expected), name  # vocab rows are padded in vLLM
        matched.update(sources)
    assert matched == set(ours), sorted(set(ours) - matched)


def test_a_short_vllm_search_scores_its_candidates_as_the_hf_backend_does(
    zoo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    spec = zoo_spec(zoo_dir, "vllm")
    on_vllm = ModelWorker(worker_setup(spec))
    assert isinstance(on_vllm.backend, VLLMBackend)
    recipes = reference_recipes(spec.expert_names(), num_layers=on_vllm.sources.num_layers)
    first = on_vllm.evaluate(recipes["expert:reverse"])
    assert first["ok"], first  # a failure carries the worker's traceback in 'detail'
    assert_engine_holds(on_vllm.backend.engine, on_vllm.resident.model)
    archive = Archive(f"sqlite:///{tmp_path / 'archive.db'}")
    job = archive.create_job(spec.to_json(), "vllm")
    settings = run_settings(spec, num_layers=on_vllm.sources.num_layers)
    Driver(archive, spec, job, LocalPool.of_worker(on_vllm), settings).run()
    failed = archive.candidates(job, kind="search", status="failed")
    assert not failed, [c.error for c in failed]
    candidates = archive.candidates(job, kind="search", status="done")
    assert len(candidates) == 6
    assert_engine_holds(on_vllm.backend.engine, on_vllm.resident.model)  # the last candidate's weights

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
