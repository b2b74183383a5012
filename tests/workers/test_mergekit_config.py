"""mergekit YAML ⇄ recipe translation (no mergekit needed; parity itself is in test_mergekit_parity.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.workers.synthetic import make_models, tiny_config
from workers.mergekit_config import (
    MergekitConfigError,
    evaluate_setting,
    recipe_from_mergekit,
    recipe_to_mergekit,
)
from workers.recipe import OpSpec, Recipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mk")
    base, experts = make_models(root, n_experts=2, config=tiny_config(layers=3, hidden=16))
    return {"base": base, "e0": experts["expert0"], "e1": experts["expert1"]}


def yaml_for(folders: dict[str, Path], body: str) -> str:
    return body.format(**{k: str(v) for k, v in folders.items()})


def test_gradients_interpolate_like_mergekit() -> None:
    assert evaluate_setting([0, 0.5, 1], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0, 1, 0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.8], "x", 1.0) == pytest.approx(0.8)
    conds = [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.3}]
    assert evaluate_setting(conds, "model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(conds, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.3
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.0) is None
    assert evaluate_setting([True, False], "x", 0.4) is True  # non-numbers select, never interpolate


def test_ties_import_follows_mergekit_defaults(folders: dict[str, Path]) -> None:
    recipe, paths = recipe_from_mergekit(
        yaml_for(
            folders,
            """
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {e0}
    parameters: {{weight: [{{filter: layers, value: [1.0, 0.0]}}, {{value: 0.25}}], density: 0.5}}
  - model: {e1}
    parameters: {{weight: 0.5}}
parameters: {{lambda: "1e0"}}
""",
        )
    )
    assert recipe.models.experts == ["expert0", "expert1"]
    assert paths == {"base": folders["base"], "expert0": folders["e0"], "expert1": folders["e1"]}
    mid = recipe.layers[1]
    assert mid.op == "ties" and mid.attn is None and mid.mlp is None
    assert mid.params == {
        "weights": [0.5, 0.5],
        "density": [0.5, 1.0],
        "lambda": 1.0,
        "normalize": True,
        "rescale": False,
    }
    assert recipe.layers[0].params["weights"] == [1.0, 0.5]
    assert recipe.rest.params["weights"] == [0.25, 0.5]


def test_dare_import_uses_mergekit_rescale_and_no_normalize(folders: dict[str, Path]) -> None:
    recipe, _ = recipe_from_mergekit(
        yaml_for(
            folders,
            """
merge_method: dare_linear
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 1.0, density: 0.4}}
""",
        )
    )
    assert recipe.rest.op == "dare"
    assert recipe.rest.params["rescale"] == "l1" and recipe.rest.params["normalize"] is False


def test_filters_become_module_overrides(folders: dict[str, Path]) -> None:
    recipe, _ = recipe_from_mergekit(
        yaml_for(
            folders,
            """
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {e1}}}]
parameters:
  t: [{{filter: self_attn, value: [0, 1]}}, {{filter: mlp, value: 0.9}}, {{value: 0.5}}]
""",
        )
    )
    first, last = recipe.layers[0], recipe.layers[2]
    assert first.params == {"t": 0.5} and first.attn.params == {"t": 0.0} and first.mlp.params == {"t": 0.9}
    assert last.attn.params == {"t": 1.0}
    assert recipe.rest.params == {"t": 0.5}


def test_unfiltered_gradient_reaches_the_tensors_outside_the_layers_at_t0(folders: dict[str, Path]) -> None:
    # mergekit 0.1.5 reads a gradient at t = 0 for the embeddings and for the final norm and lm_head alike
    # (MergePlanner.plan_module), so both are the recipe's rest and there is no head.
    recipe, _ = recipe_from_mergekit(
        yaml_for(
            folders,
            """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: [0.2, 1.0]}}
""",
        )
    )
    assert [layer.params["weights"] for layer in recipe.layers] == [[0.2], [pytest.approx(0.6)], [1.0]]
    assert recipe.rest.params["weights"] == [0.2]
    assert recipe.head is None


def test_filters_on_the_final_norm_and_lm_head_become_the_head(folders: dict[str, Path]) -> None:
    recipe, _ = recipe_from_mergekit(
        yaml_for(
            folders,
            """
merge_method: ties
base_model: {base}
models:
  - model: {e0}
    parameters:
      weight: [{{filter: lm_head, value: 0.9}}, {{filter: model.norm, value: 0.9}}, {{value: [0.3, 0.5]}}]
      density: 0.5
""",
        )
    )
    assert recipe.rest.params["weights"] == [0.3]
    assert recipe.head is not None and recipe.head.op == "ties" and recipe.head.params["weights"] == [0.9]
    assert recipe.layers[2].params["weights"] == [0.5]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("merge_method: della\nmodels: [{{model: {e0}}}]", "merge_method 'della' is not supported"),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {e0}}}]",
            "model 'expert0' needs parameter 'weight'",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nmodels: [{{model: /nowhere/x}}]",
            "model '/nowhere/x': no Hugging Face model folder",
        ),
        ("merge_method: ties\nmodels: [{{model: {e0}, parameters: {{weight: 1}}}}]", "needs a base_model"),
        (
            "merge_method: linear\nmodels: [{{model: {e0}, parameters: {{wieght: 1}}}}]",
            "parameter 'wieght' is not used",
        ),
        (
            (
                "merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {e0}, parameters: "
                "{{weight: [{{filter: lm_head, value: 1}}, {{value: 0.5}}]}}}}]"
            ),
            "gives final norm and lm_head tensors .* different parameters",
        ),
        (
            (
                "merge_method: ties\nbase_model: {base}\n"
                "models: [{{model: {e0}, parameters: {{weight: 1, density: "
                "[{{filter: q_proj, value: 0.1}}, {{value: 0.5}}]}}}}]"
            ),
            "different parameters",
        ),
        (
            "merge_method: ties\nslices: []\nbase_model: {base}\nmodels: [{{model: {e0}}}]\nfoo: 1",
            "unknown key 'foo'",
        ),
    ],
)
def test_bad_configs_fail_with_one_line(folders: dict[str, Path], body: str, message: str) -> None:
    with pytest.raises(MergekitConfigError, match=message) as info:
        recipe_from_mergekit(yaml_for(folders, body + "\n"))
    assert "\n" not in str(info.value)


def test_export_round_trips_through_import(folders: dict[str, Path], tmp_path: Path) -> None:
    recipe = Recipe.parse(
        {
            "models": {"base": "base", "experts": ["expert0", "expert1"]},
            "layers": [
                {
                    "from": 0,
                    "op": "ties",
                    "params": {"weights": [0.3, 0.6], "density": [0.5, 0.2], "lambda": 1.0},
                },
                {
                    "from": 1,
                    "op": "ties",
                    "params": {"weights": [0.9, 0.6], "density": [0.5, 0.2], "lambda": 1.0},
                    "mlp": {
                        "op": "ties",
                        "params": {"weights": [0.1, 0.6], "density": [0.5, 0.2], "lambda": 1.0},
                    },
                },
                {
                    "from": 2,
                    "op": "ties",
                    "params": {"weights": [0.5, 0.6], "density": [0.5, 0.2], "lambda": 1.0},
                },
            ],
            "rest": {"op": "ties", "params": {"weights": [0.4, 0.4], "density": [0.5, 0.2], "lambda": 1.0}},
        }
    )
    text, problems = recipe_to_mergekit(
        recipe, {k: str(v) for k, v in zip(["base", "expert0", "expert1"], folders.values())}
    )
    assert problems == []
    assert "models" in yaml.safe_load(text)
    back, _ = recipe_from_mergekit(text)
    full = {"normalize": True, "rescale": False}
    for got, want in zip(back.layers, recipe.layers):
        for cls in ("attn", "mlp", "norm"):
            g, w = got.spec_for(cls), want.spec_for(cls)
            assert g.op == w.op and g.params["density"] == w.params["density"]
            assert g.params["weights"] == pytest.approx(w.params["weights"])
            assert {k: g.params[k] for k in full} == full
    assert back.rest.params["weights"] == [0.4, 0.4]


def test_export_names_what_mergekit_cannot_say(folders: dict[str, Path]) -> None:
    recipe = Recipe.parse(
        {
            "models": {"base": "base", "experts": ["expert0", "expert1"]},
            "layers": [
                {"from": 0, "op": "ties", "params": {"weights": [0.5, 0.5]}},
                {"from": 0, "op": "cabs", "params": {"weights": [0.5, 0.5]}},
                {"from": 2, "op": "dare", "params": {"weights": [0.5, 0.5]}},
            ],
            "rest": {"op": "ties", "params": {"weights": [0.5, 0.5]}},
        }
    )
    text, problems = recipe_to_mergekit(recipe, {"base": "b", "expert0": "x", "expert1": "y"})
    joined = "\n".join(problems)
    assert "layers[1]: op 'cabs' has no mergekit merge method" in joined
    assert "layers[2]: dare: rescale 'inverse_p' has no mergekit form" in joined
    doc = yaml.safe_load(text)
    assert doc["merge_method"] == "ties"
    assert [s["sources"][0]["layer_range"] for s in doc["slices"]] == [[0, 1], [0, 1], [2, 3]]


def test_export_writes_the_head_as_filters_and_imports_it_back(folders: dict[str, Path]) -> None:
    def ties(weights: list[float]) -> dict:
        return {"op": "ties", "params": {"weights": weights, "density": 0.5}}

    recipe = Recipe.parse(
        {
            "models": {"base": "base", "experts": ["expert0", "expert1"]},
            "layers": [{"from": i, **ties([0.5, 0.5])} for i in range(3)],
            "rest": ties([0.5, 0.5]),
            "head": ties([0.9, 0.5]),
        }
    )
    text, problems = recipe_to_mergekit(
        recipe, {k: str(v) for k, v in zip(["base", "expert0", "expert1"], folders.values())}
    )
    assert problems == []
    weight = yaml.safe_load(text)["models"][0]["parameters"]["weight"]
    assert weight == [
        {"filter": "model.norm", "value": 0.9},
        {"filter": "lm_head", "value": 0.9},
        {"value": 0.5},
    ]
    back, _ = recipe_from_mergekit(text)
    assert back.rest.params["weights"] == [0.5, 0.5] and back.head.params["weights"] == [0.9, 0.5]
    averaged = recipe.model_copy(update={"norms": "average"})
    _, problems = recipe_to_mergekit(averaged, {"base": "b", "expert0": "x", "expert1": "y"})
    assert problems == [
        "norms: 'average' has no mergekit form; norm tensors are exported with their operator"
    ]


CLASSIC_SLERP = """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
      - model: {e0}
        layer_range: [0, 3]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_classic_slerp_slices_import_and_round_trip(folders: dict[str, Path]) -> None:
    recipe, paths = recipe_from_mergekit(yaml_for(folders, CLASSIC_SLERP))
    assert recipe.models.experts == ["expert0"] and paths["expert0"] == folders["e0"]
    # t = j/2 over the 5-point gradients reads their points 0, 2, 4: attention 0, 0.3, 1; MLP 1, 0.7, 0.
    assert [layer.spec_for("attn").params["t"] for layer in recipe.layers] == pytest.approx([0, 0.3, 1])
    assert [layer.spec_for("mlp").params["t"] for layer in recipe.layers] == pytest.approx([1, 0.7, 0])
    assert {layer.params["t"] for layer in recipe.layers} == {0.5}
    assert recipe.rest == OpSpec(op="slerp", params={"t": 0.5}) and recipe.head is None
    text, problems = recipe_to_mergekit(recipe, {"base": str(folders["base"]), "expert0": str(folders["e0"])})
    assert problems == []
    back, _ = recipe_from_mergekit(text)
    assert _rounded(back) == _rounded(recipe)


def test_passthrough_frankenmerge_imports_and_round_trips(folders: dict[str, Path]) -> None:
    recipe, paths = recipe_from_mergekit(
        yaml_for(
            folders,
            """
merge_method: passthrough
slices:
  - sources: [{{model: {e0}, layer_range: [0, 2]}}]
  - sources: [{{model: {e1}, layer_range: [1, 3]}}]
  - sources: [{{model: {e1}, layer_range: [1, 2]}}]
""",
        )
    )
    assert paths["base"] == folders["e0"]  # no base_model: the first model's config and tokenizer
    assert [layer.from_ for layer in recipe.layers] == [0, 1, 1, 2, 1]
    assert [layer.params["model"] for layer in recipe.layers] == ["expert0"] * 2 + ["expert1"] * 3
    assert recipe.rest.params == {"model": "expert0"} and recipe.head.params == {"model": "expert1"}
    sources = {"base": str(paths["base"]), **{n: str(p) for n, p in paths.items() if n != "base"}}
    text, problems = recipe_to_mergekit(recipe, sources)
    assert problems == []
    doc = yaml.safe_load(text)
    assert doc["merge_method"] == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in doc["slices"]] == [[0, 2], [1, 3], [1, 2]]
    back, _ = recipe_from_mergekit(text)
    assert back == recipe


def test_slices_read_parameters_per_slice_and_zero_an_absent_model(folders: dict[str, Path]) -> None:
    recipe, _ = recipe_from_mergekit(
        yaml_for(
            folders,
            """
merge_method: ties
base_model: {base}
parameters: {{density: 0.5}}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 2]}}
      - {{model: {e0}, layer_range: [0, 2], parameters: {{weight: [0.2, 0.8]}}}}
      - {{model: {e1}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}
  - sources:
      - {{model: {base}, layer_range: [1, 3]}}
      - {{model: {e0}, layer_range: [1, 3]}}
    parameters: {{weight: 0.6, density: 0.9}}
""",
        )
    )
    assert [layer.from_ for layer in recipe.layers] == [0, 1, 1, 2]
    assert [layer.params["weights"] for layer in recipe.layers] == [
        pytest.approx([0.2, 0.3]),
        pytest.approx([0.8, 0.3]),
        [0.6, 0.0],
        [0.6, 0.0],
    ]
    assert recipe.layers[3].params["density"] == [0.9, 1.0]
    assert recipe.rest.params["weights"] == [0.2, 0.3]  # the first slice, at t = 0
    assert recipe.head.params["weights"] == [0.6, 0.0]  # the last slice


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        (
            "[{{sources: [{{model: {base}, layer_range: [0, 2]}}, {{model: {e0}, layer_range: [1, 3]}}]}}]",
            r"slices\[0\]: its sources read different layer ranges",
        ),
        (
            "[{{sources: [{{model: {base}, layer_range: [0, 2]}}, {{model: {e0}, layer_range: [0, 3]}}]}}]",
            r"slices\[0\]: all sources of a slice must span the same number of layers",
        ),
        (
            "[{{sources: [{{model: {base}, layer_range: [2, 4]}}, {{model: {e0}, layer_range: [2, 4]}}]}}]",
            r"layer_range \[2, 4\] goes beyond the 3 layers",
        ),
        ("[{{sources: [{{model: {e0}, layer_rnage: [0, 2]}}]}}]", "needs 'model' and 'layer_range'"),
    ],
)
def test_bad_slices_fail_with_one_line(folders: dict[str, Path], slices: str, message: str) -> None:
    body = "merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\nslices: " + slices + "\n"
    with pytest.raises(MergekitConfigError, match=message) as info:
        recipe_from_mergekit(yaml_for(folders, body))
    assert "\n" not in str(info.value)
    passthrough = "merge_method: passthrough\nslices: [{{sources: [{{model: {e0}, layer_range: [0, 1]}}, " + (
        "{{model: {e1}, layer_range: [0, 1]}}]}}]\n"
    )
    with pytest.raises(MergekitConfigError, match="passthrough takes exactly one source per slice"):
        recipe_from_mergekit(yaml_for(folders, passthrough))


def _rounded(recipe: Recipe) -> str:
    """The recipe's JSON with numbers rounded, for comparing a round trip through YAML gradients."""
    return yaml.safe_dump(
        json.loads(json.dumps(recipe.to_json()), parse_float=lambda x: round(float(x), 9)), sort_keys=True
    )
