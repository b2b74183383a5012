"""The streaming materializer: merged_tensors, the resident model (in place, depth changes, layer cache) and
write_merged, checked against each other and against transformers loading the written folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.workers.synthetic import make_models, tiny_config
from workers.materialize import (
    CACHE_CAP,
    CACHE_FLOOR,
    HeapTrim,
    MaterializeError,
    ResidentModel,
    default_cache_bytes,
    merged_tensors,
    write_merged,
)
from workers.recipe import Recipe, RecipeError
from workers.sources import SourceError, Sources

EXPERTS = ["expert0", "expert1"]
PROMPT = torch.tensor([[1, 5, 6, 7, 8]])


def recipe(froms: list[int], op: str = "task_arithmetic", **extra: Any) -> Recipe:
    """Layers from `froms`, each with `op` (weights differ per layer), attention overridden on layer 0."""
    params = {"copy": lambda i: {"model": "expert0"}}.get(op, lambda i: {"weights": [0.3 + 0.1 * i, 0.6]})
    layers: list[dict[str, Any]] = [{"from": f, "op": op, "params": params(i)} for i, f in enumerate(froms)]
    if layers and op != "copy":
        layers[0]["attn"] = {"op": "copy", "params": {"model": "expert1"}}
    data = {
        "models": {"base": "base", "experts": EXPERTS},
        "layers": layers,
        "rest": {"op": "linear", "params": {"weights": [0.25, 0.75]}},
        "seed": 7,
        **extra,
    }
    return Recipe.parse(data)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return make_models(tmp_path_factory.mktemp("zoo"), dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def sources(zoo: tuple[Path, dict[str, Path]]) -> Sources:
    return Sources(*zoo)


@pytest.fixture(scope="module")
def resident(sources: Sources) -> ResidentModel:
    return ResidentModel(sources, cache_layers=2)


def from_disk(r: Recipe, sources: Sources, folder: Path, **kwargs: Any) -> torch.nn.Module:
    write_merged(r, sources, folder, **kwargs)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def test_merged_tensors_follow_the_recipe(sources: Sources, zoo: tuple[Path, dict[str, Path]]) -> None:
    base, experts = zoo
    raw = {m: load_file(p / "model.safetensors") for m, p in {"base": base, **experts}.items()}
    out = dict(merged_tensors(recipe([2, 0]), sources))
    assert len(out) == 3 + 2 * 9  # embed, norm, head + 9 tensors per layer
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    # output layer 1 = source layer 0, task arithmetic with weights [0.4, 0.6], λ = 1, in float32
    name = "model.layers.0.mlp.up_proj.weight"
    b, e0, e1 = (raw[m][name].float() for m in ("base", "expert0", "expert1"))
    expected = b + 0.4 * (e0 - b) + 0.6 * (e1 - b)
    # computed in float32, then rounded once to bfloat16 (8 significant bits)
    torch.testing.assert_close(
        out["model.layers.1.mlp.up_proj.weight"].float(), expected, rtol=2**-8, atol=1e-7
    )
    # output layer 0 = source layer 2; its attention is overridden by a copy of expert1, its MLP is not
    assert torch.equal(
        out["model.layers.0.self_attn.q_proj.weight"],
        raw["expert1"]["model.layers.2.self_attn.q_proj.weight"],
    )
    assert not torch.equal(
        out["model.layers.0.mlp.up_proj.weight"], raw["expert1"]["model.layers.2.mlp.up_proj.weight"]
    )
    head = 0.25 * raw["expert0"]["lm_head.weight"].float() + 0.75 * raw["expert1"]["lm_head.weight"].float()
    torch.testing.assert_close(out["lm_head.weight"].float(), head, rtol=2**-8, atol=1e-7)


def test_in_place_equals_disk_round_trip(resident: ResidentModel, sources: Sources, tmp_path: Path) -> None:
    r = recipe([0, 1, 2])
    resident.materialize(r)
    disk = from_disk(r, sources, tmp_path / "merged")
    assert_same_weights(resident.model, disk)
    with torch.no_grad():
        assert torch.equal(resident.model(PROMPT).logits, disk(PROMPT).logits)


MEMO_OPS = {
    "ties": lambda d: {"weights": [0.5, 0.7], "density": d},
    "magnitude_prune": lambda d: {"weights": [0.5, 0.7], "density": [d, 1 - d]},
    "breadcrumbs": lambda d: {"weights": [0.5, 0.7], "density": d, "gamma": 0.05},
    "dare_ties": lambda d: {"weights": [0.5, 0.7], "density": d},
    "ram_plus": lambda d: {"epsilon": d / 100},
    "dare_affine": lambda d: {"dense": [d, 0.2], "sparse": [0.5, d], "density": 0.3},
}


@pytest.mark.parametrize("op", sorted(MEMO_OPS))
def test_memo_leaves_results_unchanged(op: str, sources: Sources) -> None:
    """The resident worker's memo (task vectors, magnitude ranks) is filled by the first candidate and read by
    the next ones, at other densities: every candidate must equal the one-off merge bit for bit."""
    resident = ResidentModel(sources)
    for density in (0.3, 0.1, 0.75):
        r = Recipe.parse(
            {
                "models": {"base": "base", "experts": EXPERTS},
                "layers": [{"from": i, "op": op, "params": MEMO_OPS[op](density)} for i in range(3)],
                "rest": {"op": op, "params": MEMO_OPS[op](density)},
            }
        )
        resident.materialize(r)
        state = resident.model.state_dict()
        for name, tensor in merged_tensors(r, sources):
            assert torch.equal(state[name], tensor), (op, density, name)
    assert resident.memo.bytes > 0


def test_a_zero_cache_budget_keeps_nothing(sources: Sources) -> None:
    resident = ResidentModel(sources, source_cache_bytes=0)
    r = recipe([0, 1, 2])
    resident.materialize(r)
    assert resident.memo.bytes == 0 and resident.source_cache.bytes == 0
    state = resident.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in merged_tensors(r, sources))


def test_the_budget_bounds_spare_layers_and_keeps_sources_as_stored(sources: Sources) -> None:
    """`source_cache_bytes` bounds the pooled layers beyond those in use (a search that changes every layer
    would otherwise hold two models), and the source cache keeps bfloat16 sources in bfloat16."""
    layer_bytes = sum(t.nbytes for t in ResidentModel(sources, cache_layers=0)._pool[0].params.values())
    resident = ResidentModel(sources, source_cache_bytes=layer_bytes + 1)
    assert resident.cache_layers == 1
    assert ResidentModel(sources).cache_layers == sources.num_layers  # 256 MiB hold the tiny model's layers
    for seed in (7, 8):  # every layer changes: one spare layer kept, not three
        resident.materialize(recipe([0, 1, 2], seed=seed))
    assert len(resident._pool) == 3 + 1
    cached = list(resident.source_cache._tensors.values())
    assert cached and all(t.dtype == torch.bfloat16 for t in cached)


def test_the_default_budget_is_a_quarter_of_the_model_within_its_bounds(sources: Sources) -> None:
    """Unset, `cache_gb` scales with the model (so that a CPU worker's peak stays within 2.5 × the model from
    1 GB up), within [256 MiB, 1 GiB]; the resident model's stores follow it."""
    gib = 1024**3
    assert [default_cache_bytes(int(g * gib)) for g in (0.001, 1, 2, 3, 8)] == [
        CACHE_FLOOR, CACHE_FLOOR, gib // 2, 3 * gib // 4, CACHE_CAP
    ]
    resident = ResidentModel(sources)
    assert resident.memo.max_bytes == resident.source_cache.max_bytes == CACHE_FLOOR  # the tiny model


def test_heap_trim_hands_pages_back_only_past_the_slack(sources: Sources) -> None:
    """A worker trims glibc's heap inside a candidate once its anonymous memory grew by more than the slack
    since the last trim, and never while it stays within it."""
    heap = HeapTrim(slack=16 * 1024**2)
    if not heap.enabled:
        pytest.skip("needs glibc's malloc_trim and /proc/self/statm")
    heap.check()
    assert heap.trims == 0
    kept = torch.ones(8 * 1024**2)  # 32 MiB of touched pages: past the slack
    heap.check()
    assert heap.trims == 1
    heap.check()  # what is kept is the new level
    assert heap.trims == 1 and kept.sum() > 0
    resident = ResidentModel(sources)
    resident.materialize(recipe([0, 1, 2]))
    assert resident.heap.trims == 1  # the tiny model grows by less than the slack: only the final trim


@pytest.mark.parametrize("froms", [[0, 2], [0, 1, 1, 2, 2]], ids=["skip", "repeat"])
def test_depth_change_generates_like_disk(
    resident: ResidentModel, sources: Sources, tmp_path: Path, froms
) -> None:
    r = recipe(froms)
    stats = resident.materialize(r)
    model = resident.model
    assert stats.depth == len(model.model.layers) == model.config.num_hidden_layers == len(froms)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(len(froms)))
    disk = from_disk(r, sources, tmp_path / "merged")
    assert disk.config.num_hidden_layers == len(froms)
    assert_same_weights(model, disk)
    cached = model.generate(PROMPT, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(PROMPT, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, PROMPT.shape[1] + 8)
    assert torch.equal(cached, uncached)  # a wrong layer_idx would mix layers' KV caches
    assert torch.equal(cached, disk.generate(PROMPT, max_new_tokens=8, do_sample=False))


def test_layer_cache_reuses_and_stays_correct(sources: Sources) -> None:
    resident = ResidentModel(sources, cache_layers=1)
    a, b = recipe([0, 1, 2]), recipe([2, 2, 0, 1], op="copy")
    first = resident.materialize(a)
    assert (first.layers_merged, first.cache_hits) == (3, 0)
    again = resident.materialize(a)
    assert (again.layers_merged, again.cache_hits) == (0, 3)
    repeat = resident.materialize(b)  # layers 0 and 1 hold the same layer: merged once, copied once
    assert (repeat.layers_merged, repeat.cache_hits) == (3, 1)
    back = resident.materialize(a)  # one of a's layers survived in the LRU (cache_layers=1), two are merged
    assert (back.layers_merged, back.cache_hits) == (2, 1)
    fresh = ResidentModel(sources, cache_layers=0)
    fresh.materialize(a)
    assert_same_weights(resident.model, fresh.model)


def test_sparsity_counts_unchanged_layer_entries(resident: ResidentModel, sources: Sources) -> None:
    def layers(weights: list[float], attn_model: str) -> Recipe:
        spec = {
            "op": "task_arithmetic",
            "params": {"weights": weights},
            "attn": {"op": "copy", "params": {"model": attn_model}},
        }
        return Recipe.parse(
            {
                "models": {"base": "base", "experts": EXPERTS},
                "layers": [{"from": i, **spec} for i in range(3)],
                "rest": {"op": "copy", "params": {"model": "expert0"}},
            }
        )

    assert resident.materialize(layers([0.0, 0.0], "base")).sparsity == 1.0
    stats = resident.materialize(layers([0.0, 0.0], "expert0"))
    base = {n: sources.load("base", n).to(torch.bfloat16) for n in sources.tensor_names()}
    own = resident.model.state_dict()
    layer_names = [n for n in base if sources.layer_of(n)]
    expected = sum(int((own[n] == base[n]).sum()) for n in layer_names) / sum(
        base[n].numel() for n in layer_names
    )
    assert 0.0 < stats.sparsity < 1.0
    assert stats.sparsity == pytest.approx(expected)


def test_tied_embeddings_merged_once(tmp_path: Path) -> None:
    src = Sources(*make_models(tmp_path / "zoo", config=tiny_config(tie=True)))
    r = recipe([1, 0])
    resident = ResidentModel(src)
    resident.materialize(r)
    assert resident.model.lm_head.weight.data_ptr() == resident.model.model.embed_tokens.weight.data_ptr()
    write_merged(r, src, tmp_path / "merged")
    assert "lm_head.weight" not in load_file(tmp_path / "merged" / "model.safetensors")
    disk = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(resident.model(PROMPT).logits, disk(PROMPT).logits)


def test_head_merges_the_final_norm_and_lm_head(
    sources: Sources, zoo: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    base, experts = zoo
    raw = {m: load_file(p / "model.safetensors") for m, p in {"base": base, **experts}.items()}
    out = dict(merged_tensors(recipe([0, 1], head={"op": "copy", "params": {"model": "expert1"}}), sources))
    for name in ("model.norm.weight", "lm_head.weight"):
        assert torch.equal(out[name], raw["expert1"][name]), name
    without = dict(merged_tensors(recipe([0, 1]), sources))  # rest (linear) keeps the embeddings
    assert torch.equal(out["model.embed_tokens.weight"], without["model.embed_tokens.weight"])
    # Tied embeddings: lm_head is the embedding, merged once by rest; head covers the final norm only.
    tied = Sources(*make_models(tmp_path / "tied", config=tiny_config(tie=True)))
    tied_out = dict(merged_tensors(recipe([0], head={"op": "copy", "params": {"model": "base"}}), tied))
    assert "lm_head.weight" not in tied_out
    assert torch.equal(tied_out["model.norm.weight"], tied.load("base", "model.norm.weight"))
    assert not torch.equal(
        tied_out["model.embed_tokens.weight"], tied.load("base", "model.embed_tokens.weight")
    )


def test_norms_average_merges_every_norm_as_the_weighted_mean(sources: Sources) -> None:
    ties = {"weights": [0.6, 0.2], "density": 0.3, "lambda": 1.5}
    spec = {"op": "ties", "params": ties}
    data = {
        "models": {"base": "base", "experts": EXPERTS},
        "layers": [{"from": i, **spec} for i in range(3)],
        "rest": spec,
    }
    same = dict(merged_tensors(Recipe.parse(data), sources))
    averaged = dict(merged_tensors(Recipe.parse({**data, "norms": "average"}), sources))
    norms = [n for n in sources.tensor_names() if sources.module_class(n) == "norm"]
    assert len(norms) == 2 * 3 + 1  # two per layer and the final norm
    for name in sources.tensor_names():
        if name in norms:
            b, e0, e1 = (sources.load(m, name) for m in ("base", *EXPERTS))
            expected = b + (0.6 * (e0 - b) + 0.2 * (e1 - b)) / 0.8  # Σ w_i θ_i / Σ w_i, no trim, no λ
            torch.testing.assert_close(averaged[name].float(), expected, rtol=2**-8, atol=1e-7)
            assert not torch.equal(averaged[name], same[name])
        else:
            assert torch.equal(averaged[name], same[name]), name


def test_resident_merges_again_when_head_or_norms_change(sources: Sources) -> None:
    resident = ResidentModel(sources)
    plain = recipe([0, 1, 2])
    variants = [
        recipe([0, 1, 2], head={"op": "copy", "params": {"model": "expert0"}}),
        recipe([0, 1, 2], head={"op": "copy", "params": {"model": "expert0"}}, norms="average"),
        plain,
    ]
    resident.materialize(plain)
    merged = []
    for r in variants:
        merged.append(resident.materialize(r).layers_merged)
        state = resident.model.state_dict()
        for name, tensor in merged_tensors(r, sources):
            assert torch.equal(state[name], tensor), name
    # A head changes no layer; norms change every layer's norms; plain's layers are still in the pool.
    assert merged == [0, 3, 0]


def test_sharded_output_with_index_loads(sources: Sources, resident: ResidentModel, tmp_path: Path) -> None:
    r = recipe([1, 2, 0])
    seen: list[tuple[int, int]] = []
    disk = from_disk(
        r, sources, tmp_path / "merged", shard_size=8 * 1024, progress=lambda d, t: seen.append((d, t))
    )
    files = sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors"))
    assert len(files) > 2 and files[0].startswith("model-00001-of-")
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    assert {"tokenizer.json", "generation_config.json", "config.json"} <= {
        p.name for p in (tmp_path / "merged").iterdir()
    }
    assert seen[-1] == (len(sources.tensor_names()), len(sources.tensor_names())) and len(seen) == seen[-1][1]
    resident.materialize(r)
    assert_same_weights(resident.model, disk)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"rest": {"op": "nope"}}, RecipeError, r"^unknown op 'nope'"),
        (
            {"rest": {"op": "linear", "params": {"weights": [1, 1], "alpha": 2}}},
            RecipeError,
            r"^op 'linear' parameter 'alpha'",
        ),
        (
            {"rest": {"op": "linear", "params": {"weights": [1]}}},
            RecipeError,
            r"^op 'linear': weights has 1 entries for 2 experts$",
        ),
        (
            {"models": {"base": "base", "experts": ["expert0", "chat"]}},
            RecipeError,
            r"^recipe models.experts: 'chat' is not among",
        ),
        (
            {"layers": [{"from": 3, "op": "copy", "params": {"model": "base"}}]},
            RecipeError,
            r"^recipe layers\[0\]\.from = 3",
        ),
    ],
    ids=["unknown-op", "unknown-param", "weights", "unknown-model", "layer-range"],
)
def test_bad_recipe_is_refused_before_work(
    sources: Sources, resident: ResidentModel, tmp_path: Path, change, error, pattern
) -> None:
    bad = Recipe.parse({**recipe([0]).to_json(), **change})
    with pytest.raises(error, match=pattern):
        merged_tensors(bad, sources)  # raises on the call, before any tensor is asked for
    with pytest.raises(error, match=pattern):
        resident.materialize(bad)
    with pytest.raises(error, match=pattern):
        write_merged(bad, sources, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_nan_output_and_nan_source_leave_no_folder(zoo: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    base, experts = zoo
    src = Sources(base, experts)
    huge = Recipe.parse(
        {
            **recipe([0]).to_json(),
            "rest": {"op": "task_arithmetic", "params": {"weights": [1e38, 1e38], "lambda": 1e10}},
        }
    )
    with pytest.raises(
        MaterializeError, match=r"^tensor 'lm_head.weight': op 'task_arithmetic' produced NaN or Inf$"
    ):
        write_merged(huge, src, tmp_path / "out", shard_size=1024)
    assert list(tmp_path.iterdir()) == []

    poisoned = shutil.copytree(experts["expert1"], tmp_path / "nan")
    tensors = load_file(poisoned / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight"][1, 1] = float("inf")
    save_file(tensors, poisoned / "model.safetensors", metadata={"format": "pt"})
    src = Sources(base, {"expert0": experts["expert0"], "expert1": poisoned})
    pattern = r"^model 'expert1': tensor 'model.layers.2.mlp.down_proj.weight' contains NaN or Inf$"
    with pytest.raises(SourceError, match=pattern):
        write_merged(recipe([0, 1, 2]), src, tmp_path / "out", shard_size=1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]
    with pytest.raises(SourceError, match=pattern):
        ResidentModel(src).materialize(recipe([2]))


def test_refuses_a_non_empty_output(sources: Sources, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out"):
        write_merged(recipe([0]), sources, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_failure_half_way_leaves_no_stale_layers(sources: Sources) -> None:
    resident = ResidentModel(sources)
    good = recipe([0, 1, 2])
    resident.materialize(good)
    broken = recipe([0, 1, 2]).to_json()
    broken["layers"][2] = {
        "from": 2,
        "op": "task_arithmetic",
        "params": {"weights": [1e38, 1e38], "lambda": 1e10},
    }
    with pytest.raises(MaterializeError, match=r"^tensor 'model.layers.2\."):
        resident.materialize(Recipe.parse(broken))
    other = recipe([2, 1, 0])
    resident.materialize(other)
    fresh = ResidentModel(sources)
    fresh.materialize(other)
    assert_same_weights(resident.model, fresh.model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu(sources: Sources, tmp_path: Path) -> None:
    r = recipe([0, 2, 2])
    cpu, gpu = ResidentModel(sources), ResidentModel(sources, device="cuda")
    cpu.materialize(r)
    gpu.materialize(r)
    assert gpu.model.model.embed_tokens.weight.is_cuda
    assert_same_weights(cpu.model, gpu.model.to("cpu"))
    write_merged(r, sources, tmp_path / "cpu")
    write_merged(r, sources, tmp_path / "gpu", device="cuda")
    ours, theirs = (
        load_file(tmp_path / "cpu" / "model.safetensors"),
        load_file(tmp_path / "gpu" / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)
