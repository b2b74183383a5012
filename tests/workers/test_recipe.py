"""The recipe format: canonical JSON and hash (the archive's cache keys), the options added to format 1, and
format 2."""

from __future__ import annotations

from typing import Any

import pytest

from workers.operators import check_recipe
from workers.recipe import FORMAT, Recipe, RecipeError, canonical_hash

RECIPE: dict[str, Any] = {
    "models": {"base": "base", "experts": ["math", "code"]},
    "layers": [
        {"from": 0, "op": "ties", "params": {"weights": [0.6, 0.3], "density": 0.3}},
        {
            "from": 0,
            "op": "cabs",
            "params": {"weights": [0.5, 0.5], "n": 16, "m": 64, "order": [1, 0]},
            "mlp": {"op": "copy", "params": {"model": "math"}},
        },
    ],
    "rest": {"op": "linear", "params": {"weights": [0.5, 0.5]}},
    "seed": 1234,
}


def test_a_recipe_without_the_new_options_keeps_its_hash() -> None:
    # Pinned from the format before `head` and `norms` existed: the archive's cache keys must not move.
    stored = {**RECIPE, "format": "mergesearch.recipe/1"}
    recipe = Recipe.parse(stored)
    assert recipe.hash() == "a48e13f212afdc75d8748c951c76fc931db36a0352ec18f3e3a696850cd9833e"
    assert recipe.hash() == Recipe.parse({**stored, "norms": "same"}).hash()
    assert recipe.hash() == canonical_hash(stored)
    assert "head" not in recipe.to_json() and "norms" not in recipe.model_dump()


def test_new_recipes_are_format_2_and_format_1_keeps_its_draw() -> None:
    """Every recipe's JSON names its format, which fixes how its random masks are drawn: a stored /1 recipe
    keeps torch's Bernoulli draw, a new one (no format given) is /2 and draws `pcg64dxsm_u16`."""
    old, new = Recipe.parse({**RECIPE, "format": "mergesearch.recipe/1"}), Recipe.parse(RECIPE)
    assert new.format == FORMAT == "mergesearch.recipe/2"
    assert new.to_json()["format"] == FORMAT and old.to_json()["format"] == "mergesearch.recipe/1"
    assert (old.mask_draw, new.mask_draw) == ("torch_bernoulli", "pcg64dxsm_u16")
    assert old.hash() != new.hash() and Recipe.parse(new.canonical()) == new
    with pytest.raises(RecipeError, match=r"^recipe field 'format': Input should be 'mergesearch.recipe/1' or"):
        Recipe.parse({**RECIPE, "format": "mergesearch.recipe/3"})


def test_head_and_norms_are_part_of_the_recipe() -> None:
    head = {"op": "copy", "params": {"model": "code"}}
    recipe = Recipe.parse({**RECIPE, "head": head, "norms": "average"})
    assert recipe.to_json()["head"] == head and recipe.to_json()["norms"] == "average"
    assert Recipe.parse(recipe.canonical()) == recipe
    assert (
        len({recipe.hash(), Recipe.parse({**RECIPE, "head": head}).hash(), Recipe.parse(RECIPE).hash()}) == 3
    )
    assert recipe.ops()[-1].op == "copy" and recipe.head_or_rest() == recipe.head
    assert Recipe.parse(RECIPE).head_or_rest() == Recipe.parse(RECIPE).rest
    assert recipe.summary() == "ties x1, cabs x1; 2 layers; rest linear; head copy; norms average"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"norms": "mean"}, r"^recipe field 'norms': Input should be 'same' or 'average'$"),
        ({"head": {"op": "copy"}}, r"^op 'copy' parameter 'model': Field required$"),
        ({"head": {"op": "copy", "params": {"model": "chat"}}}, r"^op 'copy': model 'chat' is not one of"),
        ({"head": "ties"}, r"^recipe field 'head': "),
    ],
)
def test_bad_options_fail_with_one_line_naming_them(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        check_recipe(Recipe.parse({**RECIPE, **extra}))
    assert "\n" not in str(info.value)
