"""Tiny synthetic Llama folders (a base and perturbed experts), built in seconds for the workers' tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = ["<pad>", "<s>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz0123456789 "]


def tiny_config(layers: int = 3, hidden: int = 32, tie: bool = False, vocab: int = 48) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def save_tokenizer(folder: Path) -> None:
    """A character-level tokenizer, so the folders look like real ones (tokenizer files to copy and load)."""
    vocab = {c: i for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)


def make_models(
    root: Path,
    n_experts: int = 2,
    config: LlamaConfig | None = None,
    dtype: torch.dtype = torch.float32,
    noise: float = 0.02,
    max_shard_size: str | None = None,
) -> tuple[Path, dict[str, Path]]:
    """Save a random base and `n_experts` experts (base + seeded Gaussian noise) under `root`."""
    config = config or tiny_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    save = {"max_shard_size": max_shard_size} if max_shard_size else {}
    base = root / "base"
    model.save_pretrained(base, **save)
    save_tokenizer(base)
    experts: dict[str, Path] = {}
    for i in range(n_experts):
        gen = torch.Generator().manual_seed(100 + i)
        expert = LlamaForCausalLM(config).to(dtype)
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), expert.named_parameters(), strict=True):
                q.copy_(p + noise * torch.randn(p.shape, generator=gen).to(dtype))
        folder = root / f"expert{i}"
        expert.save_pretrained(folder, **save)
        experts[f"expert{i}"] = folder
    return base, experts
