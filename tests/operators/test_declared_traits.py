"""An operator declares what the search space and mergekit export need: a new one is one module.

The toy operators below are registered the way an operator module registers itself, and nothing else is
edited: the search space evolves the trimming one's densities, export writes it as the mergekit method it
names, a mergekit config of the method it imports becomes it, and a recipe of the other one is refused by
export in one line per operator the recipe states.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from search.space import SearchSpace, SpaceSpec
from tests.workers.synthetic import make_models, tiny_config
from workers.mergekit_config import recipe_from_mergekit, recipe_to_mergekit
from workers.operators import OPERATORS, MergeContext, Operator, check_recipe, register
from workers.operators.base import MergekitForm, MergekitRead
from workers.operators.kernels import (
    DensitySetting,
    WeightedParams,
    per_expert,
    weighted_form,
    weighted_method,
    weighted_params,
)
from workers.recipe import OP_TRAITS, Models, OpTraits, Recipe

EXPERTS = ["e0", "e1"]
SOURCES = {"base": "b", "e0": "x", "e1": "y"}


class ToyTrimParams(WeightedParams):
    density: DensitySetting = 0.5
    normalize: bool = False


class ToyTrim(Operator):
    """Task arithmetic with each task vector scaled by its density: a trimming operator that exports as ties
    and imports a made-up mergekit method (not the same merges, which a toy need not be)."""

    name = "toy_trim"
    Params = ToyTrimParams
    traits = OpTraits(trims=True)
    mergekit_import = weighted_method("toy_merge", normalize=False, rescale=False)

    def from_mergekit(self, read: MergekitRead) -> dict[str, Any]:
        return weighted_params(read)

    def to_mergekit(self, params: ToyTrimParams, models: Models) -> MergekitForm | str:
        return weighted_form("ties", self.name, params, len(models.experts))

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: ToyTrimParams, ctx: MergeContext
    ) -> torch.Tensor:
        scales = [w * d for w, d in zip(params.weights, per_expert(params.density, len(experts)))]
        return base + params.lambda_ * sum(s * (e - base) for s, e in zip(scales, experts))


class ToyPlain(Operator):
    """An operator that declares nothing: no density genes, no mergekit form."""

    name = "toy_plain"
    Params = WeightedParams

    def merge(
        self, base: torch.Tensor, experts: list[torch.Tensor], params: WeightedParams, ctx: MergeContext
    ) -> torch.Tensor:
        return base


@pytest.fixture
def toys() -> Iterator[None]:
    for cls in (ToyTrim, ToyPlain):
        register(cls)
    yield
    for cls in (ToyTrim, ToyPlain):
        del OPERATORS[cls.name], OP_TRAITS[cls.name]


@pytest.mark.usefixtures("toys")
def test_the_space_evolves_a_declared_trim_and_export_writes_its_method() -> None:
    space = SearchSpace(SpaceSpec(op="toy_trim", granularity="layer"), 2, "base", EXPERTS, seed=3)
    assert space.has_density and space.dim == 2 * 2 * len(EXPERTS)
    lo, hi = space.bounds()
    assert lo[2:4] == [0.1, 0.1] and hi[2:4] == [1.0, 1.0]  # the density genes take the density range
    genome = [0.5, 0.7, 0.2, 0.4, 1.0, 0.1, 0.9, 0.9]
    recipe = Recipe.parse(space.decode(genome))
    check_recipe(recipe, n_source_layers=2)  # the registry accepts what the space decodes
    assert [layer.params["density"] for layer in recipe.layers] == [pytest.approx(0.3), pytest.approx(0.9)]

    text, problems = recipe_to_mergekit(recipe, SOURCES)
    assert problems == []
    doc = yaml.safe_load(text)
    assert doc["merge_method"] == "ties"
    assert doc["parameters"]["normalize"] is False
    first = doc["models"][0]["parameters"]  # per-layer gradients, after the filters for rest and head
    assert first["weight"][-1] == {"value": [0.5, 1.0]}
    assert first["density"][-1]["value"] == [pytest.approx(0.3), pytest.approx(0.9)]


@pytest.mark.usefixtures("toys")
def test_a_mergekit_config_of_the_method_an_operator_imports_becomes_that_operator(tmp_path: Path) -> None:
    base, experts = make_models(tmp_path, n_experts=2, config=tiny_config(layers=2, hidden=16))
    config = yaml.safe_dump({
        "merge_method": "toy_merge",
        "base_model": str(base),
        "models": [
            {"model": str(experts["expert0"]), "parameters": {"weight": 0.5, "density": 0.4}},
            {"model": str(experts["expert1"]), "parameters": {"weight": 1.0}},
        ],
        "parameters": {"lambda": 0.8},
    })
    recipe, sources = recipe_from_mergekit(config)
    assert sources["base"] == base
    assert {spec.op for spec in recipe.ops()} == {"toy_trim"}
    assert recipe.rest.params == {"weights": [0.5, 1.0], "density": [0.4, 1.0], "lambda": 0.8, "normalize": False}
    check_recipe(recipe, n_source_layers=2)


@pytest.mark.usefixtures("toys")
def test_an_operator_without_traits_gets_weights_only_and_export_refuses_it_in_one_line() -> None:
    space = SearchSpace(SpaceSpec(op="toy_plain"), 2, "base", EXPERTS)
    assert not space.has_density and space.dim == len(EXPERTS)
    recipe = Recipe.parse(space.decode(space.center()))
    text, problems = recipe_to_mergekit(recipe, SOURCES)
    assert text == ""
    assert problems == [f"{label}: op 'toy_plain' has no mergekit merge method" for label in
                        ("layers[0]", "layers[1]", "rest")]


def test_every_trimming_operator_accepts_the_genes_the_space_decodes() -> None:
    """`trims` promises weights and a density per layer: each operator that declares it takes them."""
    trimming = [name for name, op in OPERATORS.items() if op.traits.trims]
    assert {"ties", "dare", "dare_ties", "magnitude_prune", "della", "breadcrumbs"} <= set(trimming)
    for name in trimming:
        space = SearchSpace(SpaceSpec(op=name, density_range=(0.4, 0.6)), 2, "base", EXPERTS)
        assert space.has_density
        check_recipe(Recipe.parse(space.decode(space.center())))


def test_the_space_reads_traits_without_the_caller_importing_operators() -> None:
    """search/ imports only workers.recipe: importing the space costs no torch, and the first look-up of a
    trait loads the registry, so the genome never depends on who imported what first."""
    script = (
        "import sys\nfrom search.space import SearchSpace, SpaceSpec\n"
        "light = 'torch' not in sys.modules\n"
        "space = SearchSpace(SpaceSpec(op='ties'), 2, 'base', ['a', 'b'])\n"
        "print(light, space.has_density, space.dim)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=os.environ.copy())
    assert out.stdout.split() == ["True", "True", "4"]


def test_an_operator_that_imports_a_mergekit_method_must_read_its_parameters() -> None:
    class HalfDeclared(Operator):
        name = "half_declared"
        mergekit_import = weighted_method("half_merge", normalize=False, rescale=False)

        def merge(self, base: torch.Tensor, experts: list[torch.Tensor], params: Any, ctx: MergeContext) -> torch.Tensor:
            return base.clone()

    with pytest.raises(RuntimeError, match="'half_declared' declares a mergekit_import but no from_mergekit"):
        register(HalfDeclared)
    assert "half_declared" not in OPERATORS
