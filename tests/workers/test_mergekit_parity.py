"""Parity with mergekit 0.1.5: the same YAML, merged by mergekit and by us, agrees to 1e-5 per tensor.

Needs mergekit in `.mkvenv/` (see docs/operators.md) or `mergekit-yaml` on PATH; slow (one mergekit process
per config): deselected by default, run it with `-m slow`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.workers.architectures import MOE_ARCHITECTURES, VOCAB, family, perturbed, tiny_model
from tests.workers.synthetic import make_models, tiny_config
from workers.materialize import write_merged
from workers.mergekit_config import recipe_from_mergekit, recipe_to_mergekit
from workers.recipe import Recipe
from workers.sources import Sources

REPO = Path(__file__).resolve().parents[2]
MERGEKIT = next(
    (str(p) for p in (REPO / ".mkvenv/bin/mergekit-yaml",) if p.exists()), shutil.which("mergekit-yaml")
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        MERGEKIT is None, reason="mergekit is not installed (.mkvenv/bin/mergekit-yaml or PATH)"
    ),
]


CONFIGS = {
    "linear": """
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.2}}
  - model: {e0}
    parameters: {{weight: 0.5}}
  - model: {e1}
    parameters: {{weight: 0.3}}
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {e0}
    parameters:
      weight:
        - filter: layers
          value: [0.2, 0.9, 0.5, 0.7]
        - value: 0.4
  - model: {e1}
    parameters: {{weight: 0.6}}
parameters: {{lambda: 0.8}}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {e1}
    parameters:
      weight: 0.4
      density:
        - filter: mlp
          value: 0.3
        - value: 0.6
parameters: {{normalize: true}}
dtype: float32
""",
    "dare_ties": """
merge_method: dare_ties
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 0.7}}
  - model: {e1}
    parameters: {{weight: -0.4}}
dtype: float32
""",
    "linear_gradient": """
merge_method: linear
models:
  - model: {e0}
    parameters:
      weight:
        - filter: lm_head
          value: 0.1
        - filter: model.norm
          value: 0.1
        - value: [0.2, 0.9, 0.5, 0.7]
  - model: {e1}
    parameters: {{weight: 0.6}}
dtype: float32
""",
    "ties_gradient": """
merge_method: ties
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: [0.7, 0.1, 0.4], density: [0.3, 0.8]}}
  - model: {e1}
    parameters: {{weight: [0.2, 0.9], density: 0.6}}
parameters: {{lambda: [1.2, 0.8]}}
dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {e0}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "slerp_slices": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {e0}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "passthrough": """
merge_method: passthrough
slices:
  - sources: [{{model: {e0}, layer_range: [0, 2]}}]
  - sources: [{{model: {e1}, layer_range: [1, 4]}}]
  - sources: [{{model: {e0}, layer_range: [3, 4]}}]
dtype: float32
""",
    "ties_slices": """
merge_method: ties
base_model: {base}
parameters: {{density: 0.5}}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 3]}}
      - {{model: {e0}, layer_range: [0, 3], parameters: {{weight: [0.2, 0.8]}}}}
      - {{model: {e1}, layer_range: [0, 3], parameters: {{weight: 0.3}}}}
  - sources:
      - {{model: {base}, layer_range: [2, 4]}}
      - {{model: {e0}, layer_range: [2, 4]}}
    parameters:
      weight: [{{filter: mlp, value: [0.9, 0.1]}}, {{value: 0.6}}]
      density: 0.9
dtype: float32
""",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    base, experts = make_models(root, n_experts=2, config=tiny_config(layers=4, hidden=32))
    return {"base": base, "e0": experts["expert0"], "e1": experts["expert1"]}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_same_weights_as_mergekit(method: str, models: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / f"{method}.yml"
    config.write_text(CONFIGS[method].format(**{k: str(v) for k, v in models.items()}))
    run_mergekit(config, tmp_path / "mergekit")
    recipe, paths = recipe_from_mergekit(config)
    experts = {n: p for n, p in paths.items() if n != recipe.models.base}
    ours = write_merged(
        recipe, Sources(paths[recipe.models.base], experts, recipe.models.base), tmp_path / "ours"
    )

    assert_same_tensors(ours, tmp_path / "mergekit")


def run_mergekit(config: Path, out: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [MERGEKIT, str(config), str(out), "--no-write-model-card", "--no-copy-tokenizer"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    expected = load_file(theirs / "model.safetensors")
    got = load_file(ours / "model.safetensors")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_exported_recipe_with_repeated_and_skipped_layers_and_a_head(
    models: dict[str, Path], tmp_path: Path
) -> None:
    ties = {"density": [0.5, 0.3], "lambda": 0.9, "normalize": False}
    recipe = Recipe.parse(
        {
            "models": {"base": "base", "experts": ["e0", "e1"]},
            "layers": [
                {"from": 0, "op": "ties", "params": {**ties, "weights": [0.6, 0.2]}},
                {
                    "from": 1,
                    "op": "ties",
                    "params": {**ties, "weights": [0.3, 0.8]},
                    "attn": {"op": "ties", "params": {**ties, "weights": [0.1, 0.1]}},
                },
                {"from": 1, "op": "ties", "params": {**ties, "weights": [0.5, 0.5]}},
                {"from": 3, "op": "copy", "params": {"model": "e1"}},
            ],
            "rest": {"op": "ties", "params": {**ties, "weights": [0.4, 0.7]}},
            "head": {"op": "ties", "params": {**ties, "weights": [0.9, 0.1]}},
        }
    )
    text, problems = recipe_to_mergekit(recipe, {k: str(v) for k, v in models.items()})
    assert problems == ["layers[3]: op 'copy' is mergekit task_arithmetic, not the YAML's ties"]
    # A copy has no ties form here: compare the other layers and the non-layer tensors.
    recipe = recipe.model_copy(update={"layers": recipe.layers[:3]})
    text, problems = recipe_to_mergekit(recipe, {k: str(v) for k, v in models.items()})
    assert problems == []
    config = tmp_path / "exported.yml"
    config.write_text(text)
    run_mergekit(config, tmp_path / "mergekit")
    sources = Sources(models["base"], {"e0": models["e0"], "e1": models["e1"]}, "base")
    assert_same_tensors(write_merged(recipe, sources, tmp_path / "ours"), tmp_path / "mergekit")


MERGEKIT_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "mixtral", "qwen3_moe")
"""The test matrix's architectures that mergekit 0.1.5 merges (its `_data/architectures`); its GPT-NeoX
definition asks for `attention.masked_bias`, which transformers 5 no longer saves."""
ARCH_CONFIG = """
merge_method: {method}
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 0.7{density0}}}
  - model: {e1}
    parameters: {{weight: [0.4, 0.9]{density1}}}
dtype: float32
"""


@pytest.mark.parametrize("arch", MERGEKIT_ARCHITECTURES)
def test_architectures_same_weights_as_mergekit(arch: str, tmp_path: Path) -> None:
    """Checkpoints as transformers 5 saves them merge as mergekit merges them. MoE models by task arithmetic:
    mergekit merges an MoE layer's experts as the module's fused tensor (one TIES trim over all experts), we
    per expert tensor of the checkpoint, so only element-wise operators agree there."""
    base, experts = family(arch, tmp_path / "models", dtype=torch.float32)
    config = tmp_path / "merge.yml"
    trim = arch not in MOE_ARCHITECTURES
    config.write_text(
        ARCH_CONFIG.format(
            method="ties" if trim else "task_arithmetic",
            density0=", density: 0.5" if trim else "",
            density1=", density: 0.6" if trim else "",
            base=base,
            e0=experts["expert0"],
            e1=experts["expert1"],
        )
    )
    run_mergekit(config, tmp_path / "mergekit")
    recipe, paths = recipe_from_mergekit(config)
    experts = {n: p for n, p in paths.items() if n != recipe.models.base}
    sources = Sources(paths[recipe.models.base], experts, recipe.models.base)
    # mergekit writes MoE experts fused (the module's names), we the checkpoint's: compare them as loaded.
    ours, theirs = (
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
        for folder in (write_merged(recipe, sources, tmp_path / "ours"), tmp_path / "mergekit")
    )
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("tokenizer_source", ["base", "union"])
def test_added_tokens_same_weights_as_mergekit(tokenizer_source: str, tmp_path: Path) -> None:
    """Experts with added tokens (two and three, two of them shared) merge as mergekit's `tokenizer_source`."""
    base = tiny_model("llama", tmp_path / "base", seed=0, dtype=torch.float32)
    e0 = perturbed(base, tmp_path / "e0", seed=1, vocab=VOCAB + 2)
    e1 = perturbed(base, tmp_path / "e1", seed=2, vocab=VOCAB + 3)
    text = CONFIGS["ties"].format(base=base, e0=e0, e1=e1)
    ours_config, theirs_config = tmp_path / "ours.yml", tmp_path / "theirs.yml"
    ours_config.write_text(text)
    theirs_config.write_text(text + f"tokenizer_source: {tokenizer_source}\n")
    run_mergekit(theirs_config, tmp_path / "mergekit")
    recipe, paths = recipe_from_mergekit(ours_config)
    experts = {n: p for n, p in paths.items() if n != recipe.models.base}
    sources = Sources(paths[recipe.models.base], experts, recipe.models.base, tokenizer_source=tokenizer_source)
    assert_same_tensors(write_merged(recipe, sources, tmp_path / "ours"), tmp_path / "mergekit")
