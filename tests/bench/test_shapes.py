"""Each benchmark's JSON on a tiny size (seconds): the keys the README's tables are read from, with sane values.
The benchmarks themselves run by hand (`python -m tests.bench.NAME`), never in the test suite."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from evaluators.tasks import Example, Task
from tests.bench import candidate_cost, eval_throughput, merge_memory
from tests.bench.merge_memory import Width
from workers.zoo.tokenizer import char_tokenizer

TINY = Width(hidden=64, intermediate=128, vocab=256)


def test_candidate_cost_reports_every_path_and_the_worker_memory(tmp_path: Path) -> None:
    args = argparse.Namespace(
        dir=tmp_path, ops="ties,magnitude_prune,dare_affine,copy", candidates=1, cache_gb=0.001, threads=1,
        mergekit=False, round_trip_ops=None, expert_nonzero=1.0,
    )  # fmt: skip
    result = candidate_cost.bench(0.0001, "bfloat16", args, width=TINY)  # one layer
    assert result["bench"] == "candidate_cost" and result["layers"] == 1 and result["dtype"] == "bfloat16"
    worker = result["worker"]
    assert worker["peak_anon_gb"] > 0 and worker["peak_anon_per_model_size"] > 1
    assert 0 < worker["memo_gb"] <= 0.001 * 1.074 and result["cache_gb"] == 0.001  # the budget is in GiB
    for op in args.ops.split(","):
        entry = result[op]
        assert entry["in_place_s"] > 0 and entry["first_in_place_s"] > 0
        assert entry["in_place_cpu_s"] > 0 and entry["first_in_place_cpu_s"] > 0 and entry["ours_cpu_s"] > 0
        assert entry["ours_s"] >= entry["ours_write_s"] > 0
        assert entry["ours_over_in_place"] == round(entry["ours_s"] / entry["in_place_s"], 1)
        assert "mergekit_s" not in entry
    # The models are kept for the next run, under a name that says what they are.
    assert [p.name for p in tmp_path.iterdir()] == ["llama-64x1-bfloat16-nz1.0"]  # dense experts: --expert-nonzero 1


def test_mergekit_stand_ins_are_mergekit_methods() -> None:
    sources_like = ["expert0", "expert1", "expert2"]
    for op, method in [("magnitude_prune", "ties"), ("dare_affine", "dare_linear"), ("ties", "ties")]:
        recipe = candidate_cost.random_recipe(random.Random(0), op, sources_like, 3)
        stand_in, named = candidate_cost.mergekit_stand_in(recipe)
        assert named == method
        assert {layer.spec_for("mlp").op for layer in stand_in.layers} == {
            {"ties": "ties", "magnitude_prune": "ties", "dare_affine": "dare"}[op]
        }


def test_merge_memory_reports_peaks_and_wall_time(tmp_path: Path) -> None:
    result = merge_memory.bench_size(0.0001, tmp_path, timeout=300, width=TINY, mergekit=False)
    assert result["bench"] == "merge_memory" and result["layers"] == 1
    ours = result["ours"]
    assert ours["peak_vmrss_gb"] >= ours["peak_anon_gb"] > 0 and ours["wall_s"] > 0 and ours["cpu_s"] > 0
    assert result["mergekit"] is None


def test_synthetic_experts_are_sparse_where_asked(tmp_path: Path) -> None:
    folders = merge_memory.write_models(tmp_path, 1, torch.bfloat16, nonzero=0.1, width=TINY)
    [file] = folders["base"].glob("*.safetensors")
    base, expert = load_file(file), load_file(folders["expert0"] / file.name)
    changed = sum(int((expert[n] != t).sum()) for n, t in base.items())
    changed /= sum(t.numel() for t in base.values())
    assert base["lm_head.weight"].dtype == torch.bfloat16 and 0.05 < changed < 0.15


def test_eval_throughput_compares_with_model_generate() -> None:
    tokenizer = char_tokenizer("abcdefghijklmnopqrstuvwxyz =+")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    dev = [Example(id=i, prompt=p, target="") for i, p in enumerate(["abc=", "hello=", "x=", "zz top="])]
    task = Task(name="t", kind="generate", dev=dev, test=[], max_new_tokens=6, stop=("q",))
    result = eval_throughput.measure(model, tokenizer, [task], 4, "cpu", (1, 4))
    assert result["bench"] == "eval_throughput"
    # Both paths generate the same greedy text, so they count the same tokens.
    assert result["generated_tokens"] == result["transformers_generated_tokens"] > 0
    for key in ("1", "4"):
        assert result["tokens_per_second"][key] > 0 and result["transformers_tokens_per_second"][key] > 0
        assert result["ratio"][key] > 0
