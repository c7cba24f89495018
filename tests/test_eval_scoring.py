"""Scoring functions on hand-made predictions."""

import pytest

from kvpress.eval.scoring import score, string_match_all, string_match_part

REFS = ["4817203", "Brave-Lantern"]


@pytest.mark.parametrize(
    "prediction, expected_all, expected_part",
    [
        ("The numbers are 4817203 and brave-lantern.", 1.0, 1.0),  # right, case differs
        ("4817203", 0.5, 1.0),  # partial
        ("9999999", 0.0, 0.0),  # wrong
        ("", 0.0, 0.0),  # empty
        ("   ", 0.0, 0.0),  # blank
        ("BRAVE-LANTERN\n\n4817203", 1.0, 1.0),  # upper case, newlines
        ("481720", 0.0, 0.0),  # a truncated number is not a match
        ("brave -lantern 4817203", 0.5, 1.0),  # a broken key is not a match
    ],
)
def test_string_match(prediction, expected_all, expected_part):
    assert string_match_all(prediction, REFS) == expected_all
    assert string_match_part(prediction, REFS) == expected_part
    assert score(prediction, REFS, "all") == expected_all
    assert score(prediction, REFS, "part") == expected_part


def test_whitespace_inside_a_reference_is_normalised():
    assert string_match_all("the words are  hello\n world", ["hello world"]) == 1.0


def test_fractions_of_many_references():
    refs = [f"word{i}x" for i in range(10)]
    pred = " ".join(refs[:7]) + " other"
    assert string_match_all(pred, refs) == pytest.approx(0.7)


def test_no_references_scores_zero_and_unknown_metric_raises():
    assert string_match_all("anything", []) == 0.0
    assert string_match_part("anything", []) == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        score("x", ["x"], "exact")
