"""slerp: spherical interpolation between two models, following mergekit (§2.9).

The whole tensor is one vector: Ω is the angle between the normalised vectors, the unnormalised vectors are
interpolated, and nearly (anti)colinear vectors (|cos Ω| > 0.9995) fall back to lerp. A zero vector gives
cos Ω = 0 as in mergekit; `zero: lerp` lerps instead. t = 0 returns the first model (the base by default).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from workers.operators.base import (
    MergeContext,
    MergekitForm,
    MergekitMethod,
    MergekitRead,
    Operator,
    OpParams,
    register,
)
from workers.recipe import Models

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


class SlerpParams(OpParams):
    t: float
    models: tuple[str, str] | None = Field(
        None, description="The two endpoints; default (base, the one expert)."
    )
    zero: Literal["parity", "lerp"] = "parity"


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, zero: Literal["parity", "lerp"] = "parity"
) -> torch.Tensor:
    """mergekit's slerp of two tensors of one shape (coefficients in float64)."""
    n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    if zero == "lerp" and min(n0, n1) <= NORM_EPS:
        return torch.lerp(v0, v1, t)
    u0 = v0 / n0 if n0 > NORM_EPS else v0
    u1 = v1 / n1 if n1 > NORM_EPS else v1
    dot = float((u0 * u1).sum())
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    omega = math.acos(dot)
    s0 = math.sin((1 - t) * omega) / math.sin(omega)
    s1 = math.sin(t * omega) / math.sin(omega)
    return s0 * v0 + s1 * v1


@register
class Slerp(Operator):
    name = "slerp"
    Params = SlerpParams
    mergekit_import = MergekitMethod("slerp", {"t": None})

    def check(self, params: SlerpParams, n_experts: int, models: tuple[str, ...]) -> None:
        if params.models is None:
            if n_experts != 1:
                raise ValueError(
                    f"slerp joins exactly 2 models: with {n_experts} experts, name them in models"
                )
            return
        for name in params.models:
            if name not in models:
                raise ValueError(f"models: '{name}' is not one of {list(models)}")

    def norm_average(self, params: SlerpParams, n_experts: int) -> None:
        """Slerp neither sparsifies nor rescales; norm vectors of one base are nearly colinear, where it falls
        back to the lerp (1 − t)·θ_a + t·θ_b, the weighted mean of its two models already."""

    def from_mergekit(self, read: MergekitRead) -> dict[str, Any] | str:
        others = [m for m in read.present if m != read.base]
        if read.base not in read.present or len(others) != 1:
            return "slerp needs the base_model and exactly one other model in each slice"
        params: dict[str, Any] = {"t": read.shared["t"]}
        if len(read.experts) > 1:
            params["models"] = [read.base, others[0]]
        return params

    def to_mergekit(self, params: SlerpParams, models: Models) -> MergekitForm | str:
        if len(models.experts) != 1 or (
            params.models is not None and list(params.models) != [models.base, models.experts[0]]
        ):
            return "slerp: mergekit interpolates from the base_model to its one other model only"
        return MergekitForm("slerp", {"t": params.t}, [{}])

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: SlerpParams, ctx: MergeContext
    ) -> torch.Tensor:
        if params.models is None:
            v0, v1 = base, experts[0]
        else:
            by_name = {ctx.base_name: base, **dict(zip(ctx.experts, experts))}
            v0, v1 = by_name[params.models[0]], by_name[params.models[1]]
        return slerp(params.t, v0, v1, params.zero)
