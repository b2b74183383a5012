"""Metrics on hand-made cases."""

from __future__ import annotations

import math

import pytest

from evaluators.metrics import METRICS, check_metric, metric_for, token_likelihood
from evaluators.tasks import Example


def gen(target: str) -> Example:
    return Example(id=0, prompt="", target=target)


@pytest.mark.parametrize(
    ("prediction", "target", "score"),
    [("abc", "abc", 1.0), ("  a   b\tc \n", "a b c", 1.0), ("abc", "abd", 0.0), ("ab c", "abc", 0.0), ("", "", 1.0)],
)
def test_exact_match_normalises_whitespace_only(prediction: str, target: str, score: float) -> None:
    assert METRICS["exact_match"](prediction, gen(target)) == score


@pytest.mark.parametrize(
    ("prediction", "target", "score"),
    [
        ("the answer is 42", "42", 1.0),
        ("42.0", "42", 1.0),
        ("first 3 then 7", "7", 1.0),
        ("first 3 then 7", "3", 0.0),
        ("total: 1,234", "1234", 1.0),
        ("-5", "-5", 1.0),
        ("5", "-5", 0.0),
        ("no number", "0", 0.0),
        ("12", "no number in target", 0.0),
    ],
)
def test_number_compares_the_last_number(prediction: str, target: str, score: float) -> None:
    assert METRICS["number"](prediction, gen(target)) == score


def test_regex_extracts_the_first_match_and_group() -> None:
    answer = metric_for(r"regex:answer: (\w+)")
    assert answer("blah answer: yes. answer: no", gen("yes")) == 1.0
    assert answer("answer: no", gen("yes")) == 0.0
    assert answer("nothing here", gen("yes")) == 0.0
    assert metric_for(r"regex:\d+")("x 17 y", gen("17")) == 1.0


def test_choice_accuracy_compares_the_chosen_text_with_the_label() -> None:
    ex = Example(id=0, prompt="q", choices=("a", "b", "c"), label=2)
    assert METRICS["choice_accuracy"]("c", ex) == 1.0
    assert METRICS["choice_accuracy"]("a", ex) == 0.0


def test_unknown_and_broken_metrics_are_refused() -> None:
    with pytest.raises(ValueError, match="metric 'f1' is unknown"):
        metric_for("f1")
    with pytest.raises(ValueError, match="bad regular expression"):
        metric_for("regex:(")
    with pytest.raises(ValueError, match="does not fit a choice task"):
        check_metric("number", "choice")
    check_metric("choice_accuracy", "choice")


@pytest.mark.parametrize(
    ("logprob_sum", "n_tokens", "score"),
    [
        (2 * math.log(0.5), 2, 0.5),  # two tokens at p=0.5: geometric mean 0.5
        (math.log(0.9) + math.log(0.1), 2, 0.3),  # sqrt(0.9 * 0.1)
        (0.0, 3, 1.0),  # certain of every token
        (-1000.0, 1, 0.0),  # hopeless, and still finite
        (0.0, 0, 1.0),  # an empty target
    ],
)
def test_token_likelihood_is_the_geometric_mean_token_probability(
    logprob_sum: float, n_tokens: int, score: float
) -> None:
    assert token_likelihood(logprob_sum, n_tokens) == pytest.approx(score, abs=1e-12)


def test_token_likelihood_does_not_favour_short_targets() -> None:
    """The same per-token probability scores the same whatever the length; a raw sum would not."""
    assert token_likelihood(3 * math.log(0.7), 3) == pytest.approx(token_likelihood(9 * math.log(0.7), 9))


def test_token_likelihood_fits_generation_tasks_only() -> None:
    check_metric("token_likelihood", "generate")
    with pytest.raises(ValueError, match="does not fit a choice task"):
        check_metric("token_likelihood", "choice")
    with pytest.raises(ValueError, match="scores log-likelihoods, not generated text"):
        metric_for("token_likelihood")
