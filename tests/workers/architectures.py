"""Tiny randomly initialised checkpoints of many decoder architectures, built from transformers' own config
classes and saved in bfloat16 as `save_pretrained` writes them (so MoE experts are stored per expert and renamed
heads keep their checkpoint names), each with a real tokenizer. Experts are made by perturbing a base's
checkpoint tensors, optionally with tokens added to (or dropped from) the vocabulary.

    base = tiny_model("mixtral", root / "base", seed=0)
    expert = perturbed(base, root / "e1", seed=1, vocab=VOCAB + 2)   # two added tokens
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from workers.zoo.tokenizer import char_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 :="
VOCAB = 4 + len(ALPHABET)
"""The base vocabulary: the tokenizer's four specials and one token per character of ALPHABET."""
HIDDEN = 32
DENSE = {"hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_position_embeddings": 128}
ATTENTION = dict(num_key_value_heads=2, **IDS)
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

CONFIGS: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama": lambda v: LlamaConfig(vocab_size=v, **DENSE, **ATTENTION),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, **DENSE, **ATTENTION),
    "qwen3": lambda v: Qwen3Config(vocab_size=v, head_dim=8, **DENSE, **ATTENTION),
    "mistral": lambda v: MistralConfig(vocab_size=v, head_dim=8, **DENSE, **ATTENTION),
    "gemma2": lambda v: Gemma2Config(
        vocab_size=v, head_dim=8, sliding_window=16, query_pre_attn_scalar=8, **DENSE, **ATTENTION
    ),
    "phi3": lambda v: Phi3Config(vocab_size=v, **DENSE, **ATTENTION),
    "gpt_neox": lambda v: GPTNeoXConfig(vocab_size=v, rotary_pct=0.5, **DENSE, **IDS),
    "mixtral": lambda v: MixtralConfig(
        vocab_size=v, num_local_experts=4, num_experts_per_tok=2, head_dim=8, **DENSE, **ATTENTION
    ),
    "qwen2_moe": lambda v: Qwen2MoeConfig(
        vocab_size=v, num_experts=4, shared_expert_intermediate_size=48, **MOE, **DENSE, **ATTENTION
    ),
    "qwen3_moe": lambda v: Qwen3MoeConfig(vocab_size=v, num_experts=4, head_dim=8, **MOE, **DENSE, **ATTENTION),
    "olmoe": lambda v: OlmoeConfig(vocab_size=v, num_experts=4, **MOE, **DENSE, **ATTENTION),
}
ARCHITECTURES = tuple(CONFIGS)
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_config(arch: str, vocab: int = VOCAB, **fields: Any) -> PretrainedConfig:
    """A tiny config of `arch` (hidden 32, 2 layers, 4 experts for MoE) with the char tokenizer's specials;
    `fields` set further config attributes (e.g. `mlp_only_layers=[1]`)."""
    config = CONFIGS[arch](vocab)
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """The char tokenizer; a vocabulary beyond VOCAB gets added tokens `<extra_0>`, `<extra_1>`, ... (as a
    fine-tune adds e.g. chat tokens), one below it drops characters from the end of the alphabet."""
    tok = char_tokenizer(ALPHABET[: max(vocab - 4, 1)])
    if vocab > VOCAB:
        tok.add_tokens([f"<extra_{i}>" for i in range(vocab - VOCAB)], special_tokens=True)
    return tok


def tiny_model(
    arch: str,
    out: Path,
    *,
    seed: int,
    vocab: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    **fields: Any,
) -> Path:
    """Save a randomly initialised `arch` model (bfloat16 unless `dtype`) and its tokenizer to `out`; returns
    `out`. `fields`: further config attributes, as `tiny_config`'s."""
    vocab = VOCAB if vocab is None else vocab
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, **fields), dtype=dtype)
    # Some architectures initialise norms or biases to constants: make every tensor vary.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    out = Path(out)
    model.save_pretrained(out)
    tokenizer(vocab).save_pretrained(out)
    return out


def perturbed(
    base: Path, out: Path, *, seed: int, noise: float = 0.02, vocab: int | None = None
) -> Path:
    """An expert of `base`: every checkpoint tensor plus seeded Gaussian noise, tensor by tensor on the
    checkpoint's own names. With `vocab`, the rows of the vocabulary tensors (embeddings, untied head) are
    cropped or extended with random rows, and the config and tokenizer follow; returns `out`."""
    base, out = Path(base), Path(out)
    shutil.copytree(base, out)
    config: dict[str, Any] = json.loads((base / "config.json").read_text())
    rows = int(config["vocab_size"])
    gen = torch.Generator().manual_seed(seed)
    for path in sorted(out.glob("*.safetensors")):
        tensors = load_file(path)
        for name, tensor in tensors.items():
            changed = tensor.float() + noise * torch.randn(tensor.shape, generator=gen)
            if vocab is not None and tensor.ndim >= 1 and tensor.shape[0] == rows:
                extra = noise * torch.randn((max(vocab - rows, 0), *tensor.shape[1:]), generator=gen)
                changed = torch.cat([changed[:vocab], extra])
            tensors[name] = changed.to(tensor.dtype).contiguous()
        save_file(tensors, path, metadata={"format": "pt"})
    if vocab is not None:
        config["vocab_size"] = vocab
        (out / "config.json").write_text(json.dumps(config, indent=2))
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (out / file).unlink(missing_ok=True)
        tokenizer(vocab).save_pretrained(out)
    return out


def family(
    arch: str, root: Path, *, experts: int = 2, seed: int = 0, **fields: Any
) -> tuple[Path, dict[str, Path]]:
    """A base of `arch` under `root/base` (`fields`: as `tiny_model`'s) and `experts` perturbed experts
    `root/expert{i}`."""
    base = tiny_model(arch, Path(root) / "base", seed=seed, **fields)
    return base, {
        f"expert{i}": perturbed(base, Path(root) / f"expert{i}", seed=seed + 1 + i) for i in range(experts)
    }
