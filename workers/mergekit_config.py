"""Translate between mergekit YAML configs and mergesearch recipes.

Import follows mergekit's definitions where they differ from the papers (dare_* rescale by the L1 norm and do
not normalize, ties' density defaults to 1.0, ...), so a translated YAML merges to the weights mergekit gives.
Parameter settings are evaluated as mergekit does (`mergekit.config.evaluate_setting`): a list of numbers is a
gradient interpolated over the layers at t = i/(L − 1); a list of `{filter, value}` takes the first entry
whose filter is a substring of the tensor name. The tensors outside the layers read every gradient at t = 0
(mergekit 0.1.5 `MergePlanner.plan_module`: one reader with t = 0 for the embeddings and for the final norm
and lm_head; older releases read the latter at t = 1). Llama-style tensor names decide which filter
reaches which module (attention, MLP, the layer's norms). The embeddings become the recipe's `rest`, the final
norm and lm_head its `head` where a filter gives them other parameters. `slices:` configs map onto the recipe's
`layers` and their `from` (a slice's gradients run over the slice; `passthrough` frankenmerges become copies
that skip and repeat layers). Export writes the inverse (a recipe of copies as passthrough slices) and lists
what a mergekit YAML cannot say. Which operator a mergekit method is, and the reverse, each operator declares
(`Operator.mergekit_import`, `from_mergekit`, `to_mergekit`); this module knows mergekit's config layout.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workers.hub import ModelNotFoundError, is_model_folder, locate_model
from workers.operators import OPERATORS, Operator
from workers.operators.base import MergekitForm, MergekitMethod, MergekitRead
from workers.recipe import LayerSpec, OpSpec, Recipe, RecipeError

TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
}

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

ABSENT = {"weight": 0.0, "density": 1.0}
"""Per-model parameters of an expert that a slice does not read: it then contributes nothing."""


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


@dataclass(frozen=True)
class _Source:
    """One model of one slice: its recipe name, its first source layer and its own parameters."""

    name: str
    start: int
    params: dict[str, Any]


@dataclass(frozen=True)
class _Slice:
    """A run of output layers, read from `length` consecutive layers of each of its sources."""

    sources: list[_Source]
    length: int
    params: dict[str, Any]

    def present(self) -> list[str]:
        return [s.name for s in self.sources]


def _importer(method: Any, where: str) -> tuple[Operator, MergekitMethod]:
    """The operator that declares mergekit `method` as its `mergekit_import`, and the method."""
    imports = {op.mergekit_import.name: (op, op.mergekit_import) for op in OPERATORS.values() if op.mergekit_import}
    if not isinstance(method, str) or method not in imports:
        raise MergekitConfigError(
            f"{where}: merge_method {method!r} is not supported (supported: {', '.join(imports)})"
        )
    return imports[method]


class _Reader:
    """Parameter lookup in mergekit's order (`ConfigReader.parameter_sources`): the model's own parameters in
    the slice, the slice's, the global ones, then the default."""

    def __init__(self, method: str, global_params: dict[str, Any], where: str):
        self.method = method
        self.op, self.declared = _importer(method, where)
        self.global_params = global_params
        self.where = where

    def value(
        self, name: str, default: Any, tensor: str, t: float, piece: _Slice, model: str | None = None
    ) -> Any:
        own = [s.params for s in piece.sources if s.name == model] if model else []
        for params in [*own, piece.params, self.global_params]:
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

    def typed(self, name: str, default: Any, tensor: str, t: float, piece: _Slice, model: str | None = None) -> Any:
        """A parameter's value as a number, or as a boolean where mergekit's default is one."""
        value = self.value(name, default, tensor, t, piece, model)
        return bool(value) if isinstance(default, bool) else _number(value, f"{self.where}: {name}")

    def op_spec(self, experts: list[str], base: str, tensor: str, t: float, piece: _Slice) -> OpSpec:
        """The recipe operator that mergekit's method amounts to for one tensor of one slice, as the operator
        that imports the method reads it. An expert the slice does not read gets weight 0, which leaves
        every weighted method as if it were absent."""
        present = piece.present()
        shared = {k: self.typed(k, d, tensor, t, piece) for k, d in self.declared.shared.items()}
        per_model = {
            k: [self.typed(k, d, tensor, t, piece, model=m) if m in present else ABSENT.get(k, d) for m in experts]
            for k, d in self.declared.per_model.items()
        }
        params = self.op.from_mergekit(MergekitRead(tensor, shared, per_model, experts, present, base))
        if isinstance(params, str):
            raise MergekitConfigError(f"{self.where}: {params}")
        return OpSpec(op=self.op.name, params=params)


def _one_spec(
    reader: _Reader,
    experts: list[str],
    base: str,
    names: tuple[str, ...],
    t: float,
    piece: _Slice,
    label: str,
) -> OpSpec:
    specs = {name: reader.op_spec(experts, base, name, t, piece) for name in names}
    distinct = {json.dumps(s.model_dump(), sort_keys=True) for s in specs.values()}
    if len(distinct) > 1:
        raise MergekitConfigError(
            f"{reader.where}: a filter gives {label} tensors ({', '.join(names)}) different parameters; "
            "a recipe merges them with one operator"
        )
    return next(iter(specs.values()))


def _check_keys(data: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise MergekitConfigError(f"{what}: unknown key '{min(unknown)}'")


def _depth(folder: Path) -> int:
    try:
        return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])
    except (OSError, KeyError, ValueError) as exc:
        raise MergekitConfigError(f"{folder / 'config.json'}: no usable num_hidden_layers ({exc})") from None


def recipe_from_mergekit(
    config: str | Path, *, root: Path | None = None, seed: int = 0
) -> tuple[Recipe, dict[str, Path]]:
    """Translate a mergekit YAML (a path, or the YAML text) into a recipe and its sources (name → folder).

    A `models:` config is one slice over all layers. In a `slices:` config each slice's output layers read
    `layer_range` of its sources, gradients run over the slice (t = j/(n − 1)), the embeddings follow the
    first slice and the final norm and lm_head the last, as mergekit 0.1.5 plans them. A recipe reads one
    source layer from every model, so the sources of a slice must share their layer range, except for
    `passthrough`, which takes one model per slice (frankenmerges: layers copied, skipped or repeated).

    Relative model paths resolve against `root` (default: the current directory, as mergekit does); Hub ids
    come from the local Hugging Face cache. The base is named 'base'; experts are named after their folders
    (for linear and passthrough, which use no base, the base's folder is an expert too and the base is the
    base_model or else the first model). `dtype` is accepted but not carried: a recipe merges in float32 and
    writes the base's dtype.
    """
    data, where = _load(config)
    root = root or Path.cwd()
    method = data.get("merge_method")
    _, declared = _importer(method, where)
    if data.get("modules"):
        raise MergekitConfigError(f"{where}: 'modules' configs are not supported; use 'models' or 'slices'")
    if data.get("tokenizer_source") not in (None, "base") or data.get("tokenizer"):
        raise MergekitConfigError(
            f"{where}: only the base model's tokenizer is supported (tokenizer_source: base)"
        )
    _check_keys(data, TOP_KEYS, where)
    if bool(data.get("models")) == bool(data.get("slices")):
        raise MergekitConfigError(f"{where}: give exactly one of 'models' or 'slices'")
    global_params = data.get("parameters") or {}
    for key in global_params:
        if key not in declared.shared and key not in declared.per_model:
            raise MergekitConfigError(f"{where}: parameter '{key}' is not used by merge_method {method}")

    folders: dict[str, Path] = {}  # as written in the YAML -> folder

    def folder_of(ref: Any) -> Path:
        """A model's folder; mergekit's `MODEL+LORA` is the LoRA folder, applied to the base (workers.lora)."""
        key = ref if isinstance(ref, str) else repr(ref)
        if key not in folders:
            model, plus, lora = key.rpartition("+")
            if not plus or is_model_folder((root / key).expanduser()):
                folders[key] = _model_path(ref, root, where)
            elif base_path is None or _model_path(model, root, where) != base_path:
                raise MergekitConfigError(
                    f"{where}: model '{key}': a LoRA is applied to the base_model only ('BASE+LORA')"
                )
            else:
                folders[key] = _model_path(lora, root, where)
        return folders[key]

    base_ref = data.get("base_model")
    base_path: Path | None = None  # read by folder_of: a 'BASE+LORA' needs the base first
    if base_ref is not None:
        base_path = folder_of(base_ref)
    raw = _raw_slices(data, where, declared.uses_base)
    if base_path is None:
        if declared.uses_base:
            raise MergekitConfigError(f"{where}: merge_method {method} needs a base_model")
        base_path = folder_of(raw[0][0][0]["model"])
    taken: set[str] = {"base"}
    names: dict[Path, str] = {}  # expert folder -> recipe name
    slices: list[_Slice] = []
    for i, (entries, slice_params, length) in enumerate(raw):
        sources: list[_Source] = []
        for j, entry in enumerate(entries):
            what = f"{where}: slices[{i}].sources[{j}]" if "slices" in data else f"{where}: models[{j}]"
            path = folder_of(entry["model"])
            for key in entry.get("parameters") or {}:
                if key not in declared.per_model:
                    raise MergekitConfigError(
                        f"{what} parameter '{key}' is not used by merge_method {method}"
                    )
            if path == base_path and declared.uses_base:
                name = "base"
            else:
                name = names.get(path) or names.setdefault(path, _unique_name(path, taken))
            sources.append(_Source(name, entry["start"], entry.get("parameters") or {}))
        slices.append(
            _Slice(sources, length if length is not None else _depth(base_path), slice_params or {})
        )
    experts = list(names.values())
    if not experts:
        raise MergekitConfigError(f"{where}: no model to merge besides the base_model")
    if method == "slerp" and len(experts) != 1 and "slices" not in data:
        raise MergekitConfigError(
            f"{where}: slerp needs the base_model and exactly one other model, got {len(experts)}"
        )
    depth = _depth(base_path)
    reader = _Reader(method, global_params, where)
    layers: list[LayerSpec] = []
    for i, piece in enumerate(slices):
        starts = {s.start for s in piece.sources}
        if method == "passthrough" and len(piece.sources) != 1:
            raise MergekitConfigError(f"{where}: slices[{i}]: passthrough takes exactly one source per slice")
        if len(starts) > 1:
            raise MergekitConfigError(
                f"{where}: slices[{i}]: its sources read different layer ranges; a recipe reads the same "
                "source layers from every model it merges (only passthrough slices may differ)"
            )
        start = starts.pop()
        if start + piece.length > depth:
            raise MergekitConfigError(
                f"{where}: slices[{i}]: layer_range [{start}, {start + piece.length}] goes beyond the "
                f"{depth} layers of the base_model"
            )
        for j in range(piece.length):
            out = len(layers)
            t = j / (piece.length - 1) if piece.length > 1 else 1.0
            spec = {
                cls: _one_spec(
                    reader,
                    experts,
                    "base",
                    tuple(f"model.layers.{out}.{p}" for p in probes),
                    t,
                    piece,
                    f"layer {out} {cls}",
                )
                for cls, probes in MODULE_PROBES.items()
            }
            other = spec["other"]
            layers.append(
                LayerSpec(
                    from_=start + j,
                    op=other.op,
                    params=other.params,
                    attn=spec["attn"] if spec["attn"] != other else None,
                    mlp=spec["mlp"] if spec["mlp"] != other else None,
                )
            )
    first, last = slices[0], slices[-1]
    # mergekit 0.1.5 pairs the last slice's models with the first slice's count of inputs (a zip).
    last = _Slice(last.sources[: len(first.sources)], last.length, last.params)
    pre = _one_spec(reader, experts, "base", PRE_PROBES, OUTSIDE_T, first, "embedding")
    post = _one_spec(reader, experts, "base", POST_PROBES, OUTSIDE_T, last, "final norm and lm_head")
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
    return recipe, {"base": base_path, **{name: path for path, name in names.items()}}


def _raw_slices(
    data: dict[str, Any], where: str, uses_base: bool
) -> list[tuple[list[dict[str, Any]], dict[str, Any], int | None]]:
    """Each slice as (sources with 'model', 'start' and 'parameters', slice parameters, length). A `models:`
    config is one slice over the base's depth (length None); mergekit adds a base_model it does not list."""
    if data.get("models"):
        entries = data["models"]
        if not isinstance(entries, list):
            raise MergekitConfigError(f"{where}: 'models' must list at least one model")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "model" not in entry:
                raise MergekitConfigError(f"{where}: models[{i}] needs a 'model' key")
            _check_keys(entry, {"model", "parameters"}, f"{where}: models[{i}]")
        sources = [{**entry, "start": 0} for entry in entries]
        if data.get("base_model") is not None and uses_base:
            sources.append({"model": data["base_model"], "start": 0})
        return [(sources, {}, None)]
    pieces = data["slices"]
    if not isinstance(pieces, list):
        raise MergekitConfigError(f"{where}: 'slices' must be a list of slices with 'sources'")
    out = []
    for i, piece in enumerate(pieces):
        what = f"{where}: slices[{i}]"
        if not isinstance(piece, dict) or not isinstance(piece.get("sources"), list) or not piece["sources"]:
            raise MergekitConfigError(f"{what} needs a non-empty 'sources' list")
        _check_keys(piece, {"sources", "parameters", "base_model"}, what)
        if piece.get("base_model") not in (None, data.get("base_model")):
            raise MergekitConfigError(f"{what}: a base_model per slice is not supported")
        sources, lengths = [], set()
        for j, entry in enumerate(piece["sources"]):
            here = f"{what}.sources[{j}]"
            if not isinstance(entry, dict) or "model" not in entry or "layer_range" not in entry:
                raise MergekitConfigError(f"{here} needs 'model' and 'layer_range'")
            _check_keys(entry, {"model", "layer_range", "parameters"}, here)
            span = entry["layer_range"]
            if (
                not isinstance(span, list)
                or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                or not 0 <= span[0] < span[1]
            ):
                raise MergekitConfigError(f"{here}: layer_range must be [start, end] with 0 <= start < end")
            lengths.add(span[1] - span[0])
            sources.append({"model": entry["model"], "start": span[0], "parameters": entry.get("parameters")})
        if len(lengths) > 1:
            raise MergekitConfigError(f"{what}: all sources of a slice must span the same number of layers")
        out.append((sources, piece.get("parameters") or {}, lengths.pop()))
    return out


# ----------------------------------------------------------------------------------------------- export


def _to_mergekit(spec: OpSpec, recipe: Recipe) -> MergekitForm | str:
    """One operator as the operator itself says mergekit expresses it (`Operator.to_mergekit`), or why not."""
    op = OPERATORS[spec.op]
    # Validated, so that defaults are filled in exactly as the merge sees them.
    return op.to_mergekit(op.Params.model_validate(spec.params), recipe.models)


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
    if all(spec.op == "copy" for spec in recipe.ops()):
        return _passthrough(recipe, sources)
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
    translated: dict[str, MergekitForm] = {}
    for label, spec in labelled.items():
        result = _to_mergekit(spec, recipe)
        if isinstance(result, str):
            if label in stated:
                problems.append(f"{label}: {result}")
        else:
            translated[label] = result
    if not translated:
        return "", problems
    # Read before the fallback below fills in the labels mergekit cannot say.
    random = any(OPERATORS[labelled[label].op].random_masks for label in translated)
    averaged = all(
        label in translated and translated[label].method == "linear" and translated[label].shared["normalize"]
        for label in labelled
    )
    methods = Counter(m for m, _, _ in translated.values())
    method = translated["rest"][0] if "rest" in translated else methods.most_common(1)[0][0]
    fallback = translated.get("rest") or next(v for v in translated.values() if v[0] == method)
    for label, spec in labelled.items():
        got = translated.get(label)
        if got is not None and got[0] != method and label in stated:
            problems.append(f"{label}: op '{spec.op}' is mergekit {got[0]}, not the YAML's {method}")
        if got is None or got[0] != method:
            translated[label] = fallback
    if random:
        problems.append(
            "DARE/DELLA masks are random: mergekit draws its own (same distribution, other entries)"
        )
    if recipe.norms == "average" and not averaged:
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


def _passthrough(recipe: Recipe, sources: dict[str, str]) -> tuple[str, list[str]]:
    """A recipe of whole-model copies as a passthrough frankenmerge: one slice per run of consecutive source
    layers copied from one model. A layer whose modules copy different models has no passthrough form."""
    problems: list[str] = []
    copied: list[str] = []
    for i, layer in enumerate(recipe.layers):
        models = {layer.spec_for(cls).params["model"] for cls in ("attn", "mlp", "other")}
        if len(models) > 1:
            problems.append(
                f"layers[{i}]: copies modules of {len(models)} models; passthrough copies whole layers"
            )
        copied.append(layer.params["model"])
    runs: list[list[int]] = []
    for i, layer in enumerate(recipe.layers):
        if runs and copied[i] == copied[i - 1] and layer.from_ == recipe.layers[i - 1].from_ + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    ends = {"rest": (recipe.rest, copied[0], "first"), "head": (recipe.head_or_rest(), copied[-1], "last")}
    for label, (spec, model, which) in ends.items():
        if spec.params["model"] != model:
            problems.append(
                f"{label}: copies '{spec.params['model']}'; passthrough takes it from the {which} slice's model"
            )
    slices = [
        {
            "sources": [
                {
                    "model": sources[copied[run[0]]],
                    "layer_range": [recipe.layers[run[0]].from_, recipe.layers[run[0]].from_ + len(run)],
                }
            ]
        }
        for run in runs
    ]
    doc = {"merge_method": "passthrough", "base_model": sources[recipe.models.base], "slices": slices}
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
