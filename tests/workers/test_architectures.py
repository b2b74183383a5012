"""Every architecture of the test matrix merges, materializes in place equal to `write_merged` +
`from_pretrained` (dense, renamed heads, fused MoE experts, tied embeddings, sliding-window layer types), and is
scored by the worker as a search scores it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.workers.architectures import ARCHITECTURES, MOE_ARCHITECTURES, family
from workers.materialize import ResidentModel, merged_tensors, write_merged
from workers.recipe import Recipe, RecipeError
from workers.sources import SourceError, Sources
from workers.worker import ModelWorker, TaskSetup, WorkerSetup

PROMPT = torch.tensor([[1, 5, 6, 7, 8]])


def ties(froms: list[int], density: float = 0.5) -> Recipe:
    params = {"weights": [0.5, 0.7], "density": density}
    return Recipe.parse(
        {
            "models": {"base": "base", "experts": ["expert0", "expert1"]},
            "layers": [{"from": f, "op": "ties", "params": params} for f in froms],
            "rest": {"op": "ties", "params": params},
            "seed": 3,
        }
    )


def write_task(folder: Path) -> Path:
    """A tiny generation task over the architectures' alphabet (scores are near zero: only the path counts)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"{a}{b}:", "target": f"{b}{a}"} for a, b in ("ab", "cd", "ef", "gh")]
    for split in ("dev", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module", params=ARCHITECTURES)
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    arch = request.param
    base, experts = family(arch, tmp_path_factory.mktemp(arch))
    return arch, base, experts


def test_in_place_equals_disk(models, tmp_path: Path) -> None:
    arch, base, experts = models
    sources = Sources(base, experts)
    resident = ResidentModel(sources)
    for froms in ([0, 1], [1, 0, 1]):  # the source depth, then a repeat at another depth
        recipe = ties(froms)
        resident.materialize(recipe)
        folder = write_merged(recipe, sources, tmp_path / f"merged-{len(froms)}")
        disk = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        ours, theirs = resident.model.state_dict(), disk.state_dict()
        assert ours.keys() == theirs.keys()
        for name, tensor in theirs.items():
            assert torch.equal(ours[name], tensor), (arch, name)
        with torch.no_grad():
            assert torch.equal(resident.model(PROMPT).logits, disk(PROMPT).logits), arch
        generated = disk.generate(PROMPT, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        assert generated.shape == (1, PROMPT.shape[1] + 4)
    # The merge changed the weights (a no-op conversion would pass the equalities above).
    merged = dict(merged_tensors(ties([0, 1]), sources))
    assert sum(not torch.equal(merged[n], sources.load("base", n).to(merged[n].dtype)) for n in merged) > len(merged) // 2


def test_moe_experts_are_fused_from_per_expert_tensors(tmp_path: Path) -> None:
    """The resident MoE's fused expert parameter holds, expert by expert, the checkpoint's per-expert tensors."""
    for arch in MOE_ARCHITECTURES[:2]:
        base, experts = family(arch, tmp_path / arch)
        sources = Sources(base, experts)
        resident = ResidentModel(sources)
        resident.materialize(
            Recipe.parse(
                {
                    "models": {"base": "base", "experts": ["expert0", "expert1"]},
                    "layers": [{"from": i, "op": "copy", "params": {"model": "expert1"}} for i in range(2)],
                    "rest": {"op": "copy", "params": {"model": "expert1"}},
                }
            )
        )
        down = [n for n in sources.tensor_names() if ".layers.1." in n and ".experts.2." in n and "w2" in n]
        down = down or [n for n in sources.tensor_names() if ".layers.1." in n and ".experts.2.down_proj" in n]
        fused = resident.model.model.layers[1].mlp.experts.down_proj
        assert torch.equal(fused[2], sources.load("expert1", down[0]).to(fused.dtype)), arch


@pytest.mark.parametrize("arch", ["gpt_neox", "mixtral", "gemma2"])
def test_worker_scores_candidates(arch: str, tmp_path: Path) -> None:
    """The worker (as a Ray actor runs it) materializes and scores candidates of each kind of architecture."""
    base, experts = family(arch, tmp_path / "models")
    setup = WorkerSetup(
        base=str(base),
        experts={n: str(p) for n, p in experts.items()},
        tasks=[TaskSetup(name="swap", path=str(write_task(tmp_path / "swap")), max_new_tokens=3)],
        dev_subset=4,
    )
    worker = ModelWorker(setup)
    for density in (0.3, 0.8):
        out = worker.evaluate(ties([0, 1], density).to_json())
        assert out["ok"], out
        assert 0.0 <= out["dev"]["swap"] <= 1.0 and len(out["per_example"]["swap"]) == 4


def test_mixed_layer_kinds_stay_at_their_positions(tmp_path: Path) -> None:
    """A Qwen2-MoE whose layer 1 is dense (`mlp_only_layers`): layers keep their kind's positions (config.json
    cannot say otherwise), and the resident model's pool never puts a dense layer into an MoE module."""
    base, experts = family("qwen2_moe", tmp_path / "models", mlp_only_layers=[1])
    sources = Sources(base, experts)
    assert sources.layer_kind(0) != sources.layer_kind(1)
    resident = ResidentModel(sources, cache_layers=2)
    for froms in ([1, 0], [0, 0], [0, 1, 1]):
        with pytest.raises(RecipeError, match=r"mixes layer kinds .* cannot place layer"):
            resident.materialize(ties(froms))
        with pytest.raises(RecipeError, match=r"mixes layer kinds"):
            write_merged(ties(froms), sources, tmp_path / "refused")
    for density in (0.3, 0.6):  # the pool holds both kinds and reuses each for its own
        recipe = ties([0, 1], density)
        resident.materialize(recipe)
        disk = AutoModelForCausalLM.from_pretrained(
            write_merged(recipe, sources, tmp_path / f"merged-{density}"), dtype=torch.bfloat16
        )
        with torch.no_grad():
            assert torch.equal(resident.model(PROMPT).logits, disk(PROMPT).logits)


def test_tensors_that_loading_ignores_are_ignored_in_place(tmp_path: Path) -> None:
    """Old GPT-NeoX checkpoints (Pythia) keep causal-mask buffers that `from_pretrained` skips: so does the
    resident model; a tensor loading would not skip is still refused, naming it."""
    base, experts = family("gpt_neox", tmp_path / "models")
    for folder in (base, *experts.values()):
        tensors = load_file(folder / "model.safetensors")
        for i in range(2):
            tensors[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    sources = Sources(base, experts)
    resident = ResidentModel(sources)
    spec = {"op": "task_arithmetic", "params": {"weights": [0.5, 0.7]}}
    recipe = Recipe.parse(
        {
            "models": {"base": "base", "experts": ["expert0", "expert1"]},
            "layers": [{"from": f, **spec} for f in (1, 0)],
            "rest": spec,
        }
    )
    resident.materialize(recipe)
    disk = AutoModelForCausalLM.from_pretrained(write_merged(recipe, sources, tmp_path / "merged"))
    with torch.no_grad():
        assert torch.equal(resident.model(PROMPT).logits, disk.to(torch.bfloat16)(PROMPT).logits)
    for folder in (base, *experts.values()):
        tensors = load_file(folder / "model.safetensors")
        tensors["gpt_neox.layers.0.attention.extra"] = torch.zeros(2)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError, match=r"tensor 'gpt_neox.layers.0.attention.extra' is not a parameter of GPTNeoX"):
        ResidentModel(Sources(base, experts))
