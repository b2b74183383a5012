from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from workers.operators import MergeContext, resolve
from workers.recipe import OpSpec

MergeFn = Callable[..., torch.Tensor]


def run_op(
    op: str,
    params: dict[str, Any],
    base: torch.Tensor,
    experts: list[torch.Tensor],
    *,
    tensor: str = "model.layers.0.mlp.up_proj.weight",
    seed: int = 0,
) -> torch.Tensor:
    """Validate the params through the registry, as a recipe would, and merge one tensor."""
    names = tuple(f"e{i}" for i in range(len(experts)))
    operator, parsed = resolve(OpSpec(op=op, params=params), len(experts), ("base", *names))
    return operator.merge(base, experts, parsed, MergeContext(tensor, names, "base", seed))


@pytest.fixture
def merge() -> MergeFn:
    return run_op


def t(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)
