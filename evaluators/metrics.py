"""Per-example metrics: `(prediction, example) -> score in [0, 1]`, higher is better.

For generation tasks the prediction is the generated text (already cut at the task's stop strings); for choice
tasks it is the text of the choice the model ranked first. A task names its metric by a `METRICS` key, or as
`regex:PATTERN` to extract the answer from free text first: the first match of PATTERN (its first capture
group if it has one) is compared to the target, e.g. `regex:answer is (\\w+)`. The pattern lives in the
metric string so that a job file configures it in the same one field as any other metric.

One metric scores a generation task without generating: `token_likelihood`, the model's probability of the
target after the prompt, as `exp(mean token log-probability)` (see `token_likelihood`). Backends compute it
from log-likelihoods, so it is not in `METRICS` (which maps predictions to scores).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evaluators.tasks import Example

Metric = Callable[[str, "Example"], float]

REGEX_PREFIX = "regex:"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def normalize(text: str) -> str:
    """Strip and collapse runs of whitespace to one space: formatting is not what a task measures."""
    return " ".join(text.split())


def exact_match(prediction: str, example: Example) -> float:
    return float(example.target is not None and normalize(prediction) == normalize(example.target))


def last_number(text: str) -> Decimal | None:
    """The last number in `text` (thousands commas allowed), exactly as a Decimal; None if there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:
        return None


def number(prediction: str, example: Example) -> float:
    """1 if the last number of the prediction equals the target's number (so 42 matches '42.0')."""
    expected = last_number(example.target or "")
    got = last_number(prediction)
    return float(expected is not None and got is not None and got == expected)


def choice_accuracy(prediction: str, example: Example) -> float:
    if example.choices is None or example.label is None:
        return 0.0
    return float(prediction == example.choices[example.label])


def regex_match(pattern: re.Pattern[str], prediction: str, example: Example) -> float:
    """Exact match of the answer `pattern` extracts from the prediction (group 1 if any, else the match)."""
    found = pattern.search(prediction)
    if found is None or example.target is None:
        return 0.0
    answer = found.group(1) if pattern.groups else found.group(0)
    return float(normalize(answer or "") == normalize(example.target))


def token_likelihood(logprob_sum: float, n_tokens: int) -> float:
    """exp(mean log-probability of the target's tokens): the geometric mean of their probabilities, in [0, 1].

    A raw log-likelihood is unbounded below and grows more negative with the target's length, so it can
    neither be averaged with the [0, 1] task scores a fitness is made of nor compared across targets. Its
    per-token mean removes the length; exp maps it to [0, 1], higher is better, 1 only if every token has
    probability 1. An empty target (no tokens) scores 1: the model is certain to produce nothing more.
    """
    return math.exp(logprob_sum / n_tokens) if n_tokens else 1.0


METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "number": number,
    "choice_accuracy": choice_accuracy,
}
CHOICE_METRICS = frozenset({"choice_accuracy"})
LIKELIHOOD_METRICS = frozenset({"token_likelihood"})


def metric_for(spec: str) -> Metric:
    """Resolve a metric name or `regex:PATTERN`; raises ValueError naming the metric if it is not one."""
    if spec.startswith(REGEX_PREFIX):
        source = spec[len(REGEX_PREFIX) :]
        try:
            return partial(regex_match, re.compile(source))
        except re.error as exc:
            raise ValueError(f"metric '{spec}': bad regular expression ({exc})") from None
    if spec in LIKELIHOOD_METRICS:
        raise ValueError(f"metric '{spec}' scores log-likelihoods, not generated text")
    if spec not in METRICS:
        known = ", ".join([*METRICS, *LIKELIHOOD_METRICS, REGEX_PREFIX + "PATTERN"])
        raise ValueError(f"metric '{spec}' is unknown (known: {known})")
    return METRICS[spec]


def check_metric(spec: str, kind: str) -> None:
    """Refuse a metric that does not exist or does not fit the task kind ('generate' or 'choice')."""
    if spec not in LIKELIHOOD_METRICS:
        metric_for(spec)
    if (kind == "choice") != (spec in CHOICE_METRICS):
        raise ValueError(f"metric '{spec}' does not fit a {kind} task")
