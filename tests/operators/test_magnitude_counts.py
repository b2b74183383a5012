"""A worker's memo keeps each task vector's magnitude counts: the k-th value searches they narrow to one slot
(or skip, when a trim keeps every nonzero entry) must find the exact rule of the full search, and the counts
must fit in the memo's reserved share whatever the bulk of the budget holds."""

from __future__ import annotations

import pytest
import torch

from workers.operators import MergeContext, kernels, resolve
from workers.operators.base import SourceMemo
from workers.operators.kernels import MAGNITUDE_COUNTS_BYTES, TopK, magnitude_counts, top_k_mask
from workers.recipe import OpSpec


def bit_floats(*patterns: int) -> torch.Tensor:
    return torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)


def adversarial(name: str) -> torch.Tensor:
    """Tensors of 600 entries where a slot-narrowed search could go wrong."""
    gen = torch.Generator().manual_seed(len(name))
    if name == "zeros":  # ±0 only
        x = torch.zeros(600)
        x[::3] = -0.0
        return x
    x = torch.randn(600, generator=gen) * (torch.rand(600, generator=gen) < 0.2)
    x[::5] = -0.0
    if name == "ties":  # many equal magnitudes, both signs, at what becomes the k-th value
        x[1::4] = 0.25
        x[3::8] = -0.25
    elif name == "slot_edges":  # values on and just below slot boundaries, denormals, the largest float
        edges = [0x3F800000, 0x3F7FFFFF, 0x3F900000, 0x3F8FFFFF, 0x00000001, 0x000FFFFF, 0x00100000]
        edges += [0x7F7FFFFF, 0x7F700000, 0x00800000]
        values = bit_floats(*edges)
        x[: 4 * len(edges)] = torch.cat([values, -values, values, values])
    elif name == "bfloat16":  # the task vector of bfloat16 sources: few distinct magnitudes, ties everywhere
        base = torch.randn(600, generator=gen).to(torch.bfloat16)
        expert = (base.float() + 0.01 * torch.randn(600, generator=gen) * (x != 0)).to(torch.bfloat16)
        x = expert.float() - base.float()
    return x.reshape(20, 30)


NAMES = ["zeros", "sparse", "ties", "slot_edges", "bfloat16"]


@pytest.mark.parametrize("name", NAMES)
def test_counts_find_the_rule_of_the_full_search(name: str) -> None:
    x = adversarial(name)
    counts = magnitude_counts(x)
    nonzero = int((x != 0).sum())
    assert int(counts.sum()) == x.numel() and int(counts[0]) == x.numel() - nonzero
    for k in sorted({0, 1, 2, 7, nonzero - 1, nonzero, nonzero + 1, 150, 333, 599, 600}):
        if k < 0:
            continue
        for zeros in (True, False):
            exact, narrowed = TopK.of(x, k, zeros), TopK.of(x, k, zeros, counts)
            assert float(narrowed.value) == float(exact.value) and narrowed.last == exact.last, (k, zeros)
        if 0 < k <= nonzero:  # the rule's k-th value is the sorted k-th magnitude
            assert float(TopK.of(x, k, counts=counts).value) == float(x.abs().flatten().sort().values[-k])
        assert torch.equal(TopK.of(x, k, counts=counts).mask(x), top_k_mask(x, k))


def test_counts_are_of_float32_only() -> None:
    with pytest.raises(TypeError, match="float32"):
        magnitude_counts(torch.zeros(4, dtype=torch.bfloat16))


def test_summaries_fit_in_the_reserved_share_whatever_the_bulk_holds() -> None:
    memo = SourceMemo(1000, reserved=100)
    assert memo.get(("bulk", 1), lambda: torch.zeros(225)).nbytes == 900  # the bulk's whole share
    assert memo.keeps(("bulk", 1), 900) and not memo.keeps(("bulk", 2), 4)
    assert memo.keeps(("summary", 1), 100, summary=True) and not memo.keeps(("summary", 1), 104, summary=True)
    memo.get(("summary", 1), lambda: torch.zeros(25), summary=True)
    assert memo.bytes == 1000 and memo.summary_bytes == 100
    assert not memo.keeps(("summary", 2), 4, summary=True)
    computed = memo.get(("summary", 2), lambda: torch.ones(1), summary=True)  # computed, not kept
    assert float(computed) == 1.0 and memo.bytes == 1000


@pytest.mark.parametrize(
    ("op", "params"),
    [
        ("ties", {"weights": [0.5, 0.3, 0.9], "density": [0.3, 0.05, 0.8]}),
        ("ties", {"weights": [0.5, -0.3, 0.9], "density": 0.6, "normalize": False, "lambda": 1.3}),
        ("magnitude_prune", {"weights": [0.5, 0.3, 0.9], "density": [0.2, 0.1, 0.45]}),
        ("breadcrumbs", {"weights": [0.5, 0.3, 0.9], "density": 0.2, "gamma": 0.05}),
    ],
)
def test_merges_with_kept_counts_equal_the_whole_tensor_merge(
    op: str, params: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept counts in every memo state (ranks, task vectors only, counts only): the whole-tensor merge's bits,
    trims that keep every nonzero entry (densities 0.8 and 0.6 of about 40% nonzeros) included."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=gen)
    experts = []
    for _ in range(3):  # 30% Gaussian entries, plus repeated magnitudes: under half nonzero
        delta = torch.randn(64, 48, generator=gen) * (torch.rand(64, 48, generator=gen) < 0.3)
        delta.view(-1)[::13] = 0.25
        delta.view(-1)[5::17] = -0.25
        experts.append(base + delta)
    names = ("e0", "e1", "e2")
    operator, parsed = resolve(OpSpec(op=op, params=params), 3, ("base", *names))
    whole = operator.merge(base, experts, parsed, MergeContext("t", names, "base", 0))
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 48 * 4 * 5)  # runs of 5 rows, the last one shorter
    reserved = 3 * MAGNITUDE_COUNTS_BYTES
    for bulk in (1 << 30, 3 * base.nbytes, 0):  # ranks kept; task vectors only; counts only
        memo = SourceMemo(bulk + reserved, reserved)
        for _ in range(2):  # the memo's first candidate fills it, the second reads it
            worker = operator.merge(base, experts, parsed, MergeContext("t", names, "base", 0, memo))
            assert torch.equal(worker, whole)
        assert memo.summary_bytes == (reserved if op != "breadcrumbs" or bulk < 1 << 30 else 0)


@pytest.mark.parametrize("kept", [299, 300, 301])
def test_a_trim_is_skipped_only_when_it_keeps_every_nonzero_entry(kept: int) -> None:
    """300 nonzero entries: a trim to 299 must still drop one (the memo's counts say when none drop)."""
    gen = torch.Generator().manual_seed(kept)
    base = torch.randn(64, 48, generator=gen)
    delta = torch.zeros(64 * 48)
    delta[torch.randperm(64 * 48, generator=gen)[:300]] = torch.rand(300, generator=gen) + 0.5
    expert = base + delta.reshape(64, 48)
    assert int((expert - base != 0).sum()) == 300
    density = (kept + 0.5) / base.numel()
    operator, parsed = resolve(
        OpSpec(op="ties", params={"weights": [1.0], "density": density}), 1, ("base", "e")
    )
    memo = SourceMemo(MAGNITUDE_COUNTS_BYTES, MAGNITUDE_COUNTS_BYTES)  # counts only
    merged = [
        operator.merge(base, [expert], parsed, MergeContext("t", ("e",), "base", 0, m)) for m in (None, memo)
    ]
    assert memo.summary_bytes == MAGNITUDE_COUNTS_BYTES
    assert torch.equal(merged[0], merged[1])
    assert int((merged[1] != base).sum()) == min(kept, 300)
