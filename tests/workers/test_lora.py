"""LoRA adapters as experts: each tensor equals PEFT's own merge_and_unload, and they merge like full models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tests.workers.synthetic import make_models, tiny_config
from workers.lora import LoraModel
from workers.materialize import ResidentModel, write_merged
from workers.mergekit_config import MergekitConfigError, recipe_from_mergekit
from workers.recipe import Recipe
from workers.sources import SourceError, Sources, _Model

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")


def save_adapter(base: Path, out: Path, seed: int = 0, **lora: object) -> torch.nn.Module:
    """A PEFT LoRA of `base` with random factors (PEFT starts B, or an embedding's A, at zero), saved to `out`;
    returns PEFT's merged model."""
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**lora))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name or "lora_embedding" in name or "modules_to_save" in name:
                param.normal_(std=0.1)
    wrapped.save_pretrained(out)
    return wrapped.merge_and_unload()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return make_models(tmp_path_factory.mktemp("lora"), n_experts=1, config=tiny_config(layers=3, hidden=32))


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_tensors_equal_peft_merge_and_unload(
    models: tuple[Path, dict[str, Path]], tmp_path: Path, rslora: bool
) -> None:
    base, _ = models
    merged = save_adapter(
        base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        use_rslora=rslora,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
    )
    sources = Sources(base, {"lora": tmp_path / "adapter"})
    expected = merged.state_dict()
    base_weights = load_file(base / "model.safetensors")
    changed = 0
    for name in sources.tensor_names():
        got = sources.load("lora", name)
        torch.testing.assert_close(got, expected[name], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        changed += not torch.equal(got, base_weights[name])
    # q, v and down in 3 layers, the embedding and the saved lm_head: the adapter really changed them.
    assert changed == 3 * 3 + 2


def test_fan_in_fan_out_layers_are_transposed(tmp_path: Path) -> None:
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    merged = save_adapter(
        tmp_path / "gpt2",
        tmp_path / "adapter",
        r=2,
        lora_alpha=4,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
    )
    lora = LoraModel("lora", tmp_path / "adapter", _Model("base", tmp_path / "gpt2"))
    expected = merged.state_dict()
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"):
        torch.testing.assert_close(lora.read(name), expected[name], atol=1e-6, rtol=0)


def test_a_lora_expert_merges_and_loads(models: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    base, experts = models
    peft_merged = save_adapter(
        base, tmp_path / "adapter", r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"]
    )
    recipe = Recipe.parse(
        {
            "models": {"base": "base", "experts": ["full", "lora"]},
            "layers": [{"from": i, "op": "linear", "params": {"weights": [0.25, 0.75]}} for i in range(3)],
            "rest": {"op": "linear", "params": {"weights": [0.25, 0.75]}},
        }
    )
    sources = Sources(base, {"full": experts["expert0"], "lora": tmp_path / "adapter"})
    out = write_merged(recipe, sources, tmp_path / "merged")
    full = load_file(experts["expert0"] / "model.safetensors")
    lora = peft_merged.state_dict()
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"):
        torch.testing.assert_close(got[name], 0.25 * full[name] + 0.75 * lora[name], atol=1e-6, rtol=0)
    # A search's worker merges it in place into its resident model: the same weights.
    resident = ResidentModel(sources)
    resident.materialize(recipe)
    for name, tensor in resident.model.state_dict().items():
        torch.testing.assert_close(tensor, got[name], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_dora_and_other_peft_types_are_refused_in_one_line(
    models: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    base, _ = models
    save_adapter(base, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(SourceError, match=r"^model 'dora': .*'use_dora'.*not supported$"):
        Sources(base, {"dora": tmp_path / "dora"})
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), peft.IA3Config(target_modules=["v_proj", "down_proj"])
    )
    wrapped.save_pretrained(tmp_path / "ia3")
    with pytest.raises(SourceError, match=r"^model 'ia3': PEFT type IA3 is not supported"):
        Sources(base, {"ia3": tmp_path / "ia3"})


def test_mergekit_base_plus_lora_names_the_adapter(
    models: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    base, experts = models
    save_adapter(base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    config = "merge_method: task_arithmetic\nbase_model: {b}\nmodels: [{{model: {m}+{a}, parameters: {{weight: 1}}}}]\n"
    recipe, paths = recipe_from_mergekit(config.format(b=base, m=base, a=tmp_path / "adapter"))
    assert paths == {"base": base, "adapter": tmp_path / "adapter"} and recipe.models.experts == ["adapter"]
    with pytest.raises(MergekitConfigError, match="a LoRA is applied to the base_model only"):
        recipe_from_mergekit(config.format(b=base, m=experts["expert0"], a=tmp_path / "adapter"))
