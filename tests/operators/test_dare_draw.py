"""Format /2's DARE keep-mask draw (`pcg64dxsm_u16`): its bits from their definition, any run drawn alone equal to
the whole draw, its keep rate, and both formats' masks through the materializer."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.workers.synthetic import make_models
from workers.materialize import ResidentModel, merged_tensors
from workers.operators import MergeContext, kernels, resolve
from workers.operators.base import SourceMemo
from workers.recipe import MaskDraw, OpSpec, Recipe
from workers.sources import Sources

PCG_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645  # numpy's seeding steps the state with it
DXSM_MULTIPLIER = 0xDA942042E4DD58B5  # the 64-bit "cheap" multiplier of PCG64DXSM's steps and output
MASK64, MASK128 = (1 << 64) - 1, (1 << 128) - 1


def stream_seed(seed: int, tensor: str, model_index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{tensor}:{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def reference_u16(seed: int, count: int) -> list[int]:
    """The draw's definition written out: PCG64DXSM (128-bit LCG, DXSM output of the state before each step),
    seeded as numpy seeds it from SeedSequence's four 64-bit words (state high, low; increment high, low),
    each output read as four 16-bit draws, least significant first."""
    words = [int(w) for w in np.random.SeedSequence(seed).generate_state(4, np.uint64)]
    increment = ((((words[2] << 64) | words[3]) << 1) | 1) & MASK128
    state = (increment + ((words[0] << 64) | words[1])) & MASK128
    state = (state * PCG_MULTIPLIER + increment) & MASK128
    draws: list[int] = []
    while len(draws) < count:
        high, low = state >> 64, (state & MASK64) | 1
        high ^= high >> 32
        high = (high * DXSM_MULTIPLIER) & MASK64
        high ^= high >> 48
        output = (high * low) & MASK64
        state = (state * DXSM_MULTIPLIER + increment) & MASK128
        draws += [(output >> (16 * k)) & 0xFFFF for k in range(4)]
    return draws[:count]


def reference_mask(seed: int, tensor: str, model_index: int, shape: tuple[int, ...], density: float) -> torch.Tensor:
    draws = reference_u16(stream_seed(seed, tensor, model_index), int(np.prod(shape)))
    return (torch.tensor(draws) < round(density * 65536)).reshape(shape)


def pcg_context(seed: int = 7, tensor: str = "t") -> MergeContext:
    return MergeContext(tensor, ("a", "b"), "base", seed, mask_draw="pcg64dxsm_u16")


@pytest.fixture(params=[kernels.DRAW_CHUNK, 7])
def draw_chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Masks drawn in one step, and in many steps of 7 draws (not a multiple of 4)."""
    monkeypatch.setattr(kernels, "DRAW_CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("density", [0.2, 0.5, 0.93])
def test_the_draw_is_its_definition(density: float, draw_chunk: int) -> None:
    """Known answer from an independent implementation: the mask of (seed, tensor, model) is PCG64DXSM's 16-bit
    draws below round(density · 2^16), seeded by the sha256 of 'seed:tensor:model'."""
    shape = (13, 29)
    ctx = pcg_context(seed=123, tensor="model.layers.2.mlp.down_proj.weight")
    mask = kernels.dare_mask(torch.Size(shape), density, ctx, 1)
    assert mask.dtype == torch.bool
    assert ctx.stream_seed(1) == stream_seed(123, "model.layers.2.mlp.down_proj.weight", 1)
    assert torch.equal(mask, reference_mask(123, "model.layers.2.mlp.down_proj.weight", 1, shape, density))


def test_any_run_of_draws_is_a_slice_of_the_whole_stream() -> None:
    """Runs drawn alone (any start, any length, starts not a multiple of 4) are slices of the whole stream."""
    whole = kernels.uniform_u16(99, 0, 4099)
    assert whole.tolist() == reference_u16(99, 4099)
    rng = np.random.default_rng(0)
    starts = [0, 1, 2, 3, 4, 5, 7, 4095, 4098, *rng.integers(0, 4099, 20).tolist()]
    for start in starts:
        for count in sorted({min(c, 4099 - start) for c in (0, 1, 3, 4, 5, 17, 4099)}):
            assert np.array_equal(kernels.uniform_u16(99, start, count), whole[start : start + count]), (start, count)


@pytest.mark.parametrize("shape", [(70, 33), (37, 5, 3), (41,), ()])
def test_masks_of_runs_of_rows_joined_are_the_whole_mask(shape: tuple[int, ...], draw_chunk: int) -> None:
    ctx = pcg_context()
    size = torch.Size(shape)
    whole = kernels.dare_mask(size, 0.3, ctx, 0)
    assert whole.shape == size
    if not shape:  # a 0-d tensor is one run
        assert torch.equal(whole, next(kernels.dare_masks(size, [...], 0.3, ctx, 0)))
        return
    cuts = [0, 1, 4, 11, 12, 30, shape[0]]  # odd run lengths: most runs start at offsets not a multiple of 4
    runs = [slice(a, b) for a, b in itertools.pairwise(cuts)]
    joined = torch.cat(list(kernels.dare_masks(size, runs, 0.3, ctx, 0)))
    assert torch.equal(joined, whole)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.77])
def test_the_keep_rate_is_the_density(density: float) -> None:
    n = 1_000_000
    kept = int(kernels.dare_mask(torch.Size([n]), density, pcg_context(), 0).sum())
    sigma = (density * (1 - density) / n) ** 0.5
    assert abs(kept / n - density) < 5 * sigma + 2**-17


def test_extreme_densities_round_to_none_or_all() -> None:
    """A keep probability is a multiple of 2^-16: density under 2^-17 keeps nothing, over 1 − 2^-17 all."""
    size = torch.Size([200_000])
    assert not kernels.dare_mask(size, 2**-18, pcg_context(), 0).any()
    assert kernels.dare_mask(size, 1 - 2**-18, pcg_context(), 0).all()


def test_masks_differ_by_seed_tensor_and_model() -> None:
    size = torch.Size([64, 64])
    mask = kernels.dare_mask(size, 0.5, pcg_context(), 0)
    others = [
        kernels.dare_mask(size, 0.5, pcg_context(seed=8), 0),
        kernels.dare_mask(size, 0.5, pcg_context(tensor="u"), 0),
        kernels.dare_mask(size, 0.5, pcg_context(), 1),
    ]
    for other in others:
        agree = float((other == mask).float().mean())
        assert 0.4 < agree < 0.6  # independent masks at density 0.5 agree on about half the entries


@pytest.mark.parametrize("mask_draw", ["torch_bernoulli", "pcg64dxsm_u16"])
def test_della_draws_as_the_recipe_format_says(mask_draw: MaskDraw, draw_chunk: int) -> None:
    """DELLA's per-entry keep probabilities p_j (here rising with j) under each draw: torch's Bernoulli (/1), or
    the 16-bit draw j below round(p_j · 2^16) (/2)."""
    n, density, epsilon = 5000, 0.5, 0.3
    delta = torch.arange(1, n + 1, dtype=torch.float32)  # one row, ranked by index
    params = {"weights": [1.0], "density": density, "epsilon": epsilon, "rescale": "none"}
    operator, parsed = resolve(OpSpec(op="della", params=params), 1, ("base", "a"))
    ctx = MergeContext("t", ("a",), "base", 3, mask_draw=mask_draw)
    kept = operator.merge(torch.zeros(n), [delta], parsed, ctx) != 0
    probs = (density - epsilon) + torch.arange(n, dtype=torch.float64) / (n - 1) * 2 * epsilon
    if mask_draw == "torch_bernoulli":
        expected = torch.bernoulli(probs.float(), generator=ctx.generator(0)).bool()
    else:
        draws = torch.tensor(reference_u16(stream_seed(3, "t", 0), n))
        expected = draws < (probs * 65536).round()
    assert torch.equal(kept, expected)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return make_models(tmp_path_factory.mktemp("zoo"))


def dare_recipe(fmt: str, density: float = 0.4, seed: int = 7) -> Recipe:
    return Recipe.parse(
        {
            "format": fmt,
            "models": {"base": "base", "experts": ["expert0", "expert1"]},
            "layers": [
                {"from": i, "op": "dare", "params": {"weights": [1.0, 0.0], "density": density}} for i in (1, 2)
            ],
            "rest": {"op": "dare", "params": {"weights": [0.5, 0.5], "density": density}},
            "seed": seed,
        }
    )


@pytest.mark.parametrize("fmt", ["mergesearch.recipe/1", "mergesearch.recipe/2"])
def test_a_recipe_s_format_decides_its_masks(fmt: str, zoo: tuple[Path, dict[str, Path]]) -> None:
    """Materialized, a DARE recipe of format /1 has the torch Bernoulli masks every /1 recipe has had, one of
    format /2 the `pcg64dxsm_u16` masks (from its definition here)."""
    density, seed = 0.4, 7
    name = "model.layers.1.mlp.up_proj.weight"
    merged = dict(merged_tensors(dare_recipe(fmt, density, seed), Sources(*zoo)))
    base, expert = (load_file(path / "model.safetensors")[name] for path in (zoo[0], zoo[1]["expert0"]))
    if fmt == "mergesearch.recipe/1":
        generator = MergeContext(name, ("expert0", "expert1"), "base", seed).generator(0)
        mask = torch.bernoulli(torch.full(base.shape, density), generator=generator).bool()
    else:
        mask = reference_mask(seed, name, 0, tuple(base.shape), density)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base + (expert - base) * mask / density)


def test_a_worker_merges_again_when_only_the_format_changes(zoo: tuple[Path, dict[str, Path]]) -> None:
    """The resident model's layer pool and rest are keyed by the format too: the same operators under the
    other format are other weights."""
    sources = Sources(*zoo)
    resident = ResidentModel(sources)
    merged = []
    for fmt in ("mergesearch.recipe/1", "mergesearch.recipe/2", "mergesearch.recipe/1"):
        recipe = dare_recipe(fmt)
        merged.append(resident.materialize(recipe).layers_merged)
        state = resident.model.state_dict()
        for name, tensor in merged_tensors(recipe, sources):
            assert torch.equal(state[name], tensor), (fmt, name)
    assert merged == [2, 2, 0]  # the /1 layers came back from the pool


@pytest.mark.parametrize("draw", ["pcg64dxsm_u16", "torch_bernoulli"])
def test_a_memo_keeps_each_mask_packed_and_gives_back_the_drawn_runs(draw: MaskDraw) -> None:
    """A worker's memo keeps a whole mask at a bit an entry; runs unpacked from it, at offsets that are not a
    multiple of 8, equal the runs drawn without a memo, and a memo without room draws them as before."""
    size, density = torch.Size([70, 33]), 0.3
    cuts = [0, 1, 4, 11, 12, 30, 70]
    runs = [slice(a, b) for a, b in itertools.pairwise(cuts)]
    plain = MergeContext("t", ("a", "b"), "base", 7, mask_draw=draw)
    drawn = list(kernels.dare_masks(size, runs, density, plain, 1))
    packed_bytes = (size.numel() + 7) // 8
    for budget, kept in ((10**6, packed_bytes), (packed_bytes - 1, 0)):
        memo = SourceMemo(budget)
        ctx = MergeContext("t", ("a", "b"), "base", 7, memo=memo, mask_draw=draw)
        for _ in range(2):  # the first call fills the memo, the second reads it
            masks = list(kernels.dare_masks(size, runs, density, ctx, 1))
            assert [m.shape for m in masks] == [m.shape for m in drawn]
            assert all(torch.equal(m, d) for m, d in zip(masks, drawn, strict=True))
        assert memo.bytes == kept
