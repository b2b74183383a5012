"""Metrics on hand-made cases."""

from __future__ import annotations

import pytest

from evaluators.metrics import METRICS, check_metric, metric_for
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
