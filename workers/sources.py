"""Model sources: a base and its experts, Hugging Face folders read lazily through safetensors.

Every check that can fail without reading weights runs in the constructor (folders, configs, headers, tensor
names, shapes, dtypes), so a bad expert stops a job before any merge work. Weights are memory-mapped by
`safetensors.safe_open` and read one tensor at a time by `load`; a whole model is never in memory.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer

from workers.lora import CONFIG_FILE as ADAPTER_CONFIG
from workers.lora import LoraError, LoraModel

ModuleClass = Literal["attn", "mlp", "norm", "embed", "head", "other"]
TokenizerSource = Literal["base", "union"]

INDEX_FILE = "model.safetensors.index.json"

# safetensors header dtype strings (the format's spec) to torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.+\.)?layers)\.(?P<index>\d+)\.(?P<suffix>.+)$")


class SourceError(ValueError):
    """A model folder that cannot be merged; the one-line message names the model and the tensor or file."""


class _Model:
    """One opened model folder: its config and a memory-mapped handle per safetensors file."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = folder
        if not folder.is_dir():
            raise SourceError(f"model '{name}': folder {folder} does not exist")
        self.config = _read_json(name, folder / "config.json")
        self.tensors: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # name -> (file, dtype, shape)
        self._handles: dict[str, object] = {}
        index = folder / INDEX_FILE
        if index.exists():
            weight_map = _read_json(name, index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise SourceError(f"model '{name}': {index} has no 'weight_map'")
            by_file: dict[str, list[str]] = {}
            for tensor, file in weight_map.items():
                by_file.setdefault(file, []).append(tensor)
            for file, wanted in sorted(by_file.items()):
                present = self._open(folder / file)
                for tensor in wanted:
                    if tensor not in present:
                        raise SourceError(f"model '{name}': tensor '{tensor}' is not in {folder / file}")
                    self.tensors[tensor] = (file, *present[tensor])
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise SourceError(f"model '{name}': no *.safetensors files in {folder}")
            for path in files:
                for tensor, meta in self._open(path).items():
                    if tensor in self.tensors:
                        raise SourceError(
                            f"model '{name}': tensor '{tensor}' is in both "
                            f"{self.tensors[tensor][0]} and {path.name}"
                        )
                    self.tensors[tensor] = (path.name, *meta)

    def _open(self, path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Open one file (header only; the data stays mapped) and return its tensors' dtypes and shapes."""
        if not path.is_file():
            raise SourceError(f"model '{self.name}': safetensors file {path} does not exist")
        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise SourceError(
                f"model '{self.name}': corrupt or truncated safetensors file {path}: {exc}"
            ) from None
        self._handles[path.name] = handle
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for tensor in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            view = handle.get_slice(tensor)
            out[tensor] = (view.get_dtype(), tuple(view.get_shape()))
        return out

    def read(self, tensor: str) -> torch.Tensor:
        return self._handles[self.tensors[tensor][0]].get_tensor(tensor)


class Sources:
    """A base model and its experts, validated against each other and read tensor by tensor."""

    def __init__(
        self,
        base: Path,
        experts: dict[str, Path],
        base_name: str = "base",
        trust_remote_code: bool = False,
        tokenizer_source: TokenizerSource = "base",
    ) -> None:
        """`tokenizer_source` is the merged model's vocabulary when an expert's differs from the base's by
        added tokens, as mergekit's: `base` keeps the base's tokens (an expert's added rows are dropped, rows it
        lacks are the base's), `union` adds every expert's tokens (see `Vocabulary`)."""
        if not experts:
            raise SourceError("sources: at least one expert is needed")
        if base_name in experts:
            raise SourceError(f"model '{base_name}': an expert has the base's name")
        self.base_name = base_name
        self.base_dir = Path(base)
        self._models: dict[str, _Model | LoraModel] = {base_name: _Model(base_name, self.base_dir)}
        self._finite: set[tuple[str, str]] = set()
        base_model = self._models[base_name]
        for name, folder in experts.items():
            self._models[name] = _open_expert(name, Path(folder), base_model)
        self.config: dict = base_model.config
        self.num_layers: int = int(self.config.get("num_hidden_layers", 0))
        try:
            hf_config = AutoConfig.from_pretrained(self.base_dir, trust_remote_code=trust_remote_code)
        except (ValueError, OSError, KeyError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SourceError(
                f"model '{base_name}': {self.base_dir / 'config.json'} is not usable: {first}"
            ) from None
        text_config = hf_config.get_text_config(decoder=True)
        self.tied_embeddings: bool = bool(getattr(text_config, "tie_word_embeddings", False))
        rows = getattr(text_config, "vocab_size", None)
        self.vocab_tensors: frozenset[str] = frozenset(
            t
            for t, (_, _, shape) in base_model.tensors.items()
            if self.module_class(t) in ("embed", "head") and shape and shape[0] == rows
        )
        """The tensors indexed by token (embeddings, an untied head): an expert's may have other rows."""
        for name in self.experts:
            self._check_expert(self._models[name], base_model)
        self._names = sorted(
            t for t in base_model.tensors if not (self.tied_embeddings and self.module_class(t) == "head")
        )
        self._check_layers()
        self.vocabulary: Vocabulary | None = None
        """How each model's token rows map to the merged model's; None when every model has the base's."""
        row_counts = {n: self._rows(n) for n in self._models}
        if self.vocab_tensors and (tokenizer_source == "union" or len(set(row_counts.values())) > 1):
            self.vocabulary = Vocabulary(
                {n: m.folder for n, m in self._models.items()}, row_counts, base_name, tokenizer_source,
                trust_remote_code,
            )

    @property
    def names(self) -> list[str]:
        """Model names, base first."""
        return list(self._models)

    @property
    def experts(self) -> list[str]:
        return [n for n in self._models if n != self.base_name]

    def tensor_names(self) -> list[str]:
        """The tensors to merge, sorted; a tied output head is left out (it is the embedding, merged once)."""
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name` in the merged model (a vocabulary tensor has the merged vocabulary's rows)."""
        shape = self._models[self.base_name].tensors[name][2]
        if self.vocabulary is not None and name in self.vocab_tensors:
            return (self.vocabulary.rows, *shape[1:])
        return shape

    def _rows(self, model: str) -> int:
        """How many token rows `model`'s vocabulary tensors have."""
        tensors = self._models[model].tensors
        return next((tensors[t][2][0] for t in sorted(self.vocab_tensors) if t in tensors), 0)

    def dtype(self, name: str) -> torch.dtype:
        """The base's dtype for a tensor: the dtype of the merged output."""
        return SAFETENSORS_DTYPES[self._models[self.base_name].tensors[name][1]]

    @staticmethod
    def layer_of(name: str) -> tuple[int, str] | None:
        """(layer index, name inside the layer) for a decoder-layer tensor, else None."""
        match = _LAYER_NAME.match(name)
        return (int(match["index"]), match["suffix"]) if match else None

    @staticmethod
    def layer_prefix(name: str) -> str | None:
        """The layer list's path for a decoder-layer tensor, e.g. 'model.layers'."""
        match = _LAYER_NAME.match(name)
        return match["prefix"] if match else None

    @staticmethod
    def module_class(name: str) -> ModuleClass:
        """Module class of a tensor by its name. Norms win over attn/mlp (e.g. a q_norm is a norm), as in the
        sparsity anatomy (ALGORITHMS.md §3), which counts two norms per Llama layer."""
        parts = name.lower().split(".")
        leaf = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
        if "lm_head" in parts or leaf in ("embed_out", "output"):
            return "head"
        if "embed" in leaf or leaf in ("wte", "wpe"):
            return "embed"
        if "norm" in leaf or leaf.startswith("ln"):
            return "norm"
        if any("attn" in p or "attention" in p for p in parts):
            return "attn"
        if any("mlp" in p or "moe" in p or p in ("feed_forward", "ffn", "experts") for p in parts):
            return "mlp"
        return "other"

    def load(
        self, model: str, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32
    ) -> torch.Tensor:
        """One tensor of one model as `dtype` (None: as stored) on `device`; NaN or Inf raises SourceError
        naming both. A vocabulary tensor comes with the merged vocabulary's rows (see `Vocabulary.align`), in
        float32 (its rows are averaged). On the CPU a tensor kept as stored is a view of the memory-mapped
        file: it costs page cache, not memory."""
        if self.vocabulary is not None and name in self.vocab_tensors:
            return self.vocabulary.align(model, lambda m: self._read(m, name, device, torch.float32))
        return self._read(model, name, device, dtype)

    def _read(
        self, model: str, name: str, device: torch.device | str, dtype: torch.dtype | None
    ) -> torch.Tensor:
        source = self._models.get(model)
        if source is None:
            raise SourceError(f"model '{model}' is not among the sources ({', '.join(self._models)})")
        if name not in source.tensors:
            raise SourceError(f"model '{model}': no tensor '{name}'")
        tensor = source.read(name)
        tensor = tensor.to(device=device, dtype=dtype or tensor.dtype)
        if (model, name) not in self._finite:
            if not all_finite(tensor):
                raise SourceError(f"model '{model}': tensor '{name}' contains NaN or Inf")
            self._finite.add((model, name))  # sources never change: each tensor is checked once
        return tensor

    def _check_expert(self, expert: _Model, base: _Model) -> None:
        for key in ("architectures", "model_type", "num_hidden_layers"):
            if expert.config.get(key) != base.config.get(key):
                raise SourceError(
                    f"model '{expert.name}': config {key} is {expert.config.get(key)!r}, "
                    f"base has {base.config.get(key)!r}"
                )
        for tensor, (_, dtype, shape) in base.tensors.items():
            if tensor not in expert.tensors:
                if self.tied_embeddings and self.module_class(tensor) == "head":
                    continue
                raise SourceError(f"model '{expert.name}': tensor '{tensor}' is missing")
            _, e_dtype, e_shape = expert.tensors[tensor]
            vocab = _vocab_size(expert.config)
            if e_shape != shape and not (
                tensor in self.vocab_tensors and e_shape[0] == vocab and e_shape[1:] == shape[1:]
            ):
                raise SourceError(
                    f"model '{expert.name}': tensor '{tensor}' has shape {list(e_shape)}, "
                    f"base has {list(shape)}"
                )
            if e_dtype != dtype:
                raise SourceError(f"model '{expert.name}': tensor '{tensor}' is {e_dtype}, base is {dtype}")
        extra = sorted(
            t
            for t in set(expert.tensors) - set(base.tensors)
            if not (self.tied_embeddings and self.module_class(t) == "head")
        )
        if extra:
            raise SourceError(f"model '{expert.name}': tensor '{extra[0]}' is not in the base")

    def layer_kind(self, layer: int) -> frozenset[str]:
        """What decoder layer `layer` is made of (its tensors' names inside the layer): layers of one kind are
        interchangeable; a model may mix kinds (e.g. dense and MoE layers)."""
        return self._kinds[layer]

    def _check_layers(self) -> None:
        kinds: dict[int, set[str]] = {}
        for t in self._names:
            if (layer := self.layer_of(t)) is not None:
                kinds.setdefault(layer[0], set()).add(layer[1])
        self._kinds = {i: frozenset(names) for i, names in kinds.items()}
        seen = set(kinds)
        if seen != set(range(self.num_layers)):
            raise SourceError(
                f"model '{self.base_name}': config num_hidden_layers = {self.num_layers}, "
                f"but the tensors cover layers {sorted(seen)}"
            )
        prefixes = {p for t in self._names if (p := self.layer_prefix(t)) is not None}
        if len(prefixes) > 1:
            raise SourceError(
                f"model '{self.base_name}': more than one layer list ({', '.join(sorted(prefixes))})"
            )


class Vocabulary:
    """The merged model's token rows and, per model, where each comes from: mergekit's `tokenizer_source`.

    Tokens are matched by their text through each model's tokenizer (a model without one is taken to share
    the base's, as mergekit does), so an added token is found wherever its id is. `base`: the merged
    vocabulary is the base's (its rows, ids and tokenizer). `union`: the base's, then every model's tokens
    the base lacks, appended as mergekit's union tokenizer adds them (regular tokens, then added ones, in
    model order). A row a model lacks is filled as mergekit fills it: the only model that has the token gives
    it; else the base's row if the base has it; else the mean of the models that have it; else zeros. Rows
    past a tokenizer's length (padding of a vocabulary rounded up) belong to no token and keep their index.
    """

    def __init__(
        self,
        folders: dict[str, Path],
        rows: dict[str, int],
        base: str,
        source: TokenizerSource,
        trust_remote_code: bool = False,
    ) -> None:
        tokenizers = {}
        for name, folder in folders.items():
            try:
                tokenizers[name] = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            except (OSError, ValueError, TypeError):  # no usable tokenizer files: the base's tokens
                if name == base:
                    raise SourceError(
                        f"model '{base}': its tokenizer is needed to match the experts' vocabularies, but "
                        f"{folder} has none"
                    ) from None
        vocabs = {
            n: {t: i for t, i in tokenizers.get(n, tokenizers[base]).get_vocab().items() if i < rows[n]}
            for n in folders
        }
        self.tokenizer: Any | None = None if source == "base" else self._union(tokenizers, vocabs)
        """The merged model's tokenizer when it is not the base's (`union`), to write with the model."""
        merged = tokenizers[base] if self.tokenizer is None else self.tokenizer
        out = {t: i for t, i in merged.get_vocab().items() if source == "union" or i < rows[base]}
        self.rows = max(rows[base], max(out.values(), default=-1) + 1)
        token_of = {i: t for t, i in out.items()}
        index = {
            name: [
                vocabs[name].get(token_of[r], -1) if r in token_of else (r if r < rows[name] else -1)
                for r in range(self.rows)
            ]
            for name in folders
        }
        self.index = {name: torch.tensor(rows_of, dtype=torch.long) for name, rows_of in index.items()}
        """Per model, its row for each merged row (-1: it lacks that token)."""
        self.donors: dict[int, list[str]] = {}
        """For each row some model lacks: the models whose rows are averaged in its place (none: zeros)."""
        for r in range(self.rows):
            having = [n for n in folders if index[n][r] >= 0]
            if len(having) < len(folders):
                self.donors[r] = having if len(having) <= 1 or base not in having else [base]

    @staticmethod
    def _union(tokenizers: dict[str, Any], vocabs: dict[str, dict[str, int]]) -> Any:
        """The base's tokenizer with every other model's tokens added, model by model as mergekit's union
        tokenizer adds them (in id order here, where mergekit follows `get_vocab()`'s unordered dict); an
        added token keeps its settings (special or not)."""
        models = iter(tokenizers)
        out = copy.deepcopy(tokenizers[next(models)])
        known = set(out.get_vocab())
        for name in models:
            added = {a.content: a for a in tokenizers[name].added_tokens_decoder.values()}
            for token, _ in sorted(vocabs[name].items(), key=lambda item: item[1]):
                if token not in known:
                    out.add_tokens([added.get(token, token)])
                    known.add(token)
        return out

    def align(self, model: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """`model`'s vocabulary tensor (read with `read(model)`) with the merged vocabulary's rows."""
        own = read(model)
        index = self.index[model].to(own.device)
        out = own.new_zeros((self.rows, *own.shape[1:]))
        present = index >= 0
        out[present] = own[index[present]]
        lacking = (~present).nonzero().flatten().tolist()
        donors = {d for r in lacking for d in self.donors[r]}
        tensors = {d: own if d == model else read(d) for d in donors}
        for r in lacking:
            if self.donors[r]:
                out[r] = torch.stack([tensors[d][self.index[d][r]] for d in self.donors[r]]).mean(0)
        return out


def _open_expert(name: str, folder: Path, base: _Model) -> _Model | LoraModel:
    """An expert folder: a full model, or a PEFT LoRA adapter applied to the base tensor by tensor."""
    if (folder / ADAPTER_CONFIG).is_file():
        try:
            return LoraModel(name, folder, base)
        except LoraError as exc:
            raise SourceError(str(exc)) from None
    return _Model(name, folder)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in `tensor`. A sum is a fast exact test except when finite values overflow it, which
    only the (slower) elementwise test can tell apart."""
    return math.isfinite(tensor.sum().item()) or bool(torch.isfinite(tensor).all())


def _vocab_size(config: dict) -> int | None:
    """A config.json's vocabulary size (a multimodal model keeps it in its text config)."""
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


def _read_json(model: str, path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SourceError(f"model '{model}': {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"model '{model}': {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"model '{model}': {path} is not a JSON object")
    return data
