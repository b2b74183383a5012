"""The zoo: files and formats, experts that are each best on their own task, caching, atomicity, determinism."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from transformers import AutoTokenizer

import workers.zoo.build as zoo_build
from evaluators import load_task
from workers.zoo import PROFILES, TASKS, ZooError, ZooProfile, build_zoo

NAMES = ["copy", "reverse", "add", "sort"]
MICRO = ZooProfile(base_steps=4, base_lr=1e-3, base_batch=8, expert_steps=3, expert_lr=1e-3, expert_batch=8,
                   n_dev=6, n_test=6)


def record(zoo: Path) -> dict:
    return json.loads((zoo / "zoo.json").read_text())


def test_score_matrix_covers_base_and_experts_on_every_task(zoo_dir: Path) -> None:
    rec = record(zoo_dir)
    assert rec["experts"] == NAMES and rec["tasks"] == NAMES and rec["profile"] == "quick"
    assert list(rec["scores"]) == ["base", *NAMES]
    for scores in rec["scores"].values():
        assert list(scores) == NAMES
        assert all(0.0 <= s[split] <= 1.0 for s in scores.values() for split in ("dev", "test"))
    for task in NAMES:
        for split in ("dev", "test"):
            assert rec["ideal"][task][split] == max(rec["scores"][e][task][split] for e in NAMES)
    assert rec["ideal_mean"]["test"] == pytest.approx(sum(rec["ideal"][t]["test"] for t in NAMES) / len(NAMES), abs=1e-4)


def test_each_expert_is_clearly_best_on_its_own_task(zoo_dir: Path) -> None:
    scores = record(zoo_dir)["scores"]
    for task in NAMES:
        own = scores[task][task]["test"]
        rivals = [scores[m][task]["test"] for m in ["base", *NAMES] if m != task]
        assert own >= max(rivals) + 0.1, (task, own, rivals)


def test_models_are_hf_folders_of_one_architecture(zoo_dir: Path) -> None:
    folders = [zoo_dir / "base", *(zoo_dir / "experts" / n for n in NAMES)]
    shapes = []
    for folder in folders:
        assert (folder / "config.json").is_file()
        with safe_open(folder / "model.safetensors", "pt") as f:
            names = f.keys()
            shapes.append({k: tuple(f.get_slice(k).get_shape()) for k in names})
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.padding_side == "left"
        assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert tokenizer.decode(tokenizer("rev:abc=")["input_ids"], skip_special_tokens=True) == "rev:abc="
    assert all(s == shapes[0] for s in shapes) and len(shapes[0]) == 4 * 9 + 3


def test_task_splits_load_and_are_disjoint(zoo_dir: Path) -> None:
    for name in NAMES:
        task = load_task(name, zoo_dir / "tasks" / name)
        assert len(task.dev) == PROFILES["quick"].n_dev and len(task.test) == PROFILES["quick"].n_test
        dev, test = {e.prompt for e in task.dev}, {e.prompt for e in task.test}
        assert len(dev) == len(task.dev) and not dev & test


def test_job_file_has_the_documented_shape(zoo_dir: Path) -> None:
    job = yaml.safe_load((zoo_dir / "job.yaml").read_text())
    assert job == {
        "name": "zoo",
        "models": {"base": "base", "experts": {n: f"experts/{n}" for n in NAMES}},
        "tasks": [
            {"name": n, "path": f"tasks/{n}", "metric": "exact_match", "max_new_tokens": TASKS[n].max_new_tokens}
            for n in NAMES
        ],
        "evaluation": {"backend": "hf", "device": "cpu", "dev_subset": 64, "batch_size": 64, "seed": 0},
        "search": {"strategy": "random", "budget": 16, "seed": 0},
        "workers": {"count": 2},
    }
    assert TASKS["copy"].max_new_tokens == 12
    for entry in job["models"]["experts"].values():
        assert (zoo_dir / entry / "model.safetensors").is_file()


def test_a_second_build_is_cached(zoo_dir: Path) -> None:
    messages: list[str] = []
    started = time.perf_counter()
    rec = build_zoo(zoo_dir, profile="quick", progress=lambda m, f: messages.append(m))
    assert time.perf_counter() - started < 5 and rec == record(zoo_dir)
    assert any("cached" in m for m in messages)


def test_unknown_experts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="experts"):
        build_zoo(tmp_path / "z", experts=("copy", "poetry"))
    with pytest.raises(ZooError, match="profile 'huge'"):
        build_zoo(tmp_path / "z", profile="huge")  # type: ignore[arg-type]


@pytest.fixture
def micro_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick profile shrunk to a few steps: the same code path, in seconds."""
    monkeypatch.setitem(zoo_build.PROFILES, "quick", MICRO)


def weights(zoo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(zoo)): p.read_bytes() for p in sorted(zoo.rglob("model.safetensors"))}


def test_same_seed_same_bytes_and_another_seed_replaces_the_zoo(tmp_path: Path, micro_profile: None) -> None:
    first = build_zoo(tmp_path / "a", seed=3, experts=("copy", "add"), profile="quick")
    build_zoo(tmp_path / "b", seed=3, experts=("copy", "add"), profile="quick")
    assert len(weights(tmp_path / "a")) == 3 and weights(tmp_path / "a") == weights(tmp_path / "b")
    assert (tmp_path / "a" / "tasks" / "add" / "dev.jsonl").read_bytes() == (
        tmp_path / "b" / "tasks" / "add" / "dev.jsonl").read_bytes()
    second = build_zoo(tmp_path / "b", seed=4, experts=("copy", "add"), profile="quick")
    assert (first["seed"], second["seed"], record(tmp_path / "b")["seed"]) == (3, 4, 4)
    assert weights(tmp_path / "a")["base/model.safetensors"] != weights(tmp_path / "b")["base/model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == [".a.lock", ".b.lock", "a", "b"]


def test_a_failed_build_leaves_nothing_that_looks_complete(
    tmp_path: Path, micro_profile: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo_build, "_train", crash)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "z", experts=("copy",), profile="quick")
    assert sorted(os.listdir(tmp_path)) == [".z.lock"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MERGESEARCH_SLOW"), reason="two real quick builds; set MERGESEARCH_SLOW=1")
def test_quick_profile_is_byte_reproducible(tmp_path: Path, zoo_dir: Path) -> None:
    build_zoo(tmp_path / "again", profile="quick")
    assert weights(tmp_path / "again") == weights(zoo_dir)


def test_a_failure_during_expert_training_stops_the_other_experts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(zoo_build.PROFILES, "quick", dataclasses.replace(MICRO, expert_steps=5000))

    def broken_score(*args: object, **kwargs: object) -> None:
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(zoo_build, "_score", broken_score)
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="scoring failed"):
        build_zoo(tmp_path / "z", experts=("copy", "add"), profile="quick")
    assert time.perf_counter() - started < 25
    assert sorted(os.listdir(tmp_path)) == [".z.lock"]
