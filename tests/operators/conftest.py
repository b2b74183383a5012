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


def run_norm_average(
    op: str, params: dict[str, Any], base: torch.Tensor, experts: list[torch.Tensor]
) -> torch.Tensor | None:
    """Merge one norm tensor as a recipe with `norms: average` does (None: the op merges it itself)."""
    names = tuple(f"e{i}" for i in range(len(experts)))
    models = ("base", *names)
    operator, parsed = resolve(OpSpec(op=op, params=params), len(experts), models)
    spec = operator.norm_average(parsed, len(experts))
    if spec is None:
        return None
    averaged, averaged_params = resolve(spec, len(experts), models)
    ctx = MergeContext("model.layers.0.input_layernorm.weight", names, "base", 0)
    return averaged.merge(base, experts, averaged_params, ctx)


@pytest.fixture
def merge() -> MergeFn:
    return run_op


def t(values: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SAMPLE_PARAMS: dict[str, dict[str, Any]] = {
    # Valid parameters of every operator for two experts named e0 and e1.
    "copy": {"model": "e1"},
    "linear": {"weights": [0.5, 0.5]},
    "task_arithmetic": {"weights": [0.5, 0.5]},
    "ties": {"weights": [0.5, 0.5]},
    "dare": {"weights": [0.5, 0.5]},
    "dare_ties": {"weights": [0.5, 0.5]},
    "magnitude_prune": {"weights": [0.5, 0.5]},
    "dare_affine": {"dense": [0.5, 0.1], "sparse": [0.2, 0.3]},
    "cabs": {"weights": [0.5, 0.5], "n": 2, "m": 8},
    "lore": {"post": "ties"},
    "ram": {},
    "ram_plus": {},
    "slerp": {"t": 0.3, "models": ["e0", "e1"]},
    "breadcrumbs": {"weights": [0.5, 0.5], "elect": True},
    "della": {"weights": [0.5, 0.5]},
}
