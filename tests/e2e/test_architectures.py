"""`mergesearch run` as a user runs it on architectures beyond Llama: a 4-candidate search on Ray, then the best
model pulled, loaded by transformers and generating; and a worker that cannot start ends the job with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.e2e.test_run_pull import cli
from tests.workers.architectures import ARCHITECTURES, VOCAB, family, perturbed
from tests.workers.test_architectures import write_task


def write_job(root: Path, base: Path, experts: dict[str, Path], **extra: object) -> Path:
    job = {
        "name": "arch",
        "models": {"base": str(base), "experts": {n: str(p) for n, p in experts.items()}},
        "tasks": [{"name": "swap", "path": str(write_task(root / "swap")), "max_new_tokens": 3}],
        "evaluation": {"dev_subset": 4, "batch_size": 8},
        "search": {"strategy": "random", "budget": 4, "seed": 0},
        "space": {"op": "ties"},
        "workers": {"count": 1},
        "references": False,
        **extra,
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


DEFAULT_RUN = [("gpt_neox", "union"), ("mixtral", "base")]
"""Two architectures in the default run (half a minute each); every other one with `-m slow`."""


@pytest.mark.parametrize(
    ("arch", "tokenizer_source"),
    [
        *DEFAULT_RUN,
        *(
            pytest.param(arch, "base", marks=pytest.mark.slow)
            for arch in ARCHITECTURES
            if arch not in dict(DEFAULT_RUN)
        ),
    ],
)
def test_search_and_pull(arch: str, tokenizer_source: str, tmp_path: Path) -> None:
    """expert1 adds two tokens: the union keeps them (in the pulled tokenizer too), the base's vocabulary not."""
    base, experts = family(arch, tmp_path / "models")
    experts["expert1"] = perturbed(base, tmp_path / "models" / "added", seed=9, vocab=VOCAB + 2)
    job = write_job(tmp_path, base, experts)
    spec = yaml.safe_load(job.read_text())
    spec["models"]["tokenizer_source"] = tokenizer_source
    job.write_text(yaml.safe_dump(spec))
    proc = cli("run", str(job), "--db", f"sqlite:///{tmp_path / 'a.db'}", "--out", str(tmp_path / "best"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["evaluations"] == 4 and report["best"] is not None
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "best", dtype=torch.bfloat16)
    assert model.config.model_type == arch
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "best")
    vocab = VOCAB + 2 if tokenizer_source == "union" else VOCAB
    assert len(tokenizer) == model.config.vocab_size == vocab
    ids = tokenizer("ab:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_a_worker_that_cannot_start_ends_the_job_with_one_line(tmp_path: Path) -> None:
    """Every model has a tensor the architecture has no parameter for: the models agree with each other (so
    the job is accepted), but the worker's resident model refuses it; the CLI prints that one line."""
    base, experts = family("llama", tmp_path / "models")
    for folder in (base, *experts.values()):
        tensors = load_file(folder / "model.safetensors")
        tensors["model.extra.weight"] = torch.zeros(4, dtype=torch.bfloat16)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    proc = cli("run", str(write_job(tmp_path, base, experts)), "--db", f"sqlite:///{tmp_path / 'a.db'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "model 'base'" in lines[0] and "model.extra.weight" in lines[0] and "LlamaForCausalLM" in lines[0]
