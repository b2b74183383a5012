"""The vLLM backend's contract, against a stand-in engine with exactly the surface the backend uses.

`FakeEngine` plays vLLM's part honestly: it holds its own copy of the weights (changed only through
`load_weights`), decodes greedily with the sampling parameters it is given (max tokens, stop strings cut out,
EOS), and keeps a prefix cache that serves stale text until it is reset, as a real KV cache would.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evaluators.hf import HFBackend
from evaluators.tasks import Example, Task
from evaluators.vllm_backend import VLLMBackend
from orchestrator.driver import reference_recipes
from workers.worker import ModelWorker, TaskSetup, WorkerSetup
from workers.zoo.tokenizer import char_tokenizer

PROMPTS = ["abc=", "hello world=", "x=", "a longer prompt here=", "q", "zz top=", "mid size="]


@dataclass
class SamplingParams:
    """vLLM's fields of that name; like vLLM, an empty stop string is refused."""

    temperature: float = 1.0
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")


class FakeEngine:
    """vLLM's `LLM` as the backend sees it: generate, collective_rpc (to load weights), reset_prefix_cache."""

    def __init__(self, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache: dict[tuple[tuple[int, ...], int, tuple[str, ...]], str] = {}
        self.events: list[tuple[str, Any]] = []
        self.params: list[SamplingParams] = []

    def collective_rpc(
        self, method: Any, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None
    ) -> list[Any]:
        """As vLLM's: a callable gets the worker first; one worker here, whose model is this engine."""
        self.events.append(("rpc", None))
        return [method(SimpleNamespace(get_model=lambda: self), *args, **(kwargs or {}))]

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        params = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)

    def reset_prefix_cache(self) -> bool:
        self.events.append(("reset", None))
        self.prefix_cache.clear()
        return True

    def generate(self, prompts: list[dict], params: SamplingParams, use_tqdm: bool = True) -> list[Any]:
        self.events.append(("generate", len(prompts)))
        self.params.append(params)
        texts = []
        for prompt in prompts:
            key = (tuple(prompt["prompt_token_ids"]), params.max_tokens, tuple(params.stop))
            if key not in self.prefix_cache:
                self.prefix_cache[key] = self._greedy(prompt["prompt_token_ids"], params)
            texts.append(self.prefix_cache[key])
        return [SimpleNamespace(outputs=[SimpleNamespace(text=t)]) for t in texts]

    @torch.no_grad()
    def _greedy(self, ids: list[int], params: SamplingParams) -> str:
        assert params.temperature == 0.0
        out: list[int] = []
        for _ in range(params.max_tokens):
            token = int(self.model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == self.tokenizer.eos_token_id:
                break
            out.append(token)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            cut = [text.index(s) for s in params.stop if s in text]
            if cut:
                return text[: min(cut)]
        return self.tokenizer.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer("abcdefghijklmnopqrstuvwxyz =+")


def random_llama(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # no EOS by chance, so generations are long enough to meet stop strings
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    return model.eval()


def gen_task(stop: tuple[str, ...], metric: str = "exact_match") -> tuple[Task, list[Example]]:
    examples = [Example(id=i, prompt=p, target="") for i, p in enumerate(PROMPTS)]
    return Task("g", "generate", examples, [], metric=metric, max_new_tokens=9, stop=stop), examples


def test_each_candidate_is_written_in_place_then_the_cache_reset_then_generated_in_one_batch(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    resident = random_llama(tokenizer, seed=0)
    engine = FakeEngine(random_llama(tokenizer, seed=99), tokenizer)
    engine_params = {n: p.data_ptr() for n, p in engine.model.state_dict().items()}
    hf = HFBackend(tokenizer, batch_size=3)
    backend = VLLMBackend(engine, SamplingParams, hf, resident.state_dict())
    for candidate in (1, 2):
        with torch.no_grad():
            for tensor in resident.state_dict().values():
                tensor.add_(torch.randn_like(tensor), alpha=0.5)
            resident.lm_head.weight[tokenizer.eos_token_id].zero_()
        backend.load_weights(resident)
        for name, tensor in engine.model.state_dict().items():
            assert (
                torch.equal(tensor, resident.state_dict()[name]) and tensor.data_ptr() == engine_params[name]
            )
        free = hf.generate(resident, PROMPTS, max_new_tokens=9)
        longest = max(range(len(free)), key=lambda i: len(free[i]))
        stop = (free[longest][len(free[longest]) // 2], "never")
        got = backend.generate(PROMPTS, 9, stop)
        assert got == hf.generate(resident, PROMPTS, 9, stop), f"candidate {candidate}: stale weights"
        assert got[longest] == free[longest].split(stop[0])[0] != free[longest]  # the stop string cut it
    assert [e for e, _ in engine.events] == ["rpc", "reset", "generate"] * 2
    assert all(n == len(PROMPTS) for e, n in engine.events if e == "generate")
    assert engine.params[-1] == SamplingParams(temperature=0.0, max_tokens=9, stop=list(stop))


def test_without_a_cache_reset_the_stand_in_would_serve_stale_text(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    """The stand-in's cache is real: the reset the backend does is what keeps candidates apart."""
    engine = FakeEngine(random_llama(tokenizer, seed=0), tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    prompt = [{"prompt_token_ids": tokenizer("abc=")["input_ids"]}]
    before = engine.generate(prompt, params)[0].outputs[0].text
    engine.load_weights(list(random_llama(tokenizer, seed=5).state_dict().items()))
    assert engine.generate(prompt, params)[0].outputs[0].text == before
    engine.reset_prefix_cache()
    assert engine.generate(prompt, params)[0].outputs[0].text != before


def test_an_empty_stop_string_is_ignored_as_the_hf_backend_ignores_it(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    resident = random_llama(tokenizer, seed=4)
    hf = HFBackend(tokenizer)
    backend = VLLMBackend(
        FakeEngine(copy.deepcopy(resident), tokenizer), SamplingParams, hf, resident.state_dict()
    )
    stop = ("", PROMPTS[0][0])
    assert backend.generate(PROMPTS, 9, stop) == hf.generate(resident, PROMPTS, 9, stop)


def test_scores_use_the_task_metric_on_the_engine_text_in_example_order(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    resident = random_llama(tokenizer, seed=1)
    hf = HFBackend(tokenizer)
    backend = VLLMBackend(
        FakeEngine(copy.deepcopy(resident), tokenizer), SamplingParams, hf, resident.state_dict()
    )
    outputs = hf.generate(resident, PROMPTS, max_new_tokens=5, stop=())
    # the metric compares the first generated character: right for even examples, wrong for odd ones
    examples = [
        Example(id=i, prompt=p, target=f"{out[:1]}!" if i % 2 else out[:1])
        for i, (p, out) in enumerate(zip(PROMPTS, outputs))
    ]
    task = Task("r", "generate", examples, [], metric="regex:^(.)", max_new_tokens=5, stop=())
    assert backend.evaluate(resident, task, examples) == [0.0 if i % 2 else 1.0 for i in range(len(PROMPTS))]


def test_log_likelihood_metrics_run_on_the_resident_model_not_the_engine(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    resident = random_llama(tokenizer, seed=2)
    engine = FakeEngine(random_llama(tokenizer, seed=3), tokenizer)
    hf = HFBackend(tokenizer)
    backend = VLLMBackend(engine, SamplingParams, hf, resident.state_dict())
    choice = [
        Example(id=0, prompt="sky is", choices=("blue", "green"), label=0),
        Example(id=1, prompt="q", choices=("abc", "cba", "ab"), label=2),
    ]
    choice_task = Task("c", "choice", choice, [], metric="choice_accuracy")
    likely_task, likely = gen_task(stop=(), metric="token_likelihood")
    assert backend.evaluate(resident, choice_task, choice) == hf.evaluate(resident, choice_task, choice)
    assert backend.evaluate(resident, likely_task, likely) == hf.evaluate(resident, likely_task, likely)
    assert engine.events == []


def test_a_model_of_another_depth_is_refused_before_touching_the_engine(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    resident = random_llama(tokenizer, seed=0)
    engine = FakeEngine(copy.deepcopy(resident), tokenizer)
    backend = VLLMBackend(engine, SamplingParams, HFBackend(tokenizer), resident.state_dict())
    resident.model.layers.append(copy.deepcopy(resident.model.layers[0]))
    with pytest.raises(ValueError, match=r"'model\.layers\.2\.[^']*'.*need evaluation\.backend 'hf'"):
        backend.load_weights(resident)
    assert engine.events == []


def test_a_vllm_worker_pushes_every_candidate_and_scores_like_the_hf_worker(
    zoo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines: list[FakeEngine] = []

    def start(model_dir: str, model: torch.nn.Module, likelihood: HFBackend, engine_args: Any) -> VLLMBackend:
        assert model_dir == str(zoo_dir / "base") and engine_args == {"gpu_memory_utilization": 0.3}
        engines.append(FakeEngine(copy.deepcopy(model), likelihood.tokenizer))
        return VLLMBackend(engines[-1], SamplingParams, likelihood, model.state_dict())

    monkeypatch.setattr(VLLMBackend, "start", staticmethod(start))
    setup = {
        "base": str(zoo_dir / "base"),
        "experts": {n: str(zoo_dir / "experts" / n) for n in ("copy", "reverse")},
        "tasks": [TaskSetup(name="reverse", path=str(zoo_dir / "tasks" / "reverse"), max_new_tokens=12)],
        "dev_subset": 4,
    }
    on_vllm = ModelWorker(
        WorkerSetup(**setup, backend="vllm", extra={"engine_args": {"gpu_memory_utilization": 0.3}})
    )
    on_hf = ModelWorker(WorkerSetup(**setup))
    recipes = reference_recipes(["copy", "reverse"], num_layers=on_hf.sources.num_layers)
    scores = {}
    for name in ("expert:reverse", "expert:copy"):
        got, expected = on_vllm.evaluate(recipes[name], subset=1), on_hf.evaluate(recipes[name], subset=1)
        assert got["ok"] and got["per_example"] == expected["per_example"], name
        scores[name] = got["dev"]["reverse"]
    assert (
        scores["expert:reverse"] > scores["expert:copy"]
    )  # the engine generated with each candidate's weights
    assert [e for e, _ in engines[0].events] == ["rpc", "reset", "generate"] * 2


def test_engine_args_without_the_vllm_backend_are_refused_in_one_line(tmp_path: Path) -> None:
    from orchestrator.jobspec import JobError, parse_job

    job = {
        "models": {"base": "base", "experts": {"a": "a"}},
        "tasks": [{"name": "t", "path": "t"}],
        "evaluation": {"backend": "hf", "engine_args": {"gpu_memory_utilization": 0.5}},
    }
    with pytest.raises(JobError, match=r"^job: field 'evaluation': engine_args configure the vLLM engine"):
        parse_job(job, tmp_path)
