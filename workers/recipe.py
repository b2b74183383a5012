"""The recipe: the unit of work between a search and the workers.

A recipe is plain, versioned JSON. Its canonical JSON hash is the candidate's cache key, and it is complete:
the same recipe materializes the same weights on any machine (random operators draw from `seed`). This module
holds the structure only; operator parameters are checked against the operator registry by
`workers.operators.check_recipe`, so that `search/` can build recipes without importing tensors. What a search
must know of an operator (`OpTraits`) is declared by the operator's module and read here.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

RecipeFormat = Literal["mergesearch.recipe/1", "mergesearch.recipe/2"]
"""The recipe formats this version reads. A stored recipe names its format, so it keeps its weights."""
FORMAT: RecipeFormat = "mergesearch.recipe/2"
"""The format of new recipes."""

MaskDraw = Literal["torch_bernoulli", "pcg64dxsm_u16"]
"""How random operators (DARE, DELLA) draw their keep-masks from the recipe seed: `torch_bernoulli`, torch's
Bernoulli draw from a per-(tensor, model) generator in flat order (format /1); `pcg64dxsm_u16`, a 16-bit uniform
per entry from a counter-based numpy PCG64DXSM stream compared with the keep probability (format /2, about 10x
faster, and any run of a tensor's entries can be drawn alone)."""
MASK_DRAWS: dict[RecipeFormat, MaskDraw] = {
    "mergesearch.recipe/1": "torch_bernoulli",
    "mergesearch.recipe/2": "pcg64dxsm_u16",
}


class RecipeError(ValueError):
    """A recipe that cannot be materialized; the message names the field, op or parameter."""


@dataclass(frozen=True)
class OpTraits:
    """What a search space needs to know of an operator, declared with the operator (`Operator.traits`).

    `search/` imports only this module, never the operators (torch): `workers.operators.register` records
    each operator's traits in `OP_TRAITS`, and `op_traits` reads them.
    """

    trims: bool = False
    """It merges per-expert `weights` and a `density` (the kept fraction of each task vector), which a search
    space evolves per expert beside the weights."""


OP_TRAITS: dict[str, OpTraits] = {}
"""Operator name → traits, filled as the operator modules register."""


def op_traits(op: str) -> OpTraits:
    """An operator's traits; none for an unknown op, which `workers.operators.resolve` refuses where recipes
    are checked. The first look-up imports the operator registry if nothing has yet, so that the answer never
    depends on import order."""
    if op not in OP_TRAITS:
        importlib.import_module("workers.operators")  # registers every operator module
    return OP_TRAITS.get(op, OpTraits())


class OpSpec(BaseModel):
    """One operator with its parameters, applied tensor by tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str
    params: dict[str, Any] = Field(default_factory=dict)

    def weighted(self, experts: int) -> OpSpec:
        """This operator with `weights` 1 per expert where it names none (a pool entry, as RMM's; a copy
        takes no weights)."""
        if self.op == "copy":
            return self
        return OpSpec(op=self.op, params={"weights": [1.0] * experts, **self.params})


class LayerSpec(BaseModel):
    """One output decoder layer: built from source layer `from`, with optional per-module overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: int = Field(alias="from", ge=0)
    op: str
    params: dict[str, Any] = Field(default_factory=dict)
    attn: OpSpec | None = None
    mlp: OpSpec | None = None

    def spec_for(self, module: str) -> OpSpec:
        """The operator for a module class ('attn', 'mlp' or anything else, e.g. norms)."""
        override = {"attn": self.attn, "mlp": self.mlp}.get(module)
        return override or OpSpec(op=self.op, params=self.params)

    def key(self) -> str:
        """Hash of this layer's recipe: the worker's layer-cache key (with the recipe's models and seed)."""
        return canonical_hash(self.model_dump(by_alias=True, exclude_none=True))


class Models(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str
    experts: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> Models:
        names = [self.base, *self.experts]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be distinct, got {names}")
        return self


NormsPolicy = Literal["same", "average"]
"""How 1-D norm tensors merge: with their layer's (or rest's, head's) operator, or as its weighted mean."""


class Recipe(BaseModel):
    """A complete merge: which source layer feeds each output layer, and with which operator.

    `rest` merges the tensors outside the decoder layers; `head`, when given, takes the ones after them (the
    final norm and an untied lm_head), which mergekit filters or slices and an RMM carrier may set apart from
    the embeddings. `norms: average` merges every norm tensor as its operator's weighted mean.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: RecipeFormat = FORMAT
    models: Models
    layers: list[LayerSpec] = Field(min_length=1)
    rest: OpSpec
    head: OpSpec | None = None
    norms: NormsPolicy = "same"
    seed: int = 0

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int) -> int:
        if not 0 <= v < 2**63:
            raise ValueError("seed must be in [0, 2**63)")
        return v

    @model_serializer(mode="wrap")
    def _omit_unset_options(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Fields added after the format's first release are left out at their default, so that a recipe
        that does not use them keeps its canonical JSON and hash (the archive's cache keys)."""
        data = handler(self)
        if self.head is None:
            data.pop("head", None)
        if self.norms == "same":
            data.pop("norms", None)
        return data

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @property
    def mask_draw(self) -> MaskDraw:
        """How this recipe's random operators draw their masks (fixed by its format)."""
        return MASK_DRAWS[self.format]

    def head_or_rest(self) -> OpSpec:
        """The operator of the tensors after the decoder layers: `head`, or `rest` without one."""
        return self.head or self.rest

    def canonical(self) -> str:
        return canonical_json(self.to_json())

    def hash(self) -> str:
        """The candidate cache key: sha256 of the canonical JSON."""
        return canonical_hash(self.to_json())

    def ops(self) -> list[OpSpec]:
        """Every operator the recipe uses (layers, per-module overrides, rest, head), in order."""
        out: list[OpSpec] = []
        for layer in self.layers:
            out.append(OpSpec(op=layer.op, params=layer.params))
            out.extend(s for s in (layer.attn, layer.mlp) if s is not None)
        out.append(self.rest)
        if self.head is not None:
            out.append(self.head)
        return out

    def summary(self) -> str:
        """A short human summary of the operators, e.g. 'ties x4; 4 layers; rest linear'."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.op] = counts.get(layer.op, 0) + 1
        body = ", ".join(f"{op} x{n}" for op, n in counts.items())
        head = f"; head {self.head.op}" if self.head is not None else ""
        norms = "; norms average" if self.norms == "average" else ""
        return f"{body}; {len(self.layers)} layers; rest {self.rest.op}{head}{norms}"

    @classmethod
    def parse(cls, data: dict[str, Any] | str) -> Recipe:
        """Parse JSON (text or dict), raising RecipeError with one line naming the bad field."""
        try:
            return cls.model_validate_json(data) if isinstance(data, str) else cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "recipe"
            raise RecipeError(f"recipe field '{where}': {err['msg']}") from None


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()
