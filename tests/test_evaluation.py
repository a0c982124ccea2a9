"""Tests for lwlora.evaluation: GLUE metrics and math/choice answer extraction (the code sandbox:
tests/test_sandbox.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lwlora.evaluation.answers import (
    extract_boxed,
    extract_choice_letter,
    extract_gsm8k_reference,
    extract_predicted_number,
    numbers_match,
    parse_number,
)
from lwlora.evaluation.metrics import (
    GLUE_METRICS,
    accuracy,
    compute_metrics,
    f1_score,
    macro_f1,
    matthews_corrcoef,
    pearson,
    rankdata,
    spearman,
)

# --------------------------------------------------------------------------------------- metrics


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(["a", "b"], ["a", "b"]) == 1.0


def test_binary_f1_hand_computed():
    # preds/refs: TP = 2 (idx 0, 4), FP = 1 (idx 1), FN = 1 (idx 3): P = R = 2/3 -> F1 = 2/3
    assert f1_score([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3)
    # TP = 1, FP = 0, FN = 2: P = 1, R = 1/3 -> F1 = 2 * (1/3) / (4/3) = 0.5
    assert f1_score([1, 0, 0, 0], [1, 1, 1, 0]) == pytest.approx(0.5)
    # no true positive -> 0.0 (also when nothing is predicted positive)
    assert f1_score([0, 0, 0], [1, 1, 0]) == 0.0
    assert f1_score([0, 0, 0], [0, 0, 0]) == 0.0
    # pos_label is honoured: label 0 in the first case: TP=1, FP=1, FN=1 -> 0.5
    assert f1_score([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], pos_label=0) == pytest.approx(0.5)


def test_macro_f1_hand_computed():
    # label 1: TP=1 FP=1 FN=1 -> 2/4 = 1/2 ; label 0: TP=2 FP=1 FN=1 -> 4/6 = 2/3 ; mean 7/12
    assert macro_f1([1, 1, 0, 0, 0], [1, 0, 0, 0, 1]) == pytest.approx(7 / 12)


def test_mcc_binary_hand_computed():
    refs = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    # TP = 3, FN = 1, TN = 4, FP = 2
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(5*4*6*5) = 10/sqrt(600)
    assert matthews_corrcoef(preds, refs) == pytest.approx(10 / math.sqrt(600))
    assert matthews_corrcoef(refs, refs) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - r for r in refs], refs) == pytest.approx(-1.0)


def test_mcc_multiclass_gorodkin_hand_computed():
    refs = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    # confusion (rows ref, cols pred): [[2,1,0],[0,1,1],[0,0,1]]; s=6, c=4, t=[3,2,1], p=[2,2,2]
    # R_K = (c*s - sum p*t) / sqrt((s^2 - sum p^2)(s^2 - sum t^2)) = (24 - 12) / sqrt(24 * 22)
    assert matthews_corrcoef(preds, refs) == pytest.approx(12 / math.sqrt(24 * 22))
    # string labels work the same
    names = np.array(["x", "y", "z"])
    assert matthews_corrcoef(names[preds], names[refs]) == pytest.approx(
        12 / math.sqrt(528)
    )


def test_mcc_undefined_is_zero():
    assert matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # constant predictions
    assert matthews_corrcoef([1, 0, 1, 0], [0, 0, 0, 0]) == 0.0  # constant references


def test_pearson_matches_numpy_and_constant_is_nan():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_rankdata_average_ties():
    np.testing.assert_array_equal(rankdata([10, 20, 20, 20, 5]), [2, 4, 4, 4, 1])
    np.testing.assert_array_equal(rankdata([3, 1, 2]), [3, 1, 2])
    np.testing.assert_array_equal(rankdata([1, 1, 2, 2]), [1.5, 1.5, 3.5, 3.5])


def test_spearman_with_ties_hand_computed():
    # ranks x = [1, 2.5, 2.5, 4], ranks y = [1, 3, 2, 4]; centred: [-1.5,0,0,1.5], [-1.5,.5,-.5,1.5]
    # r = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    # monotone but non-linear -> 1 for Spearman, < 1 for Pearson
    x = [1, 2, 3, 4, 5]
    y = [1, 8, 27, 64, 1000]
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(x, y) < 0.95
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert spearman(a, b) == pytest.approx(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


def test_input_validation():
    with pytest.raises(ValueError, match="different lengths"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="empty"):
        f1_score([], [])
    with pytest.raises(ValueError, match="different lengths"):
        compute_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        compute_metrics("cola", [], [])
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics("imagenet", [1], [1])
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["accuracy", "bleu"], [1], [1])


def test_glue_metrics_table():
    assert GLUE_METRICS["cola"] == ["mcc"]
    assert GLUE_METRICS["mrpc"] == GLUE_METRICS["qqp"] == ["accuracy", "f1"]
    assert GLUE_METRICS["stsb"] == ["pearson", "spearman"]
    for task in ("sst2", "qnli", "rte", "wnli", "mnli"):
        assert GLUE_METRICS[task] == ["accuracy"]


def test_compute_metrics():
    out = compute_metrics("mrpc", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert set(out) == {"accuracy", "f1"}
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["f1"] == pytest.approx(2 / 3)
    out = compute_metrics("STS-B", [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0])
    assert out["spearman"] == pytest.approx(math.sqrt(0.9))
    assert out["pearson"] == pytest.approx(
        np.corrcoef([1, 2, 2, 3], [1, 3, 2, 4])[0, 1]
    )
    # logits are argmax-ed for label metrics: rows -> [1, 0, 1]
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5]])
    assert compute_metrics("sst2", logits, [1, 0, 0]) == {
        "accuracy": pytest.approx(2 / 3)
    }
    assert set(compute_metrics("cola", [1, 0], [1, 0])) == {"mcc"}
    assert compute_metrics(["macro_f1", "accuracy"], [0, 1], [0, 1]) == {
        "macro_f1": 1.0,
        "accuracy": 1.0,
    }
    assert compute_metrics("accuracy", [0, 1], [0, 0]) == {"accuracy": 0.5}


# ---------------------------------------------------------------------------------- math answers


def test_gsm8k_reference():
    assert extract_gsm8k_reference("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7") == "7"
    assert extract_gsm8k_reference("...\n####  72") == "72"
    assert extract_gsm8k_reference("#### 1,234") == "1234"
    assert extract_gsm8k_reference("#### $1,234.50") == "1234.5"
    assert extract_gsm8k_reference("#### -5") == "-5"
    with pytest.raises(ValueError, match="####"):
        extract_gsm8k_reference("The answer is 5")
    with pytest.raises(ValueError, match="no number"):
        extract_gsm8k_reference("#### banana")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("####  72", "72"),
        ("The answer is 18.", "18"),
        ("It costs $1,234.50 in total.", "1234.5"),
        ("Temperature dropped to -7 degrees", "-7"),
        ("First 12, then 30, finally 1,000,000", "1000000"),
        ("So 3/4 of the cake", "0.75"),
        ("The discount is 50%.", "50"),
        (
            "The answer is 18. Double check: 18 * 2 = 36",
            "18",
        ),  # 'answer is' beats last number
        ("Work: 5 + 3 = 8\n#### 8\nThe answer is 9", "8"),  # '####' beats 'answer is'
        ("We get $\\boxed{\\frac{1}{2}}$ after 7 steps", "0.5"),
        (
            "x2 and y3 are names, the value is 4",
            "4",
        ),  # numbers glued to letters are skipped
        ("pages 3-4", "4"),  # a hyphen after a digit is not a minus sign
        ("It is 5.0", "5"),
        ("1,2,3", "3"),  # not a thousands separator (groups of 3 required)
        ("The answer is $-3.", "-3"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_predicted_number(text, expected):
    assert extract_predicted_number(text) == expected


def test_numbers_match():
    assert numbers_match("5", "5.0")
    assert numbers_match("5", 5)
    assert numbers_match(5.0, "5")
    assert numbers_match("1,234", "1234")
    assert numbers_match("$1,234.50", "1234.5")
    assert numbers_match("3/4", "0.75")
    assert numbers_match("50%", "50")
    assert numbers_match("0.3333333", "1/3", rel_tol=1e-6)
    assert not numbers_match("0.333", "1/3", rel_tol=1e-6)
    assert not numbers_match("5", "6")
    assert not numbers_match("-5", "5")
    assert not numbers_match(None, "5")
    assert not numbers_match("five", "5")
    # big integers are compared exactly, not through float rounding
    assert numbers_match("12345678901234567890", "12345678901234567890")
    assert not numbers_match(
        "12345678901234567890", "12345678901234567891", rel_tol=0.0
    )
    assert parse_number("18.") == parse_number("18")


def test_extract_boxed():
    assert extract_boxed(r"so $\boxed{\frac{1}{2}}$") == r"\frac{1}{2}"
    assert (
        extract_boxed(r"\boxed{1} then \boxed{ {a}+{b} }") == "{a}+{b}"
    )  # last one, nested
    assert extract_boxed(r"final: \fbox{42}") == "42"
    assert extract_boxed(r"\boxed 5$") == "5"
    assert extract_boxed(r"\boxed{unbalanced") is None
    assert extract_boxed("no box") is None


@pytest.mark.parametrize(
    ("text", "num_choices", "expected"),
    [
        ("A", 4, "A"),
        ("(B)", 4, "B"),
        ("Answer: C", 4, "C"),
        ("the answer is (d)", 4, "D"),
        ("The correct answer is B because ...", 4, "B"),
        ("A dog would bark. So C.", 4, "C"),  # sentence-initial article 'A' is skipped
        ("It is B. A cat is not relevant.", 4, "B"),
        ("I think (a) is wrong; the answer is c", 4, "C"),  # explicit statement wins
        ("B) 42", 4, "B"),
        ("Option E", 4, None),  # beyond num_choices
        ("Option E", 5, "E"),
        ("I have a cat", 4, None),  # lowercase bare letters are words
        ("The answer is a bit unclear, maybe D", 4, "D"),
        ("", 4, None),
    ],
)
def test_extract_choice_letter(text, num_choices, expected):
    assert extract_choice_letter(text, num_choices) == expected


def test_extract_choice_letter_validation():
    with pytest.raises(ValueError):
        extract_choice_letter("A", 0)


@pytest.mark.parametrize("text, expected", [("b) 610", "B"), ("d) ' 10'", "D"), (" (c) 7", "C"), ("[e] 2", "E"), ("f) 3", None), ("a dog ran", None)])
def test_choice_letter_from_a_leading_option_label(text, expected):
    """MathQA answers are written as 'b) 610': the leading label is the choice."""
    from lwlora.evaluation.answers import extract_choice_letter

    assert extract_choice_letter(text, 5) == expected
