r"""MATH-style answers through math-verify (``answers.math_answers_equal`` / ``math_answer_matches``);
GSM8K's numeric path unchanged.

The functions are reached through the module (``answers.X``), so on an ``answers.py`` without them
only the MATH tests fail, while the numeric ones show that path is the same as before.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from lwlora.evaluation import answers


@pytest.mark.parametrize(
    "prediction, reference",
    [
        (r"\dfrac{1}{2}", r"\frac12"),
        (r"\frac12", r"\dfrac{1}{2}"),
        (r"\sqrt2", r"\sqrt{2}"),
        (r"\{2,1\}", r"\{1,2\}"),  # sets: order does not matter
        (r"1+x^2", r"x^2+1"),
        (r"\sqrt{8}", r"2\sqrt{2}"),
        (r"\frac{\sqrt3}2", r"\frac{\sqrt{3}}{2}"),
        (r"\left( 3, 4 \right)", r"(3,4)"),
        (r"(-\infty,3]", r"(-\infty, 3]"),
        (r"\text{Monday}", r"\text{Monday}"),
        (r"0.75", r"\frac{3}{4}"),
        (
            r"\frac{1}{2}",
            r"The answer is $\boxed{\frac12}$.",
        ),  # a boxed reference: its box
    ],
)
def test_equal(prediction, reference):
    assert answers.math_answers_equal(prediction, reference) is True


@pytest.mark.parametrize(
    "prediction, reference",
    [
        (r"0.5", r"\frac{1}{3}"),
        (r"\frac{1}{3}", r"0.5"),
        (r"(2,1)", r"(1,2)"),  # ordered pairs / intervals keep their order
        (r"\{1,3\}", r"\{1,2\}"),
        (r"[1,2]", r"[1,2)"),
        (r"x^2-1", r"x^2+1"),
        (r"\text{Tuesday}", r"\text{Monday}"),
        (r"\sqrt{3}", r"\sqrt{2}"),
        (None, r"\frac12"),
    ],
)
def test_not_equal(prediction, reference):
    assert answers.math_answers_equal(prediction, reference) is False


def test_string_comparison_alone_was_wrong():
    """The old check (normalised strings) called these different; they are the same answer."""
    for prediction, reference in [
        (r"\sqrt2", r"\sqrt{2}"),
        (r"\{2,1\}", r"\{1,2\}"),
        (r"\frac12", r"\frac{1}{2}"),
    ]:
        assert answers.normalise_math_answer(
            prediction
        ) != answers.normalise_math_answer(reference)
        assert answers.math_answer_matches(
            rf"so the answer is \boxed{{{prediction}}}.", reference
        ) == (prediction, True)


@pytest.mark.parametrize(
    "generation, reference, expected",
    [
        (
            r"\boxed{\frac{14}3}",
            r"\frac{14}{3}",
            (r"\frac{14}3", True),
        ),  # the number regex misses \frac{14}3
        (
            r"\boxed{\frac{28}{6}}",
            r"\frac{14}{3}",
            None,
        ),  # the number path already agreed
        (
            r"\boxed{\frac{13}3}",
            r"\frac{14}{3}",
            ("13", False),
        ),  # wrong: the number path's prediction kept
    ],
)
def test_latex_number_references(generation, reference, expected):
    predicted, correct = answers.math_answer_matches(generation, reference)
    if expected is None:
        assert correct is True
    else:
        assert (predicted, correct) == expected


@pytest.mark.parametrize(
    "generation, reference, correct",
    [  # tests/test_generation.py's cases for generation.math_answer_matches: the same verdicts
        ("48 + 24 = 72\n#### 72", "72", True),
        ("The answer is 1,234.", "1234", True),
        ("#### 71", "72", False),
        ("so the result is \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}", True),
        ("\\boxed{\\left( 3, 4 \\right)}", "(3,4)", True),
        ("\\boxed{(4, 3)}", "(3,4)", False),
        ("\\boxed{\\text{Monday}}", "\\text{Monday}", True),
        ("no boxed answer here: (3,4)", "(3,4)", False),
        ("\\boxed{90^\\circ}", "90", True),
    ],
)
def test_same_verdicts_as_before(generation, reference, correct):
    assert answers.math_answer_matches(generation, reference)[1] is correct


def test_normalise_math_answer():
    assert (
        answers.normalise_math_answer(" $\\left( \\tfrac{1}{2}, 3 \\right)$ .")
        == "(\\frac{1}{2},3)"
    )


def test_math_answer_matches_needs_a_box():
    assert answers.math_answer_matches(r"the answer is \sqrt{2}", r"\sqrt2") == (
        None,
        False,
    )
    assert answers.math_answer_matches(r"\boxed{\sqrt{3}}", r"\sqrt2") == (
        r"\sqrt{3}",
        False,
    )


@pytest.mark.parametrize(
    "generation, reference, expected",
    [
        ("48 + 24 = 72\n#### 42", "42", ("42", True)),
        ("#### 42", "42", ("42", True)),
        ("The answer is 1,234.", "1234", ("1234", True)),
        ("#### 41", "42", ("41", False)),
        (r"so \boxed{42}", "42", ("42", True)),
        (r"\boxed{\frac{3}{4}}", "0.75", ("0.75", True)),
        ("no number", "42", (None, False)),
    ],
)
def test_numeric_references_unchanged(generation, reference, expected):
    assert answers.extract_gsm8k_reference(f"Some work.\n#### {reference}") == reference
    assert answers.extract_predicted_number(generation) == expected[0]
    assert answers.numbers_match(expected[0], reference) is expected[1]


def test_numeric_path_does_not_use_math_verify(monkeypatch):
    if not hasattr(answers, "math_answer_matches"):
        pytest.fail("answers.math_answer_matches is missing")

    def boom(*args):
        raise AssertionError("math-verify consulted for a numeric reference")

    monkeypatch.setattr(answers, "_math_verify_equal", boom)
    assert answers.math_answer_matches("#### 42", "42") == ("42", True)
    assert answers.math_answer_matches("x = 3, so #### 41", "42") == ("41", False)
    assert answers.math_answer_matches(r"\boxed{41}", "42") == ("41", False)
    assert answers.math_answer_matches("The answer is $1,234.", "1234") == (
        "1234",
        True,
    )


def test_without_math_verify_falls_back_to_strings(monkeypatch):
    monkeypatch.setattr(answers, "_math_verify", lambda: None)
    assert (
        answers.math_answers_equal(r"\dfrac{1}{2}", r"\frac{1}{2}") is True
    )  # normalised strings
    assert answers.math_answers_equal(r"\sqrt2", r"\sqrt{2}") is False


def test_math_verify_failure_falls_back_to_strings(monkeypatch):
    def broken(answer, timeout):
        raise RuntimeError("parser broke")

    monkeypatch.setattr(answers, "_mv_parse", broken)
    assert answers.math_answers_equal(r"\left(3,4\right)", r"(3, 4)") is True
    assert answers.math_answers_equal(r"\sqrt2", r"\sqrt{2}") is False


def test_works_off_the_main_thread():
    """math-verify's SIGALRM timeouts would raise ValueError here; they are switched off."""
    cases = [
        (r"\sqrt2", r"\sqrt{2}", True),
        (r"\{2,1\}", r"\{1,2\}", True),
        ("0.5", r"\frac{1}{3}", False),
        ("1+x^2", "x^2+1", True),
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda c: answers.math_answers_equal(c[0], c[1]), cases))
    assert got == [c[2] for c in cases]
    assert answers._verify_timeout() == (
        answers._VERIFY_TIMEOUT_S if os.name == "posix" else None
    )


@pytest.mark.parametrize(
    "prediction",
    ["9^{9^{9}}", "2^{-10^{7}}", "10^{10^{10^{10}}}", "(10^{6})!", "(x+1)^{1000}"],
)
def test_huge_answers_are_not_computed(prediction):
    """Without a timeout (another thread) sympy would hang on these; the size guard skips them."""
    result = []
    worker = threading.Thread(
        target=lambda: result.append(
            answers.math_answers_equal(prediction, "x^{1000}+1")
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), f"comparing {prediction} did not finish"
    assert result == [False]


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="POSIX interval timers")
def test_a_callers_alarm_survives():
    """math-verify's alarm(0) would cancel a timer the caller set; then its timeouts stay off."""
    previous = signal.signal(signal.SIGALRM, lambda *a: None)
    try:
        signal.setitimer(signal.ITIMER_REAL, 300.0)
        assert answers._verify_timeout() is None
        assert answers.math_answers_equal("1+x^2", "x^2+1") is True
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_deterministic():
    pairs = [(r"\sqrt2", r"\sqrt{2}"), ("0.5", r"\frac{1}{3}"), (r"(2,1)", r"(1,2)")]
    first = [answers.math_answers_equal(p, r) for p, r in pairs]
    assert (
        [answers.math_answers_equal(p, r) for p, r in pairs]
        == first
        == [True, False, False]
    )


@pytest.mark.parametrize(
    "generation, reference, expected",
    [
        (r"so \boxed{2^3}", "8", (r"2^3", True)),  # MATH-500's integer answers, boxed as an expression
        (r"so \boxed{2^3}", "9", None),
        (r"\boxed{\sqrt{16}}", "4", (r"\sqrt{16}", True)),
    ],
)
def test_numeric_reference_with_an_expression_in_the_box(generation, reference, expected):
    predicted, correct = answers.math_answer_matches(generation, reference)
    if expected is None:
        assert correct is False
    else:
        assert (predicted, correct) == expected
