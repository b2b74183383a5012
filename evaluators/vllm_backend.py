"""vLLM backend (optional extra `vllm`): generation on an engine the worker keeps for its whole life.

Starting an engine costs tens of seconds (weights, KV cache, CUDA graphs), so a worker starts one, from the
base model's folder, and between candidates only the weights change: the resident model's tensors are written
into the running engine through vLLM's weight-loading path (`load_weights` on the engine's model, the path
vLLM's RLHF examples use; it takes Hugging Face names and fills vLLM's fused qkv/gate_up tensors itself),
never saved and reloaded, and the prefix cache is dropped, since its KV blocks were computed with the previous
weights. The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so `collective_rpc` calls the
loading function directly on the engine's worker with the resident tensors: a device copy, not a
serialisation of the weights to another process.

Generation is greedy, with the task's `max_new_tokens` and stop strings, one `generate` call per task so that
vLLM batches all of a task's prompts itself; prompts go in as token ids from the worker's tokenizer, exactly
as the Hugging Face backend encodes them. Scores come from the same metrics. Log-likelihood scoring (choice
tasks, `token_likelihood`) runs on the resident model through the Hugging Face backend, which is up to date
with the engine, as do lm-eval tasks (through lm-eval's HFLM). vLLM is imported only when an engine starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from evaluators.hf import HFBackend
from evaluators.metrics import LIKELIHOOD_METRICS, metric_for
from evaluators.tasks import Example, Task


class VLLMBackend:
    """Evaluate candidates on one long-lived vLLM engine whose weights are replaced in place per candidate.

    `engine` needs exactly `generate(prompts, sampling_params, use_tqdm=...)`, `collective_rpc(fn, args=...)`
    (which calls `fn(worker, *args)` on each engine worker) and `reset_prefix_cache()`, as `vllm.LLM` has;
    `sampling_params` builds the engine's sampling parameters.
    """

    def __init__(
        self,
        engine: Any,
        sampling_params: Callable[..., Any],
        likelihood: HFBackend,
        weight_names: Iterable[str],
    ) -> None:
        self.engine = engine
        self.sampling_params = sampling_params
        self.likelihood = likelihood
        self.weight_names = frozenset(weight_names)

    @classmethod
    def start(
        cls,
        model_dir: str,
        model: torch.nn.Module,
        likelihood: HFBackend,
        engine_args: dict[str, Any] | None = None,
    ) -> VLLMBackend:
        """An engine for the model in `model_dir` (the base), shaped as the resident `model`."""
        # In process, or collective_rpc would have to serialise the callable and every tensor to the engine's.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # Greedy decoding never samples; recent vLLM would otherwise JIT-compile FlashInfer's sampler at start.
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        try:
            import vllm.envs
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ImportError("backend 'vllm' needs vLLM: pip install 'mergesearch[vllm]'") from None
        if vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING:  # vLLM caches its settings once an engine has started
            raise RuntimeError(
                "vLLM backend: an earlier engine in this process fixed VLLM_ENABLE_V1_MULTIPROCESSING=1; "
                "the backend needs the engine in this process"
            )
        engine = LLM(model=model_dir, **{"enable_prefix_caching": True, **(engine_args or {})})
        return cls(engine, SamplingParams, likelihood, model.state_dict())

    def load_weights(self, model: torch.nn.Module) -> None:
        """Write `model`'s tensors into the engine in place, then drop KV blocks cached under the old ones."""
        weights = list(model.state_dict().items())
        names = {name for name, _ in weights}
        if names != self.weight_names:
            raise ValueError(
                f"vLLM backend: the merged model's tensors differ from the engine's (e.g. "
                f"'{min(names ^ self.weight_names)}'): an engine's depth is fixed, so recipes that skip or "
                "repeat layers need evaluation.backend 'hf'"
            )
        self.engine.collective_rpc(_load_into_engine_model, args=(weights,))
        # vLLM returns False while requests hold KV blocks (older versions return None: no answer, no failure)
        if self.engine.reset_prefix_cache() is False:
            raise RuntimeError("vLLM backend: the prefix cache could not be reset after a weight update")

    def evaluate(self, model: Any, task: Task, examples: list[Example]) -> list[float]:
        """Per-example scores in [0, 1], in the order of `examples` (weights must be loaded first)."""
        if task.kind == "choice" or task.metric in LIKELIHOOD_METRICS:
            return self.likelihood.evaluate(model, task, examples)
        metric = metric_for(task.metric)
        texts = self.generate([ex.prompt for ex in examples], task.max_new_tokens, task.stop)
        return [metric(text, ex) for text, ex in zip(texts, examples)]

    def generate(self, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...] = ()) -> list[str]:
        """Greedy continuations, cut before the first stop string, in the order of `prompts`."""
        if not prompts:
            return []
        token_ids = self.likelihood.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        # vLLM refuses an empty stop string; the HF backend ignores one, and so does this backend.
        params = self.sampling_params(temperature=0.0, max_tokens=max_new_tokens, stop=[s for s in stop if s])
        prompts_as_ids = [{"prompt_token_ids": ids} for ids in token_ids]
        outputs = self.engine.generate(prompts_as_ids, params, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]


def _load_into_engine_model(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs on the engine's worker; `get_model` unwraps vLLM's CUDA-graph wrapper, `load_weights` maps names."""
    worker.get_model().load_weights(weights=weights)
