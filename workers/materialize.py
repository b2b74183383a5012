"""The streaming materializer: a recipe and memory-mapped sources become merged weights, one tensor at a time.

Every operator is tensor-local (ALGORITHMS.md §1.2), so each output tensor is computed from the K + 1 source
tensors of one name and freed before the next: peak memory is about K + 2 times the largest tensor, whatever
the model's size (§2.8). One stream feeds three consumers: `merged_tensors` (an iterator), `ResidentModel`
(weights written in place into one long-lived model, for evaluating candidates without a disk round trip) and
`write_merged` (a Hugging Face folder, written shard by shard as tensors arrive).
"""

from __future__ import annotations

import copy
import ctypes
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.initialization import no_init_weights

from workers.layout import ParamCollector, ParamLayout
from workers.operators import check_recipe, resolve
from workers.operators.base import MergeContext, Operator, OpParams, SourceMemo
from workers.operators.kernels import MAGNITUDE_COUNTS_BYTES, count_nonzero_, row_runs
from workers.recipe import OpSpec, Recipe, RecipeError, canonical_json
from workers.sources import SAFETENSORS_DTYPES, ModuleClass, SourceError, Sources, all_finite

# Files copied from the base folder into a written model: tokenizer and generation settings, never weights.
COPIED_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "chat_template.*",
    "generation_config.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
RECIPE_FILE = "mergesearch_recipe.json"
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


_MALLOC_TRIM: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
_STATM = Path("/proc/self/statm")  # Linux: sizes in pages; resident − shared is the anonymous memory

HEAP_SLACK = 128 * 1024**2
"""Anonymous memory a worker's candidate may add before the heap's free pages are handed back (`HeapTrim`)."""


def anonymous_bytes() -> int:
    """This process's anonymous resident memory (RssAnon), or 0 where /proc is not available."""
    try:
        resident, shared = _STATM.read_text().split()[1:3]
    except OSError:
        return 0
    return (int(resident) - int(shared)) * mmap.PAGESIZE


class HeapTrim:
    """Hands glibc's free heap pages back to the system (`malloc_trim`) whenever the process's anonymous
    memory has grown by more than `slack` since the last trim; a no-op without glibc or /proc.

    A candidate's temporaries come and go in the heap among blocks that live across candidates (pooled layers,
    memo entries, small allocations), and glibc keeps every page a freed block touched until a trim. Which
    holes it reuses depends on the heap's layout, so the pages a candidate touched varied from run to run:
    at 2 GB float32 a worker peaked 0.2–0.7 GB above its level between candidates (2.3–2.6× the model).
    Checked after each merged tensor (a /proc read, ~10 µs), it bounds the peak to that level + `slack` +
    one tensor's temporaries; in a steady search it rarely trims at all (the pages a trim hands back are
    faulted in again when reused, ~2 µs per 4 KiB page)."""

    def __init__(self, slack: int = HEAP_SLACK) -> None:
        self.enabled = _MALLOC_TRIM is not None and anonymous_bytes() > 0
        self.slack = slack
        self.trims = 0
        self._after = anonymous_bytes() if self.enabled else 0

    def check(self) -> None:
        """Trim if the anonymous memory grew by more than `slack` since the last trim."""
        if self.enabled and anonymous_bytes() > self._after + self.slack:
            self.trim()

    def trim(self) -> None:
        """Trim now. After each candidate: between candidates a worker then holds only what it keeps (at 2 GB
        float32 glibc had kept 5.6 GB there, 4.3–4.4 GB trimmed)."""
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
            self.trims += 1
        if self.enabled:
            self._after = anonymous_bytes()


CACHE_SHARE, CACHE_FLOOR, CACHE_CAP = 0.25, 256 * 1024**2, 1024**3


def default_cache_bytes(model_bytes: int) -> int:
    """The budget of each of a resident model's stores when `workers.cache_gb` is not set: a quarter of the
    model's bytes, at least 256 MiB and at most 1 GiB.

    A CPU worker then peaks at about 1.5 × the model + 0.5 GB (runtime, transients), within 2.5 × the model
    from 1 GB up; a fixed 1 GiB was a model's worth per store at 1 GB (3.5×). Memo coverage beyond a quarter
    of the model bought no measurable speed at 1 and 2 GB (candidate_cost: cache_gb 0.5 against 1), and small
    models keep a memo that holds all of their task vectors and ranks (the 256 MiB floor)."""
    return min(max(int(model_bytes * CACHE_SHARE), CACHE_FLOOR), CACHE_CAP)


class MaterializeError(RuntimeError):
    """A recipe that is valid but produced unusable weights (NaN/Inf); the message names the tensor."""


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its name in the merged model, the source tensor it is merged from, and the op."""

    out: str
    source: str
    layer: int | None  # output decoder layer, None outside the layers
    op: Operator
    params: OpParams


HEAD_CLASSES: tuple[ModuleClass, ...] = ("norm", "head")
"""Module classes of the tensors outside the decoder layers that a recipe's `head` merges: the final norm and
an untied lm_head (a tied one is the embedding, merged once by `rest`)."""


def plan_merge(recipe: Recipe, sources: Sources) -> list[TensorJob]:
    """Validate `recipe` against `sources` and list the output tensors in writing order (outside the layers,
    then the layers).

    Raises RecipeError (one line) for an unknown op, model or parameter, or a layer index beyond the sources.
    """
    if recipe.models.base != sources.base_name:
        raise RecipeError(
            f"recipe models.base is '{recipe.models.base}', the sources' base is '{sources.base_name}'"
        )
    for name in recipe.models.experts:
        if name not in sources.experts:
            raise RecipeError(
                f"recipe models.experts: '{name}' is not among the sources ({', '.join(sources.experts)})"
            )
    check_recipe(recipe, sources.num_layers)
    if len({sources.layer_kind(i) for i in range(sources.num_layers)}) > 1:
        for i, layer in enumerate(recipe.layers):  # config.json says each position's kind (e.g. MoE or not)
            if i >= sources.num_layers or sources.layer_kind(layer.from_) != sources.layer_kind(i):
                raise RecipeError(
                    f"recipe layers[{i}].from = {layer.from_}: model '{sources.base_name}' mixes layer kinds "
                    f"(e.g. dense and MoE) and its config cannot place layer {layer.from_} at position {i}"
                )
    models = (recipe.models.base, *recipe.models.experts)
    n_experts = len(recipe.models.experts)

    def op_for(spec: OpSpec, module: ModuleClass) -> tuple[Operator, OpParams]:
        op, params = resolve(spec, n_experts, models)
        if recipe.norms == "average" and module == "norm":
            averaged = op.norm_average(params, n_experts)
            if averaged is not None:
                return resolve(averaged, n_experts, models)
        return op, params

    jobs: list[TensorJob] = []
    per_layer: dict[int, list[str]] = {}
    prefix = ""
    for name in sources.tensor_names():
        located = sources.layer_of(name)
        if located is None:
            module = sources.module_class(name)
            spec = recipe.head_or_rest() if module in HEAD_CLASSES else recipe.rest
            jobs.append(TensorJob(name, name, None, *op_for(spec, module)))
        else:
            per_layer.setdefault(located[0], []).append(located[1])
            prefix = sources.layer_prefix(name) or prefix
    for i, layer in enumerate(recipe.layers):
        ops: dict[str, tuple[Operator, OpParams]] = {}  # by module class, resolved once per layer
        for suffix in per_layer[layer.from_]:
            source = f"{prefix}.{layer.from_}.{suffix}"
            module = sources.module_class(source)
            if module not in ops:
                ops[module] = op_for(layer.spec_for(module), module)
            jobs.append(TensorJob(f"{prefix}.{i}.{suffix}", source, i, *ops[module]))
    return jobs


class TensorMerger:
    """Computes one output tensor of a recipe: loads its K + 1 sources on `device`, merges, checks, casts.

    The context names the *source* tensor, so a repeated layer merges to the same weights wherever it lands
    (what makes the worker's layer cache sound).
    """

    def __init__(
        self,
        recipe: Recipe,
        sources: Sources,
        device: torch.device | str = "cpu",
        cache: SourceMemo | None = None,
        memo: SourceMemo | None = None,
    ) -> None:
        self.recipe = recipe
        self.memo = memo
        self.sources = sources
        self.device = torch.device(device)
        self.cache = cache
        self._experts = tuple(recipe.models.experts)

    def _load(self, model: str, name: str, as_stored: bool) -> torch.Tensor:
        """A source tensor on `device`: as stored for an operator that casts its own runs
        (`Operator.stored_inputs`), else as float32. From the resident model's cache when it keeps one: the
        cache holds sources as stored (bfloat16 in half the bytes; on the CPU, views of the memory-mapped
        files that cost no memory), so only the exact cast to float32 is repeated."""
        if self.cache is None:
            return self.sources.load(model, name, self.device, None if as_stored else torch.float32)
        stored = self.cache.get((model, name), partial(self.sources.load, model, name, self.device, None))
        return stored if as_stored else stored.float()

    def merge(self, job: TensorJob, destination: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """The merged tensor in the base dtype on `device`, and how many entries equal the base's (Δ = 0).

        `destination`: the model's parameter the tensor is written to (the base's shape and stored dtype),
        which an operator may write its result into (`MergeContext.result`); the tensor returned is then
        `destination` itself. Where the result is not finite, `destination` may be partly written."""
        base_name = self.recipe.models.base
        as_stored = job.op.stored_inputs
        base = self._load(base_name, job.source, as_stored)
        experts = [self._load(name, job.source, as_stored) for name in self._experts]
        ctx = MergeContext(
            tensor=job.source,
            experts=self._experts,
            base_name=base_name,
            seed=self.recipe.seed,
            memo=self.memo,
            mask_draw=self.recipe.mask_draw,
            destination=destination,
        )
        merged = job.op.merge(base, experts, job.params, ctx)
        del experts
        if merged.shape != base.shape:
            raise MaterializeError(
                f"tensor '{job.out}': op '{job.op.name}' returned shape {list(merged.shape)}, "
                f"expected {list(base.shape)}"
            )
        out = merged.to(self.sources.dtype(job.source))
        del merged
        if not all_finite(out):  # after the cast: a float32 value beyond bfloat16's range is Inf in the model
            raise MaterializeError(f"tensor '{job.out}': op '{job.op.name}' produced NaN or Inf")
        changed = sum(count_nonzero_(out[rows] - base[rows]) for rows in row_runs(out))  # runs: no page faults
        return out, out.numel() - changed


def merged_tensors(
    recipe: Recipe, sources: Sources, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (output name, merged tensor in the base dtype) one at a time. The recipe is validated now,
    before the first tensor is asked for."""
    jobs = plan_merge(recipe, sources)
    merger = TensorMerger(recipe, sources, device)
    return ((job.out, merger.merge(job)[0]) for job in jobs)


def merged_config(recipe: Recipe, sources: Sources) -> dict[str, Any]:
    """The base's config.json with the recipe's depth (and per-layer `layer_types` following `from`)."""
    config = copy.deepcopy(sources.config)
    config["num_hidden_layers"] = len(recipe.layers)
    if sources.vocabulary is not None:
        config["vocab_size"] = sources.vocabulary.rows
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [sources.config["layer_types"][layer.from_] for layer in recipe.layers]
    return config


# ----------------------------------------------------------------------------------------------------
# The resident model
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaterializeStats:
    seconds: float
    sparsity: float  # fraction of exact zeros in theta* - theta_base over the output's decoder-layer tensors
    cache_hits: int  # output layers not merged: already in place, cached, or a repeat of another output layer
    layers_merged: int
    depth: int


LayerKey = tuple[tuple[str, ...], int, str, str, str]  # (models, seed, format, norms policy, layer recipe hash)


@dataclass
class _PooledLayer:
    """A decoder-layer module and the merged layer it holds (None: not a merge result)."""

    module: nn.Module
    layer_type: tuple[str | None, frozenset[str]]
    """What it was built as: attention type (config.layer_types, if the model has them) and layer kind."""
    key: LayerKey | None = None
    unchanged: int = 0
    numel: int = 0
    last_used: int = 0
    params: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.params = {
            **dict(self.module.named_buffers(remove_duplicate=False)),
            **dict(self.module.named_parameters(remove_duplicate=False)),
        }


class ResidentModel:
    """One long-lived model of the base architecture; each recipe is written into it in place.

    Decoder-layer modules live in a pool keyed by what they hold, (models, seed, norms policy, layer recipe):
    a layer already materialized is reused as is, even at another depth, a repeated layer is copied from its
    twin, and up to `cache_layers` modules beyond those in use are kept (least recently used dropped), so the
    RL agent's skips and repeats are cheap. The tensors outside the layers are merged again only when `rest`,
    `head`, `norms`, the models or the seed change. A change of depth builds a new layer list and re-indexes
    `layer_idx` for the KV cache; the model itself is never rebuilt.

    `source_cache_bytes` (`workers.cache_gb`) bounds each of three stores beside the model: source tensors as
    stored, on the device (a `SourceMemo` keyed by model and tensor: small models merge without touching
    files; on the CPU they are views of the memory-mapped files and cost no memory), tensors derived from them
    (a second `SourceMemo`: task vectors, magnitude ranks, DARE masks, so a trim is float arithmetic, and in a
    reserved share of it every tensor's magnitude counts, so that other trims select in one slot), and, by
    default, the pooled layers beyond those in use (a search that changes every layer never reuses them). So a
    worker holds at most the model plus three times that budget (twice on the CPU), and its transients.

    The transients are one tensor's merge temporaries and, on the CPU, at most `HEAP_SLACK` of freed heap pages
    (`HeapTrim`). At 2 GB float32 with 1 GiB: model 1.98 + memo 1.07 + spare layers 1.03 + runtime 0.3 = 4.4 GB
    between candidates, 4.6 GB at the peak. Unset, the budget is `default_cache_bytes` (a quarter of the
    model, within [256 MiB, 1 GiB]).
    """

    def __init__(
        self,
        sources: Sources,
        device: torch.device | str = "cpu",
        cache_layers: int | None = None,
        source_cache_bytes: int | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.sources = sources
        self.device = torch.device(device)
        if source_cache_bytes is None:
            source_cache_bytes = default_cache_bytes(sum(_nbytes(sources, n) for n in sources.tensor_names()))
        self.source_cache = SourceMemo(source_cache_bytes)
        # Every tensor's magnitude counts per expert (a few MB) are reserved first: they serve the trims of
        # the tensors whose task vectors do not fit.
        summaries = len(sources.tensor_names()) * len(sources.experts) * MAGNITUDE_COUNTS_BYTES
        self.memo = SourceMemo(source_cache_bytes, reserved=min(summaries, source_cache_bytes // 4))
        config = AutoConfig.from_pretrained(sources.base_dir, trust_remote_code=trust_remote_code)
        if sources.vocabulary is not None:
            config.get_text_config(decoder=True).vocab_size = sources.vocabulary.rows
        dtype = getattr(config, "dtype", None) or torch.float32
        self._dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        # Weights are written by `materialize` before any use; random initialisation would only cost time
        # (minutes for a 7B model on CPU). Buffers such as rotary frequencies are still computed.
        with self.device, no_init_weights():
            model = AutoModelForCausalLM.from_config(
                config, dtype=self._dtype, trust_remote_code=trust_remote_code
            )
        model.tie_weights()  # part of the initialisation skipped above
        self.model = model.eval().requires_grad_(False)
        # The source depth's config, as the model set it up (attention implementation included): new layer
        # modules are built from it, as the source layer whose weights they will hold.
        self._layer_config = copy.deepcopy(self.model.config)
        names = sources.tensor_names()
        self.layout = ParamLayout(self.model, names, {n: sources.shape(n) for n in names}, sources.base_name)
        list_path = next((p for n in self.layout.targets if (p := sources.layer_prefix(n)) is not None), None)
        if list_path is None:
            raise SourceError(
                f"model '{sources.base_name}': no decoder-layer tensors (expected '*.layers.N.*')"
            )
        self._list_parent, _, self._list_attr = list_path.rpartition(".")
        self._layer_types: list[str] | None = getattr(self._layer_config, "layer_types", None)
        layers = self.model.get_submodule(list_path)
        self._layer_class: type[nn.Module] = type(layers[0])
        self._pool = [_PooledLayer(m, self._type_of(i)) for i, m in enumerate(layers)]
        if cache_layers is None:  # as many as the budget holds, at most a model's worth
            layer_bytes = max(sum(t.nbytes for t in self._pool[0].params.values()), 1)
            cache_layers = min(sources.num_layers, source_cache_bytes // layer_bytes)
        self.cache_layers = cache_layers
        self._rest_params = {
            n: p for n, p in self.model.state_dict(keep_vars=True).items() if sources.layer_of(n) is None
        }
        self._rest_key: tuple[Any, ...] | None = None
        self._clock = 0
        self.heap = HeapTrim()
        merged_tokenizer = sources.vocabulary.tokenizer if sources.vocabulary is not None else None
        self.tokenizer = merged_tokenizer or (
            AutoTokenizer.from_pretrained(sources.base_dir, trust_remote_code=trust_remote_code)
            if any((sources.base_dir / f).exists() for f in TOKENIZER_FILES)
            else None
        )

    def materialize(self, recipe: Recipe) -> MaterializeStats:
        """Write `recipe`'s weights into the model; raises RecipeError, SourceError or MaterializeError."""
        started = time.perf_counter()
        jobs = plan_merge(recipe, self.sources)
        merger = TensorMerger(recipe, self.sources, self.device, self.source_cache, self.memo)
        models = (recipe.models.base, *recipe.models.experts)
        per_layer: dict[int, list[TensorJob]] = {}
        params = self.layout.collector()  # merged checkpoint tensors -> the model's parameters
        with torch.no_grad():
            outside = {k: v for k, v in recipe.to_json().items() if k in ("format", "rest", "head", "norms")}
            rest_key = (models, recipe.seed, canonical_json(outside))
            if rest_key != self._rest_key:
                self._rest_key = None  # a failure half-way must not leave a stale key
                for job in jobs:
                    if job.layer is None:
                        self._write(merger, job, params, self._rest_params.__getitem__)
                self._rest_key = rest_key
            for job in jobs:
                if job.layer is not None:
                    per_layer.setdefault(job.layer, []).append(job)
            keys: list[LayerKey] = [
                (models, recipe.seed, recipe.format, recipe.norms, layer.key()) for layer in recipe.layers
            ]
            chosen, hits = self._assign(recipe, keys)
            merged = 0
            for i, entry in enumerate(chosen):
                if entry.key == keys[i]:
                    continue
                twin = next((e for e in chosen[:i] if e.key == keys[i]), None)
                if twin is not None:
                    for name, tensor in entry.params.items():
                        tensor.copy_(twin.params[name])
                    entry.unchanged, entry.numel = twin.unchanged, twin.numel
                    hits += 1
                else:
                    entry.unchanged = entry.numel = 0
                    in_layer = partial(self._layer_param, entry)
                    for job in per_layer[i]:
                        numel, unchanged = self._write(merger, job, params, in_layer)
                        entry.unchanged += unchanged
                        entry.numel += numel
                    merged += 1
                entry.key = keys[i]
        self._install(recipe, chosen)
        self.heap.trim()
        total = sum(e.numel for e in chosen)
        return MaterializeStats(
            seconds=time.perf_counter() - started,
            sparsity=sum(e.unchanged for e in chosen) / total if total else 0.0,
            cache_hits=hits,
            layers_merged=merged,
            depth=len(chosen),
        )

    def _write(
        self,
        merger: TensorMerger,
        job: TensorJob,
        params: ParamCollector,
        param: Callable[[str], torch.Tensor],
    ) -> tuple[int, int]:
        """Merge `job` into the model's parameters (`param` gives a parameter's tensor by its name in the
        model) and return the merged tensor's size and unchanged entries. A checkpoint tensor that is one
        parameter as is, of its dtype, is merged straight into it (`MergeContext.destination`); others go
        through the layout's conversions (e.g. fused MoE experts), as `from_pretrained` loads them."""
        name = self.layout.plain.get(job.source)
        destination = None if name is None else param(name)
        if destination is not None and destination.dtype != self.sources.dtype(job.source):
            destination = None
        out, unchanged = merger.merge(job, destination)
        if out is not destination:
            for target, value in params.add(job.source, out).items():
                param(target).copy_(value)
        self.heap.check()
        return out.numel(), unchanged

    def _layer_param(self, entry: _PooledLayer, name: str) -> torch.Tensor:
        """Pooled layer `entry`'s tensor of the model's parameter `name` (of whichever layer it names)."""
        return entry.params[self.sources.layer_of(name)[1]]

    def _assign(self, recipe: Recipe, keys: list[LayerKey]) -> tuple[list[_PooledLayer], int]:
        """Pick a pooled module for each output layer: one holding its key if any, else the least recently
        used free one of the right attention type (its key cleared), else a new one."""
        self._clock += 1
        free = list(self._pool)
        chosen: list[_PooledLayer | None] = [None] * len(keys)
        hits = 0
        for i, key in enumerate(keys):
            entry = next((e for e in free if e.key == key), None)
            if entry is not None:
                chosen[i] = entry
                free.remove(entry)
                hits += 1
        for i, layer in enumerate(recipe.layers):
            if chosen[i] is not None:
                continue
            wanted = self._type_of(layer.from_)
            candidates = [e for e in free if e.layer_type == wanted]
            empty = [e for e in candidates if e.key is None]
            if empty or (candidates and len(self._pool) >= len(keys) + self.cache_layers):
                entry = empty[0] if empty else min(candidates, key=lambda e: e.last_used)
                free.remove(entry)
            else:
                entry = self._new_layer(layer.from_)
                self._pool.append(entry)
            entry.key = None
            chosen[i] = entry
        for entry in chosen:
            entry.last_used = self._clock
        kept = sorted((e for e in free if e.key is not None), key=lambda e: e.last_used, reverse=True)
        self._pool = [*chosen, *kept[: self.cache_layers]]
        return chosen, hits

    def _install(self, recipe: Recipe, chosen: list[_PooledLayer]) -> None:
        """Make `chosen` the model's layer list, with config depth and per-layer indices to match."""
        for i, entry in enumerate(chosen):
            for module in entry.module.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = i
        setattr(
            self.model.get_submodule(self._list_parent),
            self._list_attr,
            nn.ModuleList(e.module for e in chosen),
        )
        config = self.model.config
        config.num_hidden_layers = len(chosen)
        if self._layer_types is not None:
            config.layer_types = [self._layer_types[layer.from_] for layer in recipe.layers]

    def _new_layer(self, source_layer: int) -> _PooledLayer:
        """A fresh decoder layer built as source layer `source_layer` is (e.g. its attention type)."""
        with self.device, default_dtype(self._dtype), no_init_weights():
            module = self._layer_class(self._layer_config, layer_idx=source_layer)
        module = module.eval().requires_grad_(False)
        return _PooledLayer(module, self._type_of(source_layer))

    def _type_of(self, source_layer: int) -> tuple[str | None, frozenset[str]]:
        attention = self._layer_types[source_layer] if self._layer_types else None
        return attention, self.sources.layer_kind(source_layer)


# ----------------------------------------------------------------------------------------------------
# Streaming to disk
# ----------------------------------------------------------------------------------------------------


def write_merged(
    recipe: Recipe,
    sources: Sources,
    out: Path,
    shard_size: int = 2 * 1024**3,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the merged model to `out` as a Hugging Face folder and return `out`.

    Tensors are written into the shard files as they are merged (every shape and dtype is known up front, so
    each file's safetensors header is written first and the data streamed after it), so memory stays at one
    tensor's worth. The folder is built under a temporary name beside `out` and renamed at the end: a failure
    never leaves a folder that looks complete. `progress(done, total)` counts tensors.
    """
    out = Path(out)
    jobs = plan_merge(recipe, sources)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        shards = _shard(jobs, sources, shard_size)
        merger = TensorMerger(recipe, sources, device)
        done = 0
        weight_map: dict[str, str] = {}
        for file, shard in shards:
            for job in _write_shard(partial / file, shard, sources, merger):
                weight_map[job.out] = file
                done += 1
                if progress is not None:
                    progress(done, len(jobs))
        if len(shards) > 1:
            total = sum(_nbytes(sources, job.source) for job in jobs)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (partial / "config.json").write_text(
            json.dumps(merged_config(recipe, sources), indent=2, sort_keys=True)
        )
        (partial / RECIPE_FILE).write_text(json.dumps(recipe.to_json(), indent=2, sort_keys=True))
        if sources.vocabulary is not None and sources.vocabulary.tokenizer is not None:
            sources.vocabulary.tokenizer.save_pretrained(partial)  # a union vocabulary: its own tokenizer
        for pattern in COPIED_FILES:
            for path in sources.base_dir.glob(pattern):
                if path.is_file() and not (partial / path.name).exists():
                    shutil.copy2(path, partial / path.name)
        if out.exists():
            out.rmdir()
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in `dtype` the way from_config(dtype=...) does: float buffers that a module keeps in
    float32 on purpose (e.g. rotary frequencies) stay float32, unlike after `module.to(dtype)`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _nbytes(sources: Sources, name: str) -> int:
    """Bytes of source tensor `name` as the merged model stores it."""
    return math.prod(sources.shape(name)) * sources.dtype(name).itemsize


def _shard(jobs: list[TensorJob], sources: Sources, shard_size: int) -> list[tuple[str, list[TensorJob]]]:
    """Group tensors, in order, into shards of at most `shard_size` bytes (a larger tensor gets its own)."""
    groups: list[list[TensorJob]] = [[]]
    filled = 0
    for job in jobs:
        size = _nbytes(sources, job.source)
        if groups[-1] and filled + size > shard_size:
            groups.append([])
            filled = 0
        groups[-1].append(job)
        filled += size
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", group) for i, group in enumerate(groups)]


def _write_shard(
    path: Path, jobs: list[TensorJob], sources: Sources, merger: TensorMerger
) -> Iterator[TensorJob]:
    """Write one safetensors file: the header (offsets planned from shapes), then each tensor as it is merged.

    safetensors can only save a complete dict of tensors, which would hold a whole shard in memory; the format
    is a little-endian u64 header length, a JSON header padded to 8 bytes, and the raw data, so it is written
    directly. Yields each job once its tensor is on disk.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        size = _nbytes(sources, job.source)
        header[job.out] = {
            "dtype": _DTYPE_NAMES[sources.dtype(job.source)],
            "shape": list(sources.shape(job.source)),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for job in jobs:
            tensor = merger.merge(job)[0].to("cpu").contiguous()
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
            yield job
