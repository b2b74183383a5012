"""Which checkpoint tensors make which parameters of a model, by transformers' own loading conversions.

In transformers 5 a module's parameter names need not be the checkpoint's tensor names: a head may be renamed
(GPT-NeoX's `embed_out` is `lm_head`), and MoE experts stored one tensor per expert are fused into one
parameter per layer (`experts.*.w1` + `experts.*.w3` -> `experts.gate_up_proj`). `from_pretrained` applies the
model's registered `WeightRenaming`/`WeightConverter` list; `ParamLayout` applies the very same list (found by
`get_model_conversion_mapping`, keys renamed by `rename_source_key`, tensors converted by the converter's own
`convert`), so weights written into a resident model equal what `from_pretrained` loads from a written folder.
Merging stays on checkpoint tensors; only the write into the module goes through the conversion. The other way,
`revert_weight_conversion` (what `save_pretrained` uses) names the checkpoint tensor a parameter would need.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.utils.loading_report import LoadStateDictInfo

from workers.sources import SourceError


@dataclass(frozen=True)
class ParamGroup:
    """Checkpoint tensors that together make one or more parameters (one to one for a plain tensor)."""

    key: str
    """The name transformers gives the group while loading: its first parameter."""
    sources: tuple[str, ...]
    """Checkpoint tensor names, in the order `from_pretrained` collects them (natural sort)."""
    patterns: tuple[str, ...]
    """The converter's source pattern each checkpoint tensor matched."""
    converter: WeightConverter | None
    """None: the tensor is the parameter `key` as is (possibly renamed)."""

    def convert(self, tensors: list[torch.Tensor], model: PreTrainedModel) -> dict[str, torch.Tensor]:
        """Parameter name -> value, from this group's checkpoint tensors (in `sources` order)."""
        if self.converter is None:
            return {self.key: tensors[0]}
        converter = copy.deepcopy(self.converter)  # a converter collects tensors: one fresh copy per use
        for name, pattern, tensor in zip(self.sources, self.patterns, tensors, strict=True):
            converter.add_tensor(self.key, name, pattern, tensor)
        out = converter.convert(self.key, model=model, config=model.config)
        return {k: v[0] if isinstance(v, list) else v for k, v in out.items()}


class ParamLayout:
    """The checkpoint -> parameter map of `model` for the checkpoint tensors `names`, checked both ways: every
    parameter is made by some tensors, every tensor lands in some parameter, with the parameter's shape.

    Raises SourceError naming `model_name` and the tensor (or the parameter and the tensor it would need).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        names: Iterable[str],
        shapes: dict[str, tuple[int, ...]],
        model_name: str,
    ) -> None:
        self.model = model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        state = model.state_dict()
        members: dict[str, list[tuple[str, str | None]]] = {}
        unexpected: dict[str, str] = {}
        for name in sorted(names, key=dot_natural_key):
            key, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
            if key not in state and name in state:
                key, pattern = name, None
            if key not in state:
                unexpected[key] = name
                continue
            members.setdefault(key, []).append((name, pattern))
        # What from_pretrained ignores (e.g. old GPT-NeoX checkpoints' causal-mask buffers), by its own rules.
        info = LoadStateDictInfo(set(), set(unexpected), set(), [], {}, set())
        model._adjust_missing_and_unexpected_keys(info)
        if info.unexpected_keys:
            first = unexpected[min(info.unexpected_keys)]
            raise SourceError(
                f"model '{model_name}': tensor '{first}' is not a parameter of {type(model).__name__}"
            )
        self.ignored = frozenset(unexpected.values())
        """Checkpoint tensors that loading ignores: merged like any other, never written into the model."""
        self.groups: list[ParamGroup] = []
        for key, group in members.items():
            pattern = group[0][1]
            self.groups.append(
                ParamGroup(
                    key=key,
                    sources=tuple(n for n, _ in group),
                    patterns=tuple(p or n for n, p in group),
                    converter=None if pattern is None else by_pattern[pattern],
                )
            )
        self.group_of = {name: g for g in self.groups for name in g.sources}
        self.plain = {g.sources[0]: g.key for g in self.groups if g.converter is None}
        """Checkpoint tensor -> the parameter it is as is (no conversion): a merge may write straight into it."""
        self.targets: dict[str, ParamGroup] = {}
        for group in self.groups:
            probes = [torch.empty(shapes[n], device="meta") for n in group.sources]
            for target, value in group.convert(probes, model).items():
                param = state.get(target)
                if param is None:
                    raise SourceError(
                        f"model '{model_name}': tensor '{group.sources[0]}' makes '{target}', "
                        f"which is not a parameter of {type(model).__name__}"
                    )
                if tuple(value.shape) != tuple(param.shape):
                    raise SourceError(
                        f"model '{model_name}': tensor '{group.sources[0]}' makes parameter '{target}' of "
                        f"shape {list(value.shape)}, the model's is {list(param.shape)}"
                    )
                self.targets[target] = group
        missing = [n for n, _ in model.named_parameters() if n not in self.targets]
        if missing:
            wanted = revert_weight_conversion(model, {missing[0]: state[missing[0]]})
            raise SourceError(
                f"model '{model_name}': no tensor '{next(iter(wanted), missing[0])}' "
                f"for the model's parameter '{missing[0]}'"
            )

    def collector(self) -> ParamCollector:
        return ParamCollector(self)


class ParamCollector:
    """Turns checkpoint tensors, given one at a time, into parameters as soon as their group is complete; a
    plain tensor passes straight through, a fused parameter waits for all of its tensors."""

    def __init__(self, layout: ParamLayout) -> None:
        self.layout = layout
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter name -> value for what checkpoint tensor `name` completes (empty while a group waits)."""
        if name in self.layout.ignored:
            return {}
        group = self.layout.group_of[name]
        if group.converter is None:
            return {group.key: tensor}
        bucket = self._pending.setdefault(group.key, {})
        bucket[name] = tensor
        if len(bucket) < len(group.sources):
            return {}
        del self._pending[group.key]
        return group.convert([bucket[n] for n in group.sources], self.layout.model)
