"""LoRA adapters as experts: a PEFT folder read as the base model plus its low-rank updates, tensor by tensor.

A PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`) has no full weights. `LoraModel`
presents it as a model with the base's config and tensor table, and computes each tensor when it is read:
W = W_base + scale · B @ A for the modules the adapter targets (transposed for `fan_in_fan_out` layers and for
embeddings, whose PEFT factors are stored the other way round), on the saved tensor for `modules_to_save` and
saved embedding layers, else on the base tensor. Only one tensor and its two factors are ever in memory.

The scale is PEFT's: lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`, where r and alpha follow the
adapter's `rank_pattern` and `alpha_pattern` (matched as PEFT matches them). PEFT variants whose merge is not
W + scale · B @ A (DoRA, LoRA biases, other PEFT types) are refused with one line naming the adapter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
"""PEFT saves its tensors under the wrapped model's name."""
FACTORS = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
"""Key suffix → (factor, embedding layout). PEFT stores an embedding's factors as A [r, vocab], B [dim, r]."""
UNSUPPORTED_FLAGS = (
    "use_dora",
    "lora_bias",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
)
"""adapter_config.json options whose merge is not W + scale · B @ A on the saved modules."""


class BaseModelTensors(Protocol):
    """What a LoRA needs of its base: the interface of `workers.sources._Model`."""

    name: str
    config: dict
    tensors: dict[str, tuple[str, str, tuple[int, ...]]]

    def read(self, tensor: str) -> torch.Tensor: ...


class LoraError(ValueError):
    """An adapter that cannot be applied; the one-line message names the adapter and the tensor or option."""


@dataclass(frozen=True)
class _Update:
    """A low-rank update of one base tensor: keys of its factors in the adapter file, and its scale."""

    a: str
    b: str
    scale: float
    transpose: bool


class LoraModel:
    """A PEFT LoRA folder seen as a full model: the base's config and tensors, each with its update applied."""

    def __init__(self, name: str, folder: Path, base: BaseModelTensors) -> None:
        self.name = name
        self.folder = folder
        self.base = base
        self.config = base.config
        self.tensors = dict(base.tensors)
        settings = self._settings(folder / CONFIG_FILE)
        path = folder / WEIGHTS_FILE
        if not path.is_file():
            raise LoraError(f"model '{name}': {path} does not exist (only safetensors adapters are read)")
        try:
            self._handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise LoraError(f"model '{name}': corrupt or truncated safetensors file {path}: {exc}") from None
        keys = list(self._handle.keys())
        self._replaced: dict[str, str] = {}  # base tensor -> adapter key holding its full new value
        factors: dict[str, dict[str, str]] = {}  # module -> {"A": key, "B": key}
        embedding: dict[str, bool] = {}
        for key in keys:
            if not key.startswith(PREFIX):
                raise LoraError(f"model '{name}': tensor '{key}' in {path} is not under '{PREFIX}'")
            inner = key.removeprefix(PREFIX)
            if "lora_magnitude_vector" in inner:
                raise LoraError(f"model '{name}': DoRA adapters are not supported ('{key}')")
            suffix = next((s for s in FACTORS if inner.endswith(s)), None)
            if suffix is not None:
                module = inner.removesuffix(suffix)
                factor, is_embedding = FACTORS[suffix]
                factors.setdefault(module, {})[factor] = key
                embedding[module] = is_embedding
                continue
            target = inner.replace(".base_layer.", ".")
            if ".lora_" in inner:
                raise LoraError(f"model '{name}': tensor '{key}' is not a LoRA factor this reader knows")
            self._require_base(target, self._shape(key))
            self._replaced[target] = key
        self._updates: dict[str, _Update] = {}
        for module, pair in factors.items():
            if set(pair) != {"A", "B"}:
                raise LoraError(f"model '{name}': module '{module}' has lora_A or lora_B but not both")
            a_shape, b_shape = self._shape(pair["A"]), self._shape(pair["B"])
            rank = a_shape[0]
            if b_shape[1] != rank:
                raise LoraError(
                    f"model '{name}': module '{module}': lora_B {list(b_shape)} does not fit lora_A {list(a_shape)}"
                )
            self._check_targeted(module, settings["target_modules"])
            transpose = embedding[module] or bool(settings["fan_in_fan_out"])
            out_shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
            target = f"{module}.weight"
            self._require_base(target, out_shape)
            alpha = float(_pattern_value(settings["alpha_pattern"], module, settings["lora_alpha"]))
            scale = alpha / math.sqrt(rank) if settings["use_rslora"] else alpha / rank
            self._updates[target] = _Update(pair["A"], pair["B"], scale, transpose)

    def _settings(self, path: Path) -> dict[str, Any]:
        """The adapter_config.json fields the merge depends on, refusing what W + scale · B @ A cannot merge."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LoraError(f"model '{self.name}': {path} is not readable JSON ({exc})") from None
        if not isinstance(data, dict):
            raise LoraError(f"model '{self.name}': {path} is not a JSON object")
        if data.get("peft_type", "LORA") != "LORA":
            raise LoraError(
                f"model '{self.name}': PEFT type {data['peft_type']} is not supported (only LoRA adapters)"
            )
        for flag in UNSUPPORTED_FLAGS:
            if data.get(flag):
                raise LoraError(f"model '{self.name}': {path.name} sets '{flag}', which is not supported")
        if "lora_alpha" not in data:
            raise LoraError(f"model '{self.name}': {path.name} has no 'lora_alpha'")
        return {
            "lora_alpha": data["lora_alpha"],
            "alpha_pattern": data.get("alpha_pattern") or {},
            "use_rslora": bool(data.get("use_rslora")),
            "fan_in_fan_out": bool(data.get("fan_in_fan_out")),
            "target_modules": data.get("target_modules"),
        }

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(key).get_shape())

    def _require_base(self, tensor: str, shape: tuple[int, ...]) -> None:
        if tensor not in self.base.tensors:
            raise LoraError(f"model '{self.name}': the adapter changes '{tensor}', which is not in the base")
        base_shape = self.base.tensors[tensor][2]
        if tuple(base_shape) != tuple(shape):
            raise LoraError(
                f"model '{self.name}': the adapter's '{tensor}' has shape {list(shape)}, base has {list(base_shape)}"
            )

    def _check_targeted(self, module: str, targets: str | list[str] | None) -> None:
        """PEFT's target_modules rule: a string is a regex on the full module name, a list of name suffixes."""
        if targets is None or targets == "all-linear":
            return
        hit = (
            re.fullmatch(targets, module) is not None
            if isinstance(targets, str)
            else any(module == t or module.endswith(f".{t}") for t in targets)
        )
        if not hit:
            raise LoraError(
                f"model '{self.name}': module '{module}' has LoRA factors but is not in target_modules"
            )

    def read(self, tensor: str) -> torch.Tensor:
        """The adapted tensor in float32 (the base's tensor when the adapter leaves it alone)."""
        saved = self._replaced.get(tensor)
        weight = (self._handle.get_tensor(saved) if saved else self.base.read(tensor)).float()
        update = self._updates.get(tensor)
        if update is None:
            return weight
        delta = self._handle.get_tensor(update.b).float() @ self._handle.get_tensor(update.a).float()
        return torch.add(weight, delta.T if update.transpose else delta, alpha=update.scale)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """The value of the first pattern matching the module name, as PEFT's `get_pattern_key` matches."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default
