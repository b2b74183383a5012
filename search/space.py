"""The search space: how a flat genome of floats decodes into a recipe.

The genome is laid out like mergekit-evolve's (ALGORITHMS.md §7): one group per layer (or one global group),
and per group, per module set, one weight per expert plus, for operators that trim, one density per expert.
Every strategy shares this decoding, so their candidates are directly comparable.

The default space is unnormalised task arithmetic, one global weight per expert in [0, 1.2]: θ_base + Σ w_i δ_i.
Each weight is its expert's own scale, so the space holds the base (all 0), every expert (one-hot 1), the
uniform average (all 1/K) and task arithmetic at any λ; on the test zoo this 4-D space already reaches the
ceiling of weight merging. Per-layer (`granularity: layer`) and per-module (`modules: true`) genes are options.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.recipe import FORMAT, RecipeFormat, op_traits


class SpaceSpec(BaseModel):
    """The job file's `space` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str = "task_arithmetic"
    granularity: Literal["layer", "global"] = "global"
    modules: bool = False
    """Separate genes for attention and MLP within a layer (mergekit-evolve's filters)."""
    weight_range: tuple[float, float] = (0.0, 1.2)
    density: bool = True
    """Evolve a density per expert where the operator trims (its `OpTraits.trims`); otherwise use
    params['density']."""
    density_range: tuple[float, float] = (0.1, 1.0)
    params: dict[str, Any] = Field(default_factory=dict)
    """Fixed operator parameters (e.g. lambda) merged into every layer's params."""

    @model_validator(mode="after")
    def _ranges(self) -> SpaceSpec:
        for name in ("weight_range", "density_range"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ValueError(f"space.{name}: low {lo} must be below high {hi}")
        lo, hi = self.density_range
        if lo <= 0 or hi > 1:
            raise ValueError(f"space.density_range: densities must lie in (0, 1], got [{lo}, {hi}]")
        return self


class SearchSpace:
    """Decodes genomes for a given model family (depth, expert names)."""

    def __init__(
        self,
        spec: SpaceSpec,
        num_layers: int,
        base: str,
        experts: list[str],
        seed: int = 0,
        recipe_format: RecipeFormat = FORMAT,
    ) -> None:
        self.spec = spec
        self.num_layers = num_layers
        self.base = base
        self.experts = list(experts)
        self.seed = seed
        self.recipe_format = recipe_format
        """The format of the recipes it makes: a job keeps the one it started with, since the format fixes
        the random operators' masks (PSO's DARE basis must not change when a job resumes after an upgrade)."""
        self.groups = num_layers if spec.granularity == "layer" else 1
        self.module_sets: tuple[str, ...] = ("attn", "mlp") if spec.modules else ("all",)
        self.has_density = spec.density and op_traits(spec.op).trims
        k = len(self.experts)
        self.genes_per_set = k * (2 if self.has_density else 1)
        self.dim = self.groups * len(self.module_sets) * self.genes_per_set

    def coefficients_of(self, recipe: dict[str, Any]) -> list[float] | None:
        """c such that the recipe is θ_base + Σ c_i δ_i in every tensor, or None if it is not of that form.

        Recognised: one operator for every layer (in order, no per-module specs, no `head`) and `rest`:
        a copy of the base or of an expert, a normalised linear average, task arithmetic.
        """
        layers = recipe.get("layers", [])
        specs = [(layer.get("op"), layer.get("params", {})) for layer in layers]
        specs.append((recipe.get("rest", {}).get("op"), recipe.get("rest", {}).get("params", {})))
        uniform = all(s == specs[0] for s in specs) and len(layers) == self.num_layers
        plain = all(layer.get("from") == i and set(layer) <= {"from", "op", "params"} for i, layer in enumerate(layers))
        same_models = recipe.get("models", {}).get("experts") == self.experts
        if not (uniform and plain and same_models) or recipe.get("head"):
            return None
        op, params = specs[0]
        k = len(self.experts)
        if op == "copy":
            model = params.get("model")
            if model == self.base:
                return [0.0] * k
            return [float(model == e) for e in self.experts] if model in self.experts else None
        weights = [float(w) for w in params.get("weights", [1.0] * k)]
        if op == "linear" and params.get("normalize", True) and sum(weights) > 0:
            return [w / sum(weights) for w in weights]
        if op == "task_arithmetic":
            scale = float(params.get("lambda", 1.0)) / (sum(weights) if params.get("normalize") else 1.0)
            return [scale * w for w in weights]
        return None

    def genome_of(self, coefficients: list[float]) -> list[float] | None:
        """The genome whose recipe is θ_base + Σ c_i δ_i, or None if this space cannot express it exactly
        (an operator other than unnormalised task arithmetic, or a weight outside the range)."""
        params = self.spec.params
        if self.spec.op != "task_arithmetic" or params.get("normalize") or self.has_density:
            return None
        weights = [c / float(params.get("lambda", 1.0)) for c in coefficients]
        lo, hi = self.spec.weight_range
        if not all(lo <= w <= hi for w in weights):
            return None
        return weights * (self.groups * len(self.module_sets))

    def bounds(self) -> tuple[list[float], list[float]]:
        k = len(self.experts)
        lo_w, hi_w = self.spec.weight_range
        lo_d, hi_d = self.spec.density_range
        lo = [lo_w] * k + ([lo_d] * k if self.has_density else [])
        hi = [hi_w] * k + ([hi_d] * k if self.has_density else [])
        n = self.groups * len(self.module_sets)
        return lo * n, hi * n

    def clip(self, genome: list[float]) -> list[float]:
        lo, hi = self.bounds()
        return [min(max(g, a), b) for g, a, b in zip(genome, lo, hi)]

    def center(self) -> list[float]:
        """Uniform weights 1/K and, where evolved, the middle of the density range: CMA-ES's x0."""
        k = len(self.experts)
        d = sum(self.spec.density_range) / 2
        unit = [1.0 / k] * k + ([d] * k if self.has_density else [])
        return unit * (self.groups * len(self.module_sets))

    def layer_genes(self, genome: list[float], group: int, module_set: int = 0) -> list[float]:
        start = (group * len(self.module_sets) + module_set) * self.genes_per_set
        return list(genome[start : start + self.genes_per_set])

    def _params(self, genes: list[float]) -> dict[str, Any]:
        k = len(self.experts)
        params: dict[str, Any] = dict(self.spec.params)
        params["weights"] = [round(float(g), 6) for g in genes[:k]]
        if self.has_density:
            # Operators take one density; the mean over experts keeps the genome layout mergekit-like.
            params["density"] = round(float(sum(genes[k:]) / k), 6)
        return params

    def group_of(self, layer: int) -> int:
        """The layer group whose genes drive decoder layer `layer`."""
        return layer if self.groups > 1 else 0

    def assemble(self, layers: list[dict[str, Any]], rest: dict[str, Any]) -> dict[str, Any]:
        """Wrap per-layer operator specs into a complete recipe (models, rest, the run's recipe seed).

        Strategies with their own genomes (PSO, SAE) build `layers` themselves and share this envelope.
        """
        return {
            "format": self.recipe_format,
            "models": {"base": self.base, "experts": self.experts},
            "layers": layers,
            "rest": rest,
            "seed": self.seed,
        }

    def decode(self, genome: list[float]) -> dict[str, Any]:
        """The recipe JSON for a genome (clipped to the bounds first)."""
        if len(genome) != self.dim:
            raise ValueError(f"genome has {len(genome)} genes, the space has {self.dim}")
        genome = self.clip(genome)
        layers = []
        for i in range(self.num_layers):
            group = self.group_of(i)
            sets = [self._params(self.layer_genes(genome, group, s)) for s in range(len(self.module_sets))]
            layer: dict[str, Any] = {"from": i, "op": self.spec.op, "params": sets[0]}
            if self.spec.modules:
                layer["attn"] = {"op": self.spec.op, "params": sets[0]}
                layer["mlp"] = {"op": self.spec.op, "params": sets[1]}
            layers.append(layer)
        k = len(self.experts)
        mean_w = [sum(layer["params"]["weights"][j] for layer in layers) / len(layers) for j in range(k)]
        rest_params = dict(layers[0]["params"], weights=[round(w, 6) for w in mean_w])
        return self.assemble(layers, {"op": self.spec.op, "params": rest_params})
