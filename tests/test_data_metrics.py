"""SNI metrics: exact match and ROUGE-L, each the best over the references."""

import pytest

from gistlib.data import exact_match, normalize_answer, rouge_l, score_predictions


def test_exact_match_normalises():
    assert normalize_answer("  The  Cat, sat! ") == "the cat sat"
    assert exact_match("the city Councilmen.", ["foo", "The city councilmen"]) == 1.0
    assert exact_match("councilmen", ["the city councilmen"]) == 0.0


def test_rouge_l_best_over_references_with_stemming():
    assert rouge_l("the cats are running", ["the cat is running"]) == pytest.approx(0.75)  # cats~cat, running
    assert rouge_l("a b c", ["x y z", "a b c"]) == 1.0
    # LCS of "a b d" vs "a b c d" is 3: P = 1, R = 3/4, F = 6/7
    assert rouge_l("a b d", ["a b c d"]) == pytest.approx(6 / 7)


def test_score_predictions_in_percent():
    s = score_predictions(["A", "b c"], [["a"], ["x"]])
    assert s == {"exact_match": 50.0, "rougeL": 50.0}
    with pytest.raises(ValueError):
        score_predictions(["a"], [])
