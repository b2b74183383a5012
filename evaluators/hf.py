"""Hugging Face transformers backend: scores a resident causal LM on task examples, fast.

This runs once per candidate per task, so it is the cost of a search. Generation is a hand-rolled greedy loop
over the model's KV cache rather than `model.generate`, whose per-call set-up dominates on small models:
prompts are sorted by length, left-padded (so every row's next token sits in the last column), and a row
leaves the batch, with its rows of the KV cache, as soon as it has produced EOS or one of the task's stop
strings; the batch stops when no row is left. Choice tasks are scored by the
summed log-likelihood of each choice after the prompt, also left-padded so that only the continuation's
logits are ever materialised (`logits_to_keep`), which keeps memory flat for large vocabularies. The
`token_likelihood` metric reuses that path with the target as the one continuation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from evaluators.metrics import LIKELIHOOD_METRICS, metric_for, token_likelihood
from evaluators.tasks import Example, Task


class HFBackend:
    """Evaluate any Hugging Face causal LM (CPU or GPU) with its tokenizer."""

    def __init__(self, tokenizer: Any, device: str = "cpu", batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id: int = 0 if pad is None else int(pad)

    def evaluate(self, model: Any, task: Task, examples: list[Example]) -> list[float]:
        """Per-example scores in [0, 1], in the order of `examples`."""
        if task.metric in LIKELIHOOD_METRICS:
            pairs = [(ex.prompt, ex.target or "") for ex in examples]
            return [token_likelihood(total, n) for total, n in self.continuation_logprobs(model, pairs)]
        metric = metric_for(task.metric)
        if task.kind == "choice":
            predictions = [
                ex.choices[max(range(len(scores)), key=scores.__getitem__)]  # type: ignore[index]
                for ex, scores in zip(examples, self.choice_logprobs(model, examples))
            ]
        else:
            predictions = self.generate(model, [ex.prompt for ex in examples], task.max_new_tokens, task.stop)
        return [metric(pred, ex) for pred, ex in zip(predictions, examples)]

    @torch.inference_mode()
    def generate(
        self, model: Any, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]:
        """Greedy continuations of `prompts`, cut at the first stop string, without special tokens."""
        model.eval()
        stop = tuple(s for s in stop if s)  # an empty stop string would cut every answer to nothing
        encoded = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        eos = self._eos_ids(model)
        texts = [""] * len(encoded)
        for batch in self._length_sorted_batches(encoded):
            for index, text in zip(batch, self._generate_batch(model, [encoded[i] for i in batch],
                                                                max_new_tokens, stop, eos)):
                texts[index] = text
        return texts

    def _generate_batch(
        self, model: Any, rows: list[list[int]], max_new_tokens: int, stop: Sequence[str], eos: frozenset[int]
    ) -> list[str]:
        """Greedy decoding of one left-padded batch over the KV cache. A row that produces EOS or a stop
        string leaves the batch (its cache rows too), so the remaining rows' steps cost what they would alone;
        the loop ends when no row is left."""
        input_ids, attention = self._left_pad(rows)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                    use_cache=True, logits_to_keep=1)
        cache = out.cache
        generated: list[list[int]] = [[] for _ in rows]
        live = list(range(len(rows)))  # the original row of each batch row
        for step in range(max_new_tokens):
            next_ids = out.logits[:, -1].argmax(-1)
            done: set[int] = set()
            for i, token in enumerate(next_ids.tolist()):
                if token in eos:
                    done.add(i)
                else:
                    generated[live[i]].append(token)
            if stop:
                done |= self._hit_stop([generated[row] for row in live], done, stop)
            if len(done) == len(live) or step == max_new_tokens - 1:
                break
            if done:
                keep = [i for i in range(len(live)) if i not in done]
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                attention, positions, next_ids = attention[index], positions[index], next_ids[index]
                live = [live[i] for i in keep]
            attention = torch.cat([attention, attention.new_ones(len(live), 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=next_ids[:, None], attention_mask=attention, position_ids=positions,
                        cache=cache, use_cache=True, logits_to_keep=1)
        return [_cut(text, stop) for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def _hit_stop(self, generated: list[list[int]], done: set[int], stop: Sequence[str]) -> set[int]:
        """Rows (not in `done`) whose text so far contains a stop string; only the last few tokens are
        decoded."""
        tail = max(len(s) for s in stop) + 1
        rows = [i for i in range(len(generated)) if i not in done]
        tails = self.tokenizer.batch_decode([generated[i][-tail:] for i in rows], skip_special_tokens=True)
        return {i for i, text in zip(rows, tails) if any(s in text for s in stop)}

    def choice_logprobs(self, model: Any, examples: list[Example]) -> list[list[float]]:
        """Summed log-probability of each choice's tokens after its example's prompt."""
        pairs = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex.choices or ()))]
        scored = self.continuation_logprobs(
            model, [(examples[i].prompt, examples[i].choices[c]) for i, c in pairs]  # type: ignore[index]
        )
        out: list[list[float]] = [[] for _ in examples]
        for (i, _), (value, _n_tokens) in zip(pairs, scored):
            out[i].append(value)
        return out

    @torch.inference_mode()
    def continuation_logprobs(self, model: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """For each (context, continuation): the continuation's summed token log-probability, token count."""
        if not pairs:
            return []
        model.eval()
        contexts, continuations = zip(*(_split_whitespace(context, cont) for context, cont in pairs))
        ctx_ids = self.tokenizer(list(contexts), add_special_tokens=True)["input_ids"]
        cont_ids = self.tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
        sequences = [a + b for a, b in zip(ctx_ids, cont_ids)]
        scores = [0.0] * len(pairs)
        for batch in self._length_sorted_batches(sequences):
            for index, value in zip(batch, self._continuation_logprob(
                    model, [sequences[i] for i in batch], [len(cont_ids[i]) for i in batch])):
                scores[index] = value
        return [(score, len(ids)) for score, ids in zip(scores, cont_ids)]

    def _continuation_logprob(self, model: Any, rows: list[list[int]], lengths: list[int]) -> list[float]:
        input_ids, attention = self._left_pad(rows)
        width = max(lengths)
        if width == 0:
            return [0.0] * len(rows)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                       logits_to_keep=width + 1).logits[:, :-1].float()
        targets = input_ids[:, -width:]
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        in_continuation = torch.arange(width, device=self.device) >= (
            width - torch.tensor(lengths, device=self.device)[:, None])
        return (token_logprobs * in_continuation).sum(-1).tolist()

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                input_ids[i, width - len(row):] = torch.tensor(row)
                attention[i, width - len(row):] = 1
        return input_ids.to(self.device), attention.to(self.device)

    def _length_sorted_batches(self, rows: list[list[int]]) -> Iterator[list[int]]:
        """Indices in batches of similar length (longest first, so a memory problem shows at once)."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]

    def _eos_ids(self, model: Any) -> frozenset[int]:
        """End-of-sequence ids from the tokenizer and the model's generation config (often a list)."""
        config = getattr(model, "generation_config", None)
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source is not None:
                ids.update(int(x) for x in source)
        return frozenset(ids)


def _cut(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string."""
    end = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:end]


def _split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace onto the continuation, as lm-eval does, so word-piece
    tokenizers see ' answer' as one word rather than a lone space token."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation
