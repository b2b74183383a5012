"""Operators that take their sources as stored (`Operator.stored_inputs`) and cast them run by run give the
bits of a merge of float32 copies, with or without a worker's memo, and written into a bfloat16 destination
(the resident model's parameter) they give that result rounded once."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from workers.operators import OPERATORS, MergeContext, resolve
from workers.operators.base import SourceMemo
from workers.recipe import OpSpec

EXPERTS = ("e0", "e1", "e2")
CASES: dict[str, dict[str, Any]] = {
    "ties": {"weights": [0.5, 0.7, 0.3], "density": 0.3},
    "magnitude_prune": {"weights": [0.5, 0.7, 0.3], "density": [0.2, 0.5, 1.0]},
    "magnitude_prune/merged": {"weights": [0.5, -0.7, 0.3], "density": 0.4, "scope": "merged"},
    "dare_affine": {"dense": [0.2, 0.0, 0.4], "sparse": [0.5, 0.3, 0.0], "density": 0.25},
    "dare_affine/l1": {"dense": [0.2, 0.1, 0.4], "sparse": [0.5, 0.3, 0.2], "rescale": "l1"},
    "copy": {"model": "e1"},
}


def test_every_operator_that_takes_stored_inputs_has_a_case() -> None:
    flagged = {name for name, op in OPERATORS.items() if op.stored_inputs}
    assert flagged == {case.split("/")[0] for case in CASES}


def sources(dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and three sparse task vectors' experts in `dtype`, of 600 rows: several runs of rows."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(600, 1000, generator=gen).to(dtype)
    experts = []
    for _ in EXPERTS:
        delta = torch.randn(600, 1000, generator=gen) * 0.01 * (torch.rand(600, 1000, generator=gen) < 0.3)
        experts.append((base.float() + delta).to(dtype))
    return base, experts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_stored_sources_merge_as_their_float32_copies(case: str, dtype: torch.dtype) -> None:
    op, params = resolve_case(case)
    base, experts = sources(dtype)
    expected = op.merge(base.float(), [e.float() for e in experts], params, context())
    memo = SourceMemo(10**9)
    for ctx in (context(), context(memo), context(memo)):  # no memo, filling it, reading it
        merged = op.merge(base, experts, params, ctx)
        assert torch.equal(merged.float(), expected), case
        destination = torch.zeros_like(base)
        written = op.merge(base, experts, params, context(memo, destination))
        assert written.dtype in (dtype, torch.float32)
        assert torch.equal(written.to(dtype), expected.to(dtype)), case
    assert memo.bytes > 0 or case == "copy"


def resolve_case(case: str) -> tuple[Any, Any]:
    return resolve(OpSpec(op=case.split("/")[0], params=CASES[case]), len(EXPERTS), ("base", *EXPERTS))


def context(memo: SourceMemo | None = None, destination: torch.Tensor | None = None) -> MergeContext:
    return MergeContext(
        "model.layers.0.mlp.up_proj.weight", EXPERTS, "base", 11, memo=memo, destination=destination
    )
