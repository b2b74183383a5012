"""Translate between mergekit YAML configs and mergesearch recipes.

Import follows mergekit's definitions where they differ from the papers (dare_* rescale by the L1 norm and do
not normalize, ties' density defaults to 1.0, ...), so a translated YAML merges to the weights mergekit gives.
Parameter settings are evaluated as mergekit does (`mergekit.config.evaluate_setting`): a list of numbers is a
gradient interpolated over the layers at t = i/(L − 1); a list of `{filter, value}` takes the first entry
whose filter is a substring of the tensor name. The tensors outside the layers read every gradient at t = 0
(mergekit 0.1.5 `MergePlanner.plan_module`: one reader with t = 0 for the embeddings and for the final norm
and lm_head; older releases read the latter at t = 1). Llama-style tensor names decide which filter
reaches which module (attention, MLP, the layer's norms). The embeddings become the recipe's `rest`, the final
norm and lm_head its `head` where a filter gives them other parameters. Export writes the inverse and lists
what a mergekit YAML cannot say.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from workers.hub import ModelNotFoundError, locate_model
from workers.operators import OPERATORS
from workers.operators.kernels import per_expert
from workers.recipe import LayerSpec, OpSpec, Recipe, RecipeError

IMPORTABLE_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp")

MODULE_PROBES: dict[str, tuple[str, ...]] = {
    "attn": tuple(f"self_attn.{p}_proj.weight" for p in "qkvo"),
    "mlp": ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"),
    "other": ("input_layernorm.weight", "post_attention_layernorm.weight"),
}
"""Tensor names (after `model.layers.N.`) that stand for each module class a recipe layer can override."""
PRE_PROBES = ("model.embed_tokens.weight",)
POST_PROBES = ("model.norm.weight", "lm_head.weight")
PRE_FILTERS = ("embed_tokens",)
POST_FILTERS = ("model.norm", "lm_head")
"""Filters that reach only the tensors before the decoder layers (`rest`) or after them (`head`)."""
OUTSIDE_T = 0.0
"""Where mergekit 0.1.5 reads a gradient for the tensors outside the layers, before and after them alike."""

SHARED_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False},
    "ties": {"normalize": True, "lambda": 1.0, "rescale": False, "int8_mask": False},
    "dare_ties": {"normalize": False, "lambda": 1.0, "rescale": True, "int8_mask": False},
    "dare_linear": {"normalize": False, "lambda": 1.0, "rescale": True, "int8_mask": False},
    "slerp": {},
}
"""mergekit 0.1.5's shared parameters and their defaults, per method."""
MODEL_PARAMS: dict[str, dict[str, Any]] = {
    "linear": {"weight": None},
    "task_arithmetic": {"weight": None},
    "ties": {"weight": None, "density": 1.0},
    "dare_ties": {"weight": None, "density": 1.0},
    "dare_linear": {"weight": None, "density": 1.0},
    "slerp": {},
}
"""Per-model parameters (None: required)."""


class MergekitConfigError(ValueError):
    """A mergekit YAML that cannot be translated; the message names the file, key or model."""


# ----------------------------------------------------------------------------------------------- import


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """mergekit's evaluation of one parameter setting for a tensor at layer position t; None if no filter
    matches (the lookup then falls through to the next level)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting, list):
        raise MergekitConfigError(f"unexpected parameter value {setting!r}")
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond:
            raise MergekitConfigError(f"parameter entry {cond!r} needs a 'value' (and optionally a 'filter')")
        filt = cond.get("filter")
        if filt is None or filt == "*" or filt in tensor_name:
            return evaluate_setting(cond["value"], tensor_name, t)
    return None


def _number(value: Any, what: str) -> float:
    """YAML reads `1e-5` as a string; mergekit treats it as a number, and so do we."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MergekitConfigError(f"{what} must be a number, got {value!r}") from None


def _load(config: str | Path) -> tuple[dict[str, Any], str]:
    if isinstance(config, Path) or "\n" not in config:
        path = Path(config)
        try:
            text = path.read_text()
        except OSError as exc:
            raise MergekitConfigError(f"{path}: cannot read ({exc.strerror})") from None
        where = str(path)
    else:
        text, where = config, "mergekit config"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergekitConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MergekitConfigError(f"{where}: expected a mapping at the top level")
    return data, where


def _model_path(ref: Any, root: Path, where: str) -> Path:
    """A model's folder: a path (relative to `root`), a LoRA adapter folder, or a Hub id in the local cache."""
    if not isinstance(ref, str):
        raise MergekitConfigError(f"{where}: model {ref!r} must be a folder path or a Hub id")
    try:
        return locate_model(ref, root)
    except ModelNotFoundError as exc:
        raise MergekitConfigError(f"{where}: {exc}") from None


def _unique_name(path: Path, taken: set[str]) -> str:
    name, n = path.name or "model", 2
    while name in taken:
        name, n = f"{path.name}-{n}", n + 1
    taken.add(name)
    return name


class _Reader:
    """Parameter lookup in mergekit's order: the model's own parameters, the global ones, the default."""

    def __init__(
        self, method: str, global_params: dict[str, Any], model_params: dict[str, dict[str, Any]], where: str
    ):
        self.method = method
        self.global_params = global_params
        self.model_params = model_params
        self.where = where

    def value(self, name: str, default: Any, tensor: str, t: float, model: str | None = None) -> Any:
        levels = ([self.model_params.get(model, {})] if model else []) + [self.global_params]
        for params in levels:
            if name in params:
                value = evaluate_setting(params[name], tensor, t)
                if value is not None:
                    return value
        if default is None:
            owner = f"model '{model}'" if model else "parameters"
            raise MergekitConfigError(
                f"{self.where}: {owner} needs parameter '{name}' for {self.method} ({tensor})"
            )
        return default

    def op_spec(self, experts: list[str], tensor: str, t: float) -> OpSpec:
        """The recipe operator that mergekit's method amounts to for one tensor."""
        shared = {k: self.value(k, d, tensor, t) for k, d in SHARED_DEFAULTS[self.method].items()}
        per_model = {
            k: [self.value(k, d, tensor, t, model=m) for m in experts]
            for k, d in MODEL_PARAMS[self.method].items()
        }
        weights = [_number(w, f"{self.where}: weight") for w in per_model.get("weight", [])]
        densities = [_number(d, f"{self.where}: density") for d in per_model.get("density", [])]
        if self.method == "slerp":
            return OpSpec(
                op="slerp", params={"t": _number(self.value("t", None, tensor, t), f"{self.where}: t")}
            )
        if self.method == "linear":
            return OpSpec(op="linear", params={"weights": weights, "normalize": bool(shared["normalize"])})
        params: dict[str, Any] = {
            "weights": weights,
            "lambda": _number(shared["lambda"], f"{self.where}: lambda"),
        }
        params["normalize"] = bool(shared["normalize"])
        if self.method == "task_arithmetic":
            return OpSpec(op="task_arithmetic", params=params)
        params["density"] = densities
        if self.method == "ties":
            return OpSpec(op="ties", params={**params, "rescale": bool(shared["rescale"])})
        params["rescale"] = "l1" if shared["rescale"] else "none"
        return OpSpec(op="dare_ties" if self.method == "dare_ties" else "dare", params=params)


def _one_spec(reader: _Reader, experts: list[str], names: tuple[str, ...], t: float, label: str) -> OpSpec:
    specs = {name: reader.op_spec(experts, name, t) for name in names}
    distinct = {json.dumps(s.model_dump(), sort_keys=True) for s in specs.values()}
    if len(distinct) > 1:
        raise MergekitConfigError(
            f"{reader.where}: a filter gives {label} tensors ({', '.join(names)}) different parameters; "
            "a recipe merges them with one operator"
        )
    return next(iter(specs.values()))


def recipe_from_mergekit(
    config: str | Path, *, root: Path | None = None, seed: int = 0
) -> tuple[Recipe, dict[str, Path]]:
    """Translate a mergekit YAML (a path, or the YAML text) into a recipe and its sources (name → folder).

    Relative model paths resolve against `root` (default: the current directory, as mergekit does). The
    base is named 'base'; experts are named after their folders. `dtype` is accepted but not carried: a
    recipe merges in float32 and writes the base's dtype.
    """
    data, where = _load(config)
    root = root or Path.cwd()
    method = data.get("merge_method")
    if method not in IMPORTABLE_METHODS:
        raise MergekitConfigError(
            f"{where}: merge_method {method!r} is not supported (supported: {', '.join(IMPORTABLE_METHODS)})"
        )
    for key in ("slices", "modules"):
        if data.get(key):
            raise MergekitConfigError(
                f"{where}: '{key}' configs are not supported; list the models under 'models'"
            )
    if data.get("tokenizer_source") not in (None, "base") or data.get("tokenizer"):
        raise MergekitConfigError(
            f"{where}: only the base model's tokenizer is supported (tokenizer_source: base)"
        )
    unknown = set(data) - {
        "merge_method",
        "base_model",
        "models",
        "parameters",
        "dtype",
        "out_dtype",
        "tokenizer_source",
        "name",
    }
    if unknown:
        raise MergekitConfigError(f"{where}: unknown key '{min(unknown)}'")
    entries = data.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise MergekitConfigError(f"{where}: 'models' must list at least one model")
    global_params = data.get("parameters") or {}
    allowed = (
        set(SHARED_DEFAULTS[method]) | set(MODEL_PARAMS[method]) | ({"t"} if method == "slerp" else set())
    )
    for key in global_params:
        if key not in allowed:
            raise MergekitConfigError(f"{where}: parameter '{key}' is not used by merge_method {method}")

    taken: set[str] = {"base"}
    paths: dict[str, Path] = {}
    model_params: dict[str, dict[str, Any]] = {}
    base_ref = data.get("base_model")
    base_path = _model_path(base_ref, root, where) if base_ref is not None else None
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergekitConfigError(f"{where}: models[{i}] needs a 'model' key")
        path = _model_path(entry["model"], root, where)
        if method != "linear" and path == base_path:
            continue  # mergekit skips the base's own task vector (it is zero)
        name = _unique_name(path, taken)
        paths[name] = path
        params = entry.get("parameters") or {}
        for key in params:
            if key not in MODEL_PARAMS[method]:
                raise MergekitConfigError(
                    f"{where}: models[{i}] parameter '{key}' is not used by merge_method {method}"
                )
        model_params[name] = params
    experts = list(paths)
    if base_path is None:
        if method != "linear":
            raise MergekitConfigError(f"{where}: merge_method {method} needs a base_model")
        base_path = next(iter(paths.values()))
    if method == "slerp" and len(experts) != 1:
        raise MergekitConfigError(
            f"{where}: slerp needs the base_model and exactly one other model, got {len(experts)}"
        )
    if not experts:
        raise MergekitConfigError(f"{where}: no model to merge besides the base_model")

    try:
        num_layers = int(json.loads((base_path / "config.json").read_text())["num_hidden_layers"])
    except (KeyError, ValueError) as exc:
        raise MergekitConfigError(
            f"{base_path / 'config.json'}: no usable num_hidden_layers ({exc})"
        ) from None
    reader = _Reader(method, global_params, model_params, where)
    layers = []
    for i in range(num_layers):
        t = i / (num_layers - 1) if num_layers > 1 else 1.0
        spec = {
            cls: _one_spec(
                reader, experts, tuple(f"model.layers.{i}.{p}" for p in probes), t, f"layer {i} {cls}"
            )
            for cls, probes in MODULE_PROBES.items()
        }
        other = spec["other"]
        layers.append(
            LayerSpec(
                from_=i,
                op=other.op,
                params=other.params,
                attn=spec["attn"] if spec["attn"] != other else None,
                mlp=spec["mlp"] if spec["mlp"] != other else None,
            )
        )
    pre = _one_spec(reader, experts, PRE_PROBES, OUTSIDE_T, "embedding")
    post = _one_spec(reader, experts, POST_PROBES, OUTSIDE_T, "final norm and lm_head")
    try:
        recipe = Recipe(
            models={"base": "base", "experts": experts},
            layers=layers,
            rest=pre,
            head=post if post != pre else None,
            seed=seed,  # type: ignore[arg-type]
        )
    except RecipeError as exc:
        raise MergekitConfigError(f"{where}: {exc}") from None
    return recipe, {"base": base_path, **paths}


# ----------------------------------------------------------------------------------------------- export


def _to_mergekit(spec: OpSpec, recipe: Recipe) -> tuple[str, dict[str, Any], list[dict[str, Any]]] | str:
    """(method, shared params, per-expert params) for one operator, or why mergekit cannot express it."""
    k = len(recipe.models.experts)
    # Validated, so that defaults are filled in exactly as the merge sees them.
    q: Any = OPERATORS[spec.op].Params.model_validate(spec.params)
    if spec.op == "copy":
        one_hot = [{"weight": 1.0 if name == q.model else 0.0} for name in recipe.models.experts]
        return "task_arithmetic", {}, one_hot
    if spec.op == "linear":
        return "linear", {"normalize": q.normalize}, [{"weight": w} for w in q.weights]
    if spec.op == "slerp":
        if k != 1 or (
            q.models is not None and list(q.models) != [recipe.models.base, recipe.models.experts[0]]
        ):
            return "slerp: mergekit interpolates from the base_model to its one other model only"
        return "slerp", {"t": q.t}, [{}]
    if spec.op == "ram" and q.variant == "mergekit" and q.shared_divisor in (None, "count"):
        return "ram", {"epsilon": q.epsilon}, [{}] * k
    if spec.op == "ram_plus":
        return "ramplus_tl", {"r": q.r, "alpha": q.alpha, "epsilon": q.epsilon}, [{}] * k
    methods = {
        "task_arithmetic": "task_arithmetic",
        "ties": "ties",
        "dare": "dare_linear",
        "dare_ties": "dare_ties",
        "breadcrumbs": "breadcrumbs_ties" if getattr(q, "elect", False) else "breadcrumbs",
        "della": "della" if getattr(q, "elect", True) else "della_linear",
    }
    if spec.op not in methods:
        return f"op '{spec.op}' has no mergekit merge method"
    rescale = getattr(q, "rescale", False)
    if rescale == "inverse_p":
        return f"{spec.op}: rescale 'inverse_p' has no mergekit form (mergekit matches the L1 norm: use 'l1')"
    shared = {"lambda": q.lambda_, "normalize": q.normalize}
    if spec.op != "task_arithmetic":
        shared["rescale"] = rescale in (True, "l1")
    per_model: list[dict[str, Any]] = [{"weight": w} for w in q.weights]
    if hasattr(q, "density"):
        for entry, d in zip(per_model, per_expert(q.density, k)):
            entry["density"] = d
    for extra in ("gamma", "epsilon"):
        if hasattr(q, extra):
            for entry in per_model:
                entry[extra] = getattr(q, extra)
    return methods[spec.op], shared, per_model


def _collapse(values: list[Any]) -> Any:
    """A scalar when every layer agrees, else a gradient with one point per layer (exact at t = i/(n − 1))."""
    return values[0] if all(v == values[0] for v in values) else values


def _setting(per_class: dict[str, list[Any]], pre: Any, post: Any) -> Any:
    """mergekit setting giving attention, MLP and the layer's other tensors their per-layer values, the
    embeddings `pre` and the final norm and lm_head `post` (None: this slice does not feed them).

    Without a filter those read the layers' setting at t = 0 (mergekit 0.1.5; the final norm and lm_head at
    t = 1 in earlier releases): a filter is written unless every release reads the wanted value."""
    attn, mlp, other = (_collapse(per_class[c]) for c in ("attn", "mlp", "other"))
    first, last = per_class["other"][0], per_class["other"][-1]
    entries: list[dict[str, Any]] = []
    if pre is not None and pre != first:
        entries += [{"filter": f, "value": pre} for f in PRE_FILTERS]
    if post is not None and (post != first or post != last):
        entries += [{"filter": f, "value": post} for f in POST_FILTERS]
    if attn != other:
        entries.append({"filter": "self_attn", "value": attn})
    if mlp != other:
        entries.append({"filter": "mlp", "value": mlp})
    if not entries:
        return other
    return entries + [{"value": other}]


def recipe_to_mergekit(recipe: Recipe, sources: dict[str, str]) -> tuple[str, list[str]]:
    """A mergekit YAML for a recipe, and the parts of the recipe it cannot express (empty: exact).

    `sources` maps each model name of the recipe to the path or id to write.

    A recipe whose layers run 0..L−1 in order becomes a `models:` config (L must be the sources' depth);
    skipped or repeated layers become `slices:`. Per-layer values become gradients with one point per layer,
    per-module values `self_attn`/`mlp` filters, and the rest and head operators' values filters on the
    tensors outside the layers (the embeddings read the first slice, the final norm and lm_head the last). A
    part that mergekit cannot say is listed and exported with the rest's parameters.
    """
    missing = [n for n in (recipe.models.base, *recipe.models.experts) if n not in sources]
    if missing:
        raise RecipeError(f"sources: no path for model '{missing[0]}'")
    labelled = {
        _label(i, cls): layer.spec_for(cls)
        for i, layer in enumerate(recipe.layers)
        for cls in ("attn", "mlp", "other")
    }
    labelled["rest"] = recipe.rest
    labelled["head"] = recipe.head_or_rest()
    # Problems are reported once per operator the recipe states: a layer, its overrides, the rest, the head.
    stated = {"rest", *(["head"] if recipe.head is not None else [])} | {
        _label(i, cls)
        for i, layer in enumerate(recipe.layers)
        for cls in ("attn", "mlp", "other")
        if cls == "other" or getattr(layer, cls) is not None
    }
    problems: list[str] = []
    translated: dict[str, tuple[str, dict[str, Any], list[dict[str, Any]]]] = {}
    for label, spec in labelled.items():
        result = _to_mergekit(spec, recipe)
        if isinstance(result, str):
            if label in stated:
                problems.append(f"{label}: {result}")
        else:
            translated[label] = result
    if not translated:
        return "", problems
    methods = Counter(m for m, _, _ in translated.values())
    method = translated["rest"][0] if "rest" in translated else methods.most_common(1)[0][0]
    fallback = translated.get("rest") or next(v for v in translated.values() if v[0] == method)
    for label, spec in labelled.items():
        got = translated.get(label)
        if got is not None and got[0] != method and label in stated:
            problems.append(f"{label}: op '{spec.op}' is mergekit {got[0]}, not the YAML's {method}")
        if got is None or got[0] != method:
            translated[label] = fallback
    if any(spec.op in ("dare", "dare_ties", "della") for spec in labelled.values()):
        problems.append(
            "DARE/DELLA masks are random: mergekit draws its own (same distribution, other entries)"
        )
    if recipe.norms == "average" and any(
        spec.op != "linear" or spec.params.get("normalize") is False for spec in labelled.values()
    ):
        problems.append(
            "norms: 'average' has no mergekit form; norm tensors are exported with their operator"
        )

    num_layers = len(recipe.layers)

    def settings(run: list[int], expert: int | None, first: bool, last: bool) -> dict[str, Any]:
        """mergekit parameters (shared when expert is None) over the output layers of one run; the first run
        also feeds the embeddings, the last one the final norm and lm_head."""

        def pick(label: str, key: str) -> Any:
            _, shared, per_model = translated[label]
            return (shared if expert is None else per_model[expert]).get(key)

        keys = sorted(
            {k for _, sh, pm in translated.values() for k in (sh if expert is None else pm[expert])}
        )
        out: dict[str, Any] = {}
        for key in keys:
            per_class = {cls: [pick(_label(i, cls), key) for i in run] for cls in ("attn", "mlp", "other")}
            flat = [v for vs in per_class.values() for v in vs] + [pick("rest", key), pick("head", key)]
            if any(isinstance(v, bool) for v in flat) and len(set(flat)) > 1:
                problems.append(
                    f"parameter '{key}' varies, which mergekit cannot grade for a boolean; kept {flat[0]}"
                )
                out[key] = flat[0]
                continue
            out[key] = _setting(
                per_class, pick("rest", key) if first else None, pick("head", key) if last else None
            )
        return out

    base_src = sources[recipe.models.base]
    expert_srcs = [sources[n] for n in recipe.models.experts]
    doc: dict[str, Any] = {"merge_method": method}
    if method != "linear":
        doc["base_model"] = base_src  # linear averages the experts only
    runs = _runs([layer.from_ for layer in recipe.layers])
    if len(runs) == 1 and recipe.layers[0].from_ == 0:
        everything = list(range(num_layers))
        doc["models"] = [
            _source(src, settings(everything, j, True, True)) for j, src in enumerate(expert_srcs)
        ]
        if shared := settings(everything, None, True, True):
            doc["parameters"] = shared
    else:
        doc["slices"] = []
        for r, run in enumerate(runs):
            ends = (r == 0, r == len(runs) - 1)
            start = recipe.layers[run[0]].from_
            layer_range = [start, start + len(run)]
            srcs = [_source(src, settings(run, j, *ends), layer_range) for j, src in enumerate(expert_srcs)]
            if method != "linear":
                srcs.append({"model": base_src, "layer_range": layer_range})
            slice_doc: dict[str, Any] = {"sources": srcs}
            if shared := settings(run, None, *ends):
                slice_doc["parameters"] = shared
            doc["slices"].append(slice_doc)
    doc["dtype"] = "float32"
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None), problems


def _label(layer: int, cls: str) -> str:
    return f"layers[{layer}]" + ("" if cls == "other" else f".{cls}")


def _source(model: str, params: dict[str, Any], layer_range: list[int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model}
    if layer_range is not None:
        out["layer_range"] = layer_range
    if params:
        out["parameters"] = params
    return out


def _runs(froms: list[int]) -> list[list[int]]:
    """Output layers grouped into runs of consecutive source layers (one mergekit slice each)."""
    runs: list[list[int]] = [[0]]
    for i in range(1, len(froms)):
        if froms[i] == froms[i - 1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
