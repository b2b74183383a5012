"""HF backend on a tiny random Llama: stopping, batching invariance, choice log-likelihoods, score order."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evaluators.hf import HFBackend
from evaluators.tasks import Example, Task
from workers.zoo.tokenizer import char_tokenizer

PROMPTS = ["abc=", "hello world=", "x=", "a longer prompt here=", "q", "zz top=", "mid size="]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer("abcdefghijklmnopqrstuvwxyz =+")


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a random model that does not pick EOS by chance, so outputs are long
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    return model.eval()


def test_generation_respects_max_new_tokens(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    texts = HFBackend(tokenizer).generate(model, PROMPTS, max_new_tokens=6)
    assert all(len(t) <= 6 for t in texts) and max(len(t) for t in texts) == 6


def test_batching_gives_the_same_generations_as_batch_size_one(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    one = HFBackend(tokenizer, batch_size=1).generate(model, PROMPTS, max_new_tokens=10)
    many = HFBackend(tokenizer, batch_size=4).generate(model, PROMPTS, max_new_tokens=10)
    assert many == one and len(set(one)) > 1


def test_generation_stops_at_stop_strings(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    backend = HFBackend(tokenizer, batch_size=3)
    free = backend.generate(model, PROMPTS, max_new_tokens=12)
    stop = free[0][3]
    cut = backend.generate(model, PROMPTS, max_new_tokens=12, stop=(stop, "never", ""))
    for whole, short in zip(free, cut):
        assert stop not in short and short == whole.split(stop)[0]


def test_generation_stops_at_eos_without_further_steps(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    calls: list[int] = []

    def always_eos(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        output = output.clone()
        output[..., tokenizer.eos_token_id] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(always_eos)
    try:
        texts = HFBackend(tokenizer, batch_size=len(PROMPTS)).generate(model, PROMPTS, max_new_tokens=8)
    finally:
        handle.remove()
    assert texts == [""] * len(PROMPTS) and len(calls) == 1


def test_finished_rows_leave_the_batch(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """A row that hit its stop string is dropped from the next steps (and its KV cache rows), and the other
    rows' continuations are those of batch size one."""
    stop = HFBackend(tokenizer).generate(model, PROMPTS[:1], max_new_tokens=12)[0][2]
    one = HFBackend(tokenizer, batch_size=1).generate(model, PROMPTS, max_new_tokens=12, stop=(stop,))
    rows: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: rows.append(output.shape[0]))
    try:
        many = HFBackend(tokenizer, batch_size=len(PROMPTS)).generate(model, PROMPTS, 12, stop=(stop,))
    finally:
        handle.remove()
    assert many == one
    assert rows[0] == len(PROMPTS) and rows == sorted(rows, reverse=True) and rows[-1] < rows[0]


def manual_logprob(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, choice: str) -> float:
    context = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([context + tokenizer(choice, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    targets = ids[0, 1:]
    return float(logprobs[torch.arange(len(targets)), targets][len(context) - 1:].sum())


CHOICE_EXAMPLES = [
    Example(id=0, prompt="sky is", choices=("blue", "green", "a very long answer"), label=0),
    Example(id=1, prompt="a much longer question here", choices=("x", "yy"), label=1),
    Example(id=2, prompt="q", choices=("abc", "cba", "bca", "ab"), label=3),
]


def test_choice_logprobs_match_an_unbatched_computation(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    got = HFBackend(tokenizer, batch_size=4).choice_logprobs(model, CHOICE_EXAMPLES)
    for ex, scores in zip(CHOICE_EXAMPLES, got):
        expected = [manual_logprob(model, tokenizer, ex.prompt, c) for c in ex.choices or ()]
        assert scores == pytest.approx(expected, abs=1e-4)


def test_choice_task_scores_argmax_against_label(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    backend = HFBackend(tokenizer, batch_size=2)
    best = [max(range(len(s)), key=s.__getitem__) for s in backend.choice_logprobs(model, CHOICE_EXAMPLES)]
    relabelled = [
        Example(id=ex.id, prompt=ex.prompt, choices=ex.choices, label=b if ex.id != 1 else 1 - b)
        for ex, b in zip(CHOICE_EXAMPLES, best)
    ]
    task = Task(name="c", kind="choice", dev=relabelled, test=[], metric="choice_accuracy")
    assert backend.evaluate(model, task, relabelled) == [1.0, 0.0, 1.0]


def test_token_likelihood_scores_each_target_by_its_mean_token_logprob(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    pairs = [("abc=", "cba"), ("x=", "x"), ("q", "")]
    examples = [Example(id=i, prompt=p, target=t) for i, (p, t) in enumerate(pairs)]
    task = Task(name="l", kind="generate", dev=examples, test=[], metric="token_likelihood")
    got = HFBackend(tokenizer, batch_size=2).evaluate(model, task, examples)
    # one token per character, so a target's token count is its length
    expected = [math.exp(manual_logprob(model, tokenizer, p, t) / max(len(t), 1)) for p, t in pairs]
    assert got == pytest.approx(expected, rel=1e-4)
    assert got[2] == 1.0 and all(0.0 < g < 1.0 for g in got[:2])


def test_scores_come_back_in_the_order_of_the_examples(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    backend = HFBackend(tokenizer, batch_size=3)
    outputs = backend.generate(model, PROMPTS, max_new_tokens=5)
    examples = [
        Example(id=i, prompt=p, target=out if i % 2 == 0 else out + "!") for i, (p, out) in enumerate(zip(PROMPTS, outputs))
    ]
    task = Task(name="g", kind="generate", dev=examples, test=[], max_new_tokens=5, stop=())
    assert backend.evaluate(model, task, examples) == [1.0 if i % 2 == 0 else 0.0 for i in range(len(PROMPTS))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_generation_matches_cpu(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    cpu = HFBackend(tokenizer).generate(model, PROMPTS, max_new_tokens=8)
    gpu_model = LlamaForCausalLM(model.config).to("cuda")
    gpu_model.load_state_dict(model.state_dict())
    assert HFBackend(tokenizer, device="cuda").generate(gpu_model, PROMPTS, max_new_tokens=8) == cpu
