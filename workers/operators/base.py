"""The operator contract and registry: one operator per module, registered by name.

An operator turns the K expert tensors of one name (and the base's) into the merged tensor, in float32. It
is tensor-local (ALGORITHMS.md §1.2), so the materializer can stream and cache freely. Adding an operator is
one module under `workers/operators/` with a `@register`ed subclass, and one test: the class also declares what
a search space needs (`traits`) and how mergekit says it (`to_mergekit`, `mergekit_import`), so nothing else
lists operators (docs/operators.md, "Adding an operator").
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from workers.recipe import (
    FORMAT,
    MASK_DRAWS,
    OP_TRAITS,
    MaskDraw,
    Models,
    OpSpec,
    OpTraits,
    Recipe,
    RecipeError,
)


class OpParams(BaseModel):
    """Base of every operator's parameters: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SourceMemo:
    """Tensors kept across candidates up to a byte budget: what derives from the sources alone (task vectors,
    magnitude ranks and counts, DARE masks), or the sources themselves.

    A resident worker merges the same sources recipe after recipe; what does not depend on the recipe is
    computed once and kept (the resident model keeps its float32 source tensors in one too). It is filled up
    to `max_bytes` and then left as is, each further value computed each time: every candidate reads the
    tensors in the same order, a scan that a least-recently-used cache smaller than its contents would evict
    entirely before any reuse. Kept tensors are shared between candidates, so never modify them.
    """

    def __init__(self, max_bytes: int, reserved: int = 0) -> None:
        """`reserved` bytes of the budget are kept for summaries (`summary=True`): a few KB per tensor that a
        kernel wants for every tensor of the model (a task vector's magnitude counts), for which the bulk
        values, kept in tensor order until the rest of the budget is spent, would otherwise leave no room."""
        self.max_bytes = max_bytes
        self.reserved = min(reserved, max_bytes)
        self.bytes = 0
        self.summary_bytes = 0
        self._tensors: dict[tuple[Any, ...], torch.Tensor] = {}

    def keeps(self, key: tuple[Any, ...], nbytes: int, summary: bool = False) -> bool:
        """Whether `key` is kept, or a value of `nbytes` for it would be."""
        return key in self._tensors or self._fits(nbytes, summary)

    def get(
        self, key: tuple[Any, ...], compute: Callable[[], torch.Tensor], summary: bool = False
    ) -> torch.Tensor:
        tensor = self._tensors.get(key)
        if tensor is None:
            tensor = compute()
            if self._fits(tensor.nbytes, summary):
                self._tensors[key] = tensor
                self.bytes += tensor.nbytes
                self.summary_bytes += tensor.nbytes if summary else 0
        return tensor

    def _fits(self, nbytes: int, summary: bool) -> bool:
        if summary:
            return self.summary_bytes + nbytes <= self.reserved
        return self.bytes - self.summary_bytes + nbytes <= self.max_bytes - self.reserved


@dataclass(frozen=True)
class MergeContext:
    """What an operator may know besides the tensors: their name, the models' names, the recipe seed, the
    worker's memo of source-derived tensors (None: compute everything, as a one-off merge does), and how the
    recipe's format draws random masks, and where the result may go."""

    tensor: str
    experts: tuple[str, ...]
    base_name: str
    seed: int
    memo: SourceMemo | None = None
    mask_draw: MaskDraw = MASK_DRAWS[FORMAT]
    destination: torch.Tensor | None = None
    """The resident model's parameter the merged tensor is written to (base's shape and device, the model's
    dtype: a value written to a bfloat16 one is rounded as a float32 result cast to it), or None."""

    def remember(
        self,
        kind: str,
        compute: Callable[[], torch.Tensor],
        model_index: int | None = None,
        summary: bool = False,
    ) -> torch.Tensor:
        """`compute()`, or its kept value for (kind, base, expert `model_index` or all experts, tensor); the
        kept value is shared, so never modify it. `summary`: kept in the memo's reserved share."""
        if self.memo is None:
            return compute()
        return self.memo.get(self._key(kind, model_index), compute, summary)

    def remembers(
        self, kind: str, nbytes: int, model_index: int | None = None, summary: bool = False
    ) -> bool:
        """Whether the memo keeps (kind, ...), or would keep a value of `nbytes` for it: a kernel with a
        cheaper way to compute what it cannot keep takes that way instead."""
        return self.memo is not None and self.memo.keeps(self._key(kind, model_index), nbytes, summary)

    def _key(self, kind: str, model_index: int | None) -> tuple[Any, ...]:
        models = self.experts if model_index is None else (self.experts[model_index],)
        return (kind, self.base_name, models, self.tensor)

    def task_vectors(self, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        """[K, *shape]: δ_i = θ_i − θ_base stacked in expert order (as mergekit stacks them), so that a kernel
        treats all experts in one operation; its rows are the per-expert vectors. Do not modify it."""
        return self.remember("task_vectors", lambda: torch.stack(experts).to(torch.float32).sub_(base))

    def result(self, base: torch.Tensor) -> torch.Tensor:
        """The tensor that an operator writing each entry once (as `kernels.added_to_base` does) writes its
        result into: the `destination` when there is one, so that merged values go straight into the model (a
        new tensor and a copy of it were two passes over memory, a third of a PSO candidate at 2 GB float32),
        else a new float32 tensor of base's shape."""
        if self.destination is not None:
            return self.destination
        return torch.empty(base.shape, dtype=torch.float32, device=base.device)

    def stream_seed(self, model_index: int) -> int:
        """The seed of (recipe seed, tensor name, model index)'s random stream, in [0, 2^63): order-free, safe
        under Ray. Both mask draws (`mask_draw`) seed from it."""
        digest = hashlib.sha256(f"{self.seed}:{self.tensor}:{model_index}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)

    def generator(self, model_index: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A torch generator seeded with `stream_seed(model_index)`."""
        gen = torch.Generator(device=device)
        gen.manual_seed(self.stream_seed(model_index))
        return gen


class MergekitForm(NamedTuple):
    """An operator as a mergekit config says it: the merge method, its shared parameters and each expert's."""

    method: str
    shared: dict[str, Any]
    per_model: list[dict[str, Any]]


@dataclass(frozen=True)
class MergekitMethod:
    """The mergekit merge method that an operator imports: its name, and its shared and per-model parameters
    with mergekit 0.1.5's defaults (None: required). Values are read as numbers, except where the default is
    a boolean."""

    name: str
    shared: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, Any] = field(default_factory=dict)
    uses_base: bool = True
    """False: it merges only the models it lists (the recipe's base is then the base_model or the first)."""


@dataclass(frozen=True)
class MergekitRead:
    """What a mergekit config gives one tensor (its name): the method's shared values, the per-model ones in
    the recipe's expert order (a model the slice does not list: weight 0, density 1), the models the slice
    lists and the recipe's name of the base."""

    tensor: str
    shared: dict[str, Any]
    per_model: dict[str, list[Any]]
    experts: list[str]
    present: list[str]
    base: str


class Operator(ABC):
    """Subclass, set `name` and `Params`, implement `merge`, and decorate with `@register`."""

    name: ClassVar[str]
    Params: ClassVar[type[OpParams]] = OpParams
    traits: ClassVar[OpTraits] = OpTraits()
    """What a search space needs to know of this operator (readable from `search/` via `workers.recipe`)."""
    stored_inputs: ClassVar[bool] = False
    """`merge` takes the sources as stored (bfloat16 too) and casts them a run of rows at a time
    (`kernels.difference`); other operators get float32 copies of whole tensors (for a bfloat16 model, 4 GB
    of new float32 tensors per 2 GB candidate: a fifth of its time)."""
    random_masks: ClassVar[bool] = False
    """It draws masks from the recipe seed (DARE-style): mergekit, drawing its own, merges other entries."""

    mergekit_import: ClassVar[MergekitMethod | None] = None
    """The mergekit merge method that means this operator, which `recipe_from_mergekit` reads as it."""

    def from_mergekit(self, read: MergekitRead) -> dict[str, Any] | str:
        """This operator's parameters for its `mergekit_import`, or one line saying why the config cannot
        be this operator. `register` requires an operator with a `mergekit_import` to override it."""
        return f"op '{self.name}' imports no mergekit merge method"

    def to_mergekit(self, params: Any, models: Models) -> MergekitForm | str:
        """This operator with `params` as a mergekit merge method, or one line saying why mergekit cannot
        express it."""
        return f"op '{self.name}' has no mergekit merge method"

    def check(self, params: OpParams, n_experts: int, models: tuple[str, ...]) -> None:
        """Refuse parameters that are valid alone but not for this recipe (e.g. one weight per expert)."""
        weights = getattr(params, "weights", None)
        if weights is not None and len(weights) != n_experts:
            raise ValueError(f"weights has {len(weights)} entries for {n_experts} experts")

    def norm_average(self, params: OpParams, n_experts: int) -> OpSpec | None:
        """The operator for a norm tensor under a recipe's `norms: average` (None: this one, unchanged).

        Norms are a few scale factors per layer: sparsifying, rescaling or extrapolating them (λ) does harm
        that averaging avoids. The default is the weighted mean of the experts with this operator's `weights`
        (equal weights if it has none), as θ_base + Σ w_i δ_i / Σ w_i so that weights summing to about 0 fall
        back to θ_base + Σ w_i δ_i (§1.4's divisor rule) instead of a vanishing norm.
        """
        weights = getattr(params, "weights", None) or [1.0] * n_experts
        return OpSpec(op="task_arithmetic", params={"weights": list(weights), "normalize": True})

    @abstractmethod
    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: Any, ctx: MergeContext
    ) -> torch.Tensor:
        """Return the merged tensor (base's shape; float32, or `ctx.result`'s tensor, or a source returned
        as is). Inputs are float32 (as stored with `stored_inputs`) and must not be modified."""
        ...


OPERATORS: dict[str, Operator] = {}


def register(cls: type[Operator]) -> type[Operator]:
    if cls.name in OPERATORS:
        raise RuntimeError(f"operator '{cls.name}' registered twice")
    if cls.mergekit_import is not None and cls.from_mergekit is Operator.from_mergekit:
        raise RuntimeError(f"operator '{cls.name}' declares a mergekit_import but no from_mergekit")
    OPERATORS[cls.name] = cls()
    OP_TRAITS[cls.name] = cls.traits
    return cls


def resolve(spec: OpSpec, n_experts: int, models: tuple[str, ...]) -> tuple[Operator, OpParams]:
    """Look up an op and validate its parameters; RecipeError names the op and parameter."""
    op = OPERATORS.get(spec.op)
    if op is None:
        raise RecipeError(f"unknown op '{spec.op}' (known: {', '.join(sorted(OPERATORS))})")
    try:
        params = op.Params.model_validate(spec.params)
        op.check(params, n_experts, models)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "params"
        raise RecipeError(f"op '{spec.op}' parameter '{where}': {err['msg']}") from None
    except ValueError as exc:
        raise RecipeError(f"op '{spec.op}': {exc}") from None
    return op, params


def check_recipe(recipe: Recipe, n_source_layers: int | None = None) -> None:
    """Validate every op and parameter of a recipe, and its layer indices against the source depth."""
    models = (recipe.models.base, *recipe.models.experts)
    for spec in recipe.ops():
        resolve(spec, len(recipe.models.experts), models)
    if n_source_layers is not None:
        for i, layer in enumerate(recipe.layers):
            if layer.from_ >= n_source_layers:
                raise RecipeError(
                    f"recipe layers[{i}].from = {layer.from_}, but the sources have {n_source_layers} layers"
                )
