r"""Answer extraction and matching for math (GSM8K, MATH) and multiple-choice evaluation.

Numbers are returned as *canonical strings* (``"1234"``, ``"-3.5"``, ``"0.75"``): integers without
a decimal point, other values in plain positional notation without trailing zeros. Exact decimal
arithmetic (:class:`decimal.Decimal`) is used so large integers are not rounded.

Number syntax understood by :func:`extract_predicted_number` / :func:`numbers_match`:
optional sign (``-``, or the Unicode minus), optional ``$``, digits with optional thousands
separators (``1,234,567`` -- groups of exactly three), optional decimals (``3.5``; a trailing
sentence period is *not* a decimal point), an optional fraction ``3/4`` (-> ``0.75``; also LaTeX
``\frac{3}{4}``) and an optional percent sign (``50%`` -> ``50``: the sign is dropped, the value is
not divided by 100). A number glued to a preceding letter (``x2``) is not a number; a hyphen right
after a digit is a range/dash, not a sign (``3-4`` gives 3 and 4).

Non-numeric (MATH-style LaTeX) answers are compared by :func:`math_answers_equal`: equal after
:func:`normalise_math_answer`, or mathematically equal according to the ``math-verify`` checker
(``\dfrac{1}{2}`` = ``\frac12``, ``\sqrt2`` = ``\sqrt{2}``, ``\{1,2\}`` = ``\{2,1\}``,
``x^2+1`` = ``1+x^2``; ordered pairs and intervals keep their order).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import signal
import threading
from decimal import Decimal, DivisionByZero, InvalidOperation, localcontext

__all__ = [
    "extract_boxed",
    "extract_choice_letter",
    "extract_gsm8k_reference",
    "extract_predicted_number",
    "math_answer_matches",
    "math_answers_equal",
    "normalise_math_answer",
    "numbers_match",
    "parse_number",
]

logger = logging.getLogger(__name__)

NumberLike = str | int | float | Decimal

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(
    r"(?<![\w.])"  # not glued to a preceding word character or decimal point
    r"(?P<sign>[-\u2212]?)\s?\$?\s?(?P<sign2>-?)"
    rf"(?P<num>{_UNSIGNED})"
    rf"(?:\s?/\s?(?P<den>{_UNSIGNED}))?"
    r"(?P<pct>\s?%)?"
)
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_ANSWER_IS_RE = re.compile(r"(?:final\s+)?answer\s*(?:is|:|=)", re.IGNORECASE)


def _canonical(value: Decimal) -> str:
    if value == value.to_integral_value():
        return str(int(value))
    text = format(value.normalize(), "f")
    return text


def _match_to_decimal(m: re.Match[str]) -> Decimal | None:
    negative = bool(m.group("sign")) != bool(
        m.group("sign2")
    )  # "-$-5" is +5, oddly enough
    try:
        value = Decimal(m.group("num").replace(",", ""))
        if m.group("den") is not None:
            den = Decimal(m.group("den").replace(",", ""))
            if den == 0:
                return None
            with localcontext() as ctx:
                ctx.prec = 28
                value = value / den
    except (InvalidOperation, DivisionByZero):
        return None
    return -value if negative else value


def _numbers_in(text: str) -> list[Decimal]:
    text = _FRAC_RE.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)
    text = text.replace("\\$", "$").replace("\\%", "%").replace("{,}", ",")
    out = []
    for m in _NUMBER_RE.finditer(text):
        value = _match_to_decimal(m)
        if value is not None:
            out.append(value)
    return out


def parse_number(text: NumberLike | None) -> Decimal | None:
    """Parse one number (``"$1,234.50"``, ``"-3/4"``, ``"50%"``, ``5``, ``5.0``) or return None.

    The whole string must be a single number (surrounding spaces and one trailing period allowed).
    """
    if text is None:
        return None
    if isinstance(text, bool):
        raise TypeError("booleans are not numbers here")
    if isinstance(text, Decimal):
        return text if text.is_finite() else None
    if isinstance(text, int):
        return Decimal(text)
    if isinstance(text, float):
        return Decimal(repr(text)) if math.isfinite(text) else None
    s = str(text).strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    s = _FRAC_RE.sub(lambda m: f"{m.group(1)}/{m.group(2)}", s)
    s = s.replace("\\$", "$").replace("\\%", "%").replace("{,}", ",")
    m = _NUMBER_RE.fullmatch(s)
    if m is None:
        return None
    return _match_to_decimal(m)


def extract_gsm8k_reference(answer_text: str) -> str:
    """The final answer of a GSM8K reference solution: the number after the last ``####``.

    Commas, ``$`` and spaces are removed (``"#### 1,234"`` -> ``"1234"``). Raises ValueError when
    there is no ``####`` marker or no number after it.
    """
    if "####" not in answer_text:
        raise ValueError("GSM8K reference has no '####' final-answer marker")
    tail = answer_text.rsplit("####", 1)[1].strip().splitlines()
    raw = tail[0] if tail else ""
    cleaned = raw.replace(",", "").replace("$", "").replace(" ", "")
    value = parse_number(cleaned)
    if value is None:
        raise ValueError(f"no number after '####' in GSM8K reference: {raw!r}")
    return _canonical(value)


def extract_predicted_number(generation: str) -> str | None:
    r"""Extract the final numeric answer from a model generation, as a canonical string.

    Rules, in order (the first that yields a number wins):

    1. the first number after the last ``####``;
    2. the first number inside the last ``\boxed{...}`` / ``\fbox{...}``;
    3. the first number after the last "answer is" / "answer:" (case-insensitive, optionally
       "final answer ...");
    4. the last number anywhere in the text.

    Returns None when the text contains no number.
    """
    if not generation:
        return None
    candidates: list[str] = []
    if "####" in generation:
        candidates.append(generation.rsplit("####", 1)[1])
    boxed = extract_boxed(generation)
    if boxed is not None:
        candidates.append(boxed)
    answer_marks = list(_ANSWER_IS_RE.finditer(generation))
    if answer_marks:
        candidates.append(generation[answer_marks[-1].end() :])
    for text in candidates:
        nums = _numbers_in(text)
        if nums:
            return _canonical(nums[0])
    nums = _numbers_in(generation)
    return _canonical(nums[-1]) if nums else None


def numbers_match(
    a: NumberLike | None,
    b: NumberLike | None,
    rel_tol: float = 1e-6,
    abs_tol: float = 0.0,
) -> bool:
    """Whether two numbers (strings like ``"1,234"``/``"$5"``/``"3/4"`` or numeric values) agree.

    Exactly equal values match (``"5"`` == ``"5.0"`` == ``5``); otherwise they match when
    ``|a - b| <= max(rel_tol * max(|a|, |b|), abs_tol)`` (``math.isclose``'s rule, computed in
    exact decimal arithmetic). None or unparsable input never
    matches.
    """
    x = parse_number(a)
    y = parse_number(b)
    if x is None or y is None:
        return False
    if x == y:
        return True
    # math.isclose's rule, in exact decimal arithmetic (floats would merge large integers)
    tol = max(Decimal(repr(rel_tol)) * max(abs(x), abs(y)), Decimal(repr(abs_tol)))
    return abs(x - y) <= tol


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` or ``\fbox{...}`` (nested braces allowed), else None.

    ``\boxed{\frac{1}{2}}`` -> ``\frac{1}{2}``. The brace-less form ``\boxed 5`` gives the token up
    to the next whitespace or ``$``. An unbalanced last box gives None.
    """
    if not text:
        return None
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    n = len(text)
    if i < n and text[i] == "{":
        depth = 0
        for j in range(i, n):
            ch = text[j]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
        return None
    # "\boxed 5$" form
    m = re.match(r"\s+([^\s$]+)", text[i:])
    return m.group(1) if m else None


_LATEX_NOISE = (
    ("\\left", ""),
    ("\\right", ""),
    ("\\!", ""),
    ("\\,", ""),
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("$", ""),
)


def normalise_math_answer(text: str) -> str:
    """Drop what does not change a LaTeX answer's value: spaces, ``$``, ``\\left``/``\\right``,
    ``\\!``, ``\\,``, ``\\dfrac``/``\\tfrac`` (→ ``\\frac``), ``\\text{…}`` wrappers, degrees, a final period."""
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    for old, new in _LATEX_NOISE:
        text = text.replace(old, new)
    return re.sub(r"\s+", "", text).rstrip(".")


def math_answers_equal(prediction: str | None, reference: str) -> bool:
    r"""Whether ``prediction`` (a model's answer, e.g. its last ``\boxed{}``'s content) equals the
    MATH-style ``reference`` (a LaTeX answer such as ``\frac{1}{2}``, ``(3, 4)``, ``x^2+1``; a
    reference that holds a ``\boxed{}`` stands for its last box's content).

    True when they are equal after :func:`normalise_math_answer`, equal as numbers
    (:func:`numbers_match`), or mathematically equal according to ``math-verify``
    (``math_verify.verify(parse(gold), parse(prediction))``: ``\dfrac{1}{2}`` = ``\frac12`` = ``0.5``,
    ``\sqrt2`` = ``\sqrt{2}``, ``\{1,2\}`` = ``\{2,1\}``, ``x^2+1`` = ``1+x^2``, ``x=3`` = ``3``;
    ordered pairs and intervals keep their order: ``(1,2)`` != ``(2,1)``). When math-verify cannot
    parse either side, raises, or is not installed, the string and number comparisons decide alone.

    math-verify's own timeouts use ``SIGALRM``, which only the main thread may arm: they are on
    (``_VERIFY_TIMEOUT_S`` seconds per parse / comparison) in the main thread of a POSIX process
    with no interval timer already running, off (``parsing_timeout=None``, ``timeout_seconds=None``)
    elsewhere -- in other threads, on Windows, under a caller's own alarm (which math-verify's
    ``alarm(0)`` would cancel). Without them only the size guard protects: answers with numbers
    too large to compute quickly (``9^{9^{9}}``, ``(10^6)!``) or huge symbolic powers are left to
    the string comparison.
    """
    if prediction is None or reference is None:
        return False
    gold = extract_boxed(reference) if _BOX_RE.search(reference) else reference
    if gold is None:
        gold = reference
    if normalise_math_answer(prediction) == normalise_math_answer(gold):
        return True
    if numbers_match(prediction, gold):
        return True
    return _math_verify_equal(prediction, gold) is True


def math_answer_matches(generation: str, reference: str) -> tuple[str | None, bool]:
    r"""(prediction, correct) for a math generation.

    Numeric references (GSM8K's ``42``, :func:`parse_number`) need an equal number
    (:func:`extract_predicted_number`, :func:`numbers_match`); the prediction is that number. A
    numeric reference written in LaTeX (MATH's ``\frac{14}{3}``, ``\$5``) is also right when the
    number does not match but the last ``\boxed{}`` equals it by :func:`math_answers_equal`
    (``\boxed{\frac{14}3}``), and so is any numeric reference whose last box holds an
    expression rather than a number (``\boxed{2^3}`` for ``8``); the prediction is then the box. Other references (MATH:
    ``(3, 4)``, ``x^2+1``, ``\sqrt{2}``) need the last ``\boxed{}`` of the generation to equal
    them by :func:`math_answers_equal`; no box: (None, False)."""
    if parse_number(reference) is not None:
        predicted = extract_predicted_number(generation)
        if numbers_match(predicted, reference):
            return predicted, True
        # a LaTeX number (\frac{14}{3}), or a box holding an expression (\boxed{2^3} for 8): the
        # box may say it in a form the number regex misses
        boxed = extract_boxed(generation)
        if boxed is not None and ("\\" in reference or parse_number(boxed) is None) and math_answers_equal(boxed, reference):
            return boxed, True
        return predicted, False
    boxed = extract_boxed(generation)
    if boxed is None:
        return None, False
    return boxed, math_answers_equal(boxed, reference)


# math-verify's alarm per parse / comparison (main thread only), in seconds
_VERIFY_TIMEOUT_S = 5
# the largest |log2 |x|| of a number left to sympy (2^100000: about 0.1 s; 2^-10^7: hangs)
_MAX_MAGNITUDE_BITS = 100_000
# the largest exponent of a non-symbol power ((x+1)^300: about 1 s; (x+1)^1000: 10 s)
_MAX_SYMBOLIC_EXPONENT = 256


def _verify_timeout() -> int | None:
    """math-verify's timeout for this call: seconds where its SIGALRM alarm can work, else None."""
    if os.name != "posix" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        if signal.getitimer(signal.ITIMER_REAL) != (0.0, 0.0):
            return None  # a caller's timer (pytest-timeout, a harness): math-verify would cancel it
    except (AttributeError, OSError):
        return None
    return _VERIFY_TIMEOUT_S


@functools.lru_cache(maxsize=1)
def _math_verify():
    try:
        import math_verify
        import math_verify.errors
    except ImportError:
        logger.warning(
            "math-verify is not installed: non-numeric math answers are compared as normalised strings"
        )
        return None
    return math_verify


@functools.lru_cache(maxsize=8192)
def _mv_parse(answer: str, timeout: int | None) -> tuple:
    """math-verify's parse of one bare answer (wrapped in ``\\boxed{}``), as a tuple; cached, so a
    reference is parsed once per process."""
    mv = _math_verify()
    config = (
        mv.LatexExtractionConfig(boxed_match_priority=0),
        mv.ExprExtractionConfig(),
    )
    return tuple(
        mv.parse(
            "\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=timeout
        )
    )


def _magnitude_bits(x) -> float:
    """A cheap upper bound on ``|log2 |x||`` (+1) computed from the expression tree without
    evaluating it; ``math.inf`` where it may be astronomically large."""
    import sympy

    if x.is_Integer:
        return float(int(abs(x)).bit_length())
    if x.is_Rational:
        return float(max(int(abs(x.p)).bit_length(), int(x.q).bit_length()))
    if x.is_Float:
        value = abs(float(x))
        if value == 0:
            return 1.0
        return abs(math.log2(value)) + 1 if value < math.inf else math.inf
    if isinstance(x, sympy.Pow):
        base, exp = x.args
        exp_bits = _magnitude_bits(exp)
        if exp_bits > 64:
            return math.inf
        return _magnitude_bits(base) * 2.0**exp_bits + 1
    if isinstance(x, sympy.Mul):
        return sum(_magnitude_bits(a) for a in x.args)
    if isinstance(x, sympy.factorial):
        n_bits = _magnitude_bits(x.args[0])
        return math.inf if n_bits > 64 else 2.0**n_bits * n_bits + 1
    if not x.args:  # pi, E, I, a symbol
        return 2.0
    return max(_magnitude_bits(a) for a in x.args) + 1  # sums, functions, containers


def _too_costly(expr) -> bool:
    """Whether checking ``expr`` could take sympy far too long (huge exact numbers or powers)."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return False
    for node in sympy.preorder_traversal(expr):
        if (
            getattr(node, "is_number", False)
            and _magnitude_bits(node) > _MAX_MAGNITUDE_BITS
        ):
            return True
        if (
            isinstance(node, sympy.Pow)
            and not node.base.is_number
            and not node.base.is_Symbol
        ):
            exp = node.exp
            if exp.is_Rational or exp.is_Float:
                if abs(exp) > _MAX_SYMBOLIC_EXPONENT:
                    return True
            elif (
                exp.is_number
                and _magnitude_bits(exp) > math.log2(_MAX_SYMBOLIC_EXPONENT) + 1
            ):
                return True
    return False


def _math_verify_equal(prediction: str, gold: str) -> bool | None:
    """math-verify's verdict on ``prediction`` against ``gold``; None when it has none (not
    installed, nothing parsed, a failure, an answer too costly to check)."""
    mv = _math_verify()
    if mv is None:
        return None
    timeout = _verify_timeout()
    try:
        gold_parsed = _mv_parse(gold, timeout)
        pred_parsed = _mv_parse(prediction, timeout)
        if not gold_parsed or not pred_parsed:
            return None
        if any(_too_costly(e) for e in gold_parsed + pred_parsed):
            return None
        return bool(
            mv.verify(list(gold_parsed), list(pred_parsed), timeout_seconds=timeout)
        )
    # math-verify's TimeoutException is a BaseException, so name it
    except (Exception, mv.errors.TimeoutException):
        logger.debug("math-verify failed on %r vs %r", prediction, gold, exc_info=True)
        return None


_EXPLICIT_CHOICE_RE = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:|=|would\s+be|should\s+be)?\s*(?:option|choice)?\s*"
    r"[:\-]?\s*[\(\[]?\s*(?P<letter>[A-Za-z])\s*[\)\]]?(?![A-Za-z0-9'\u2019])",
    re.IGNORECASE,
)
_PAREN_CHOICE_RE = re.compile(r"[\(\[]\s*(?P<letter>[A-Za-z])\s*[\)\]]")
_BARE_CHOICE_RE = re.compile(
    r"(?<![A-Za-z0-9.'\u2019\-\\])(?P<letter>[A-Z])(?![A-Za-z0-9'\u2019])(?!\.[A-Za-z])"
)


def _is_article(text: str, start: int) -> bool:
    """'A' at a sentence start (text start, or after . ! ? or a newline) followed by a lowercase word."""
    if text[start] != "A":
        return False
    before = text[:start].rstrip(" \t\"'*")
    at_sentence_start = (
        before == "" or before[-1] in ".!?\n" or text[:start].endswith("\n")
    )
    after = text[start + 1 :]
    return at_sentence_start and re.match(r"\s+[a-z]", after) is not None


_LEADING_LABEL_RE = re.compile(r"\s*[\(\[]?\s*(?P<letter>[A-Za-z])\s*[\)\]]")


def extract_choice_letter(generation: str, num_choices: int = 4) -> str | None:
    """The chosen option letter (uppercase) among the first ``num_choices`` letters, or None.

    Rules, in order:

    1. an explicit statement -- "answer is (d)", "Answer: C", "the answer is B", "option b" --
       case-insensitive; the first such statement with a valid letter wins;
    2. otherwise the first standalone candidate in text order: a letter in parentheses/brackets
       (``(B)``, ``[c]``, any case) or a bare *uppercase* letter that is a word of its own (``B``,
       ``B.``, ``B)``, ``C:``). Bare lowercase letters are ignored (too often words: "a").
       A bare ``A`` at a sentence start followed by a lowercase word ("A dog barks") is treated as
       the article and skipped -- so "A is correct." at a sentence start is *not* read as a choice;
       models answering that way should say "Answer: A" or "(A)".

    Before both: a generation that *starts* with an option label, ``b) 610`` or ``(b) 610`` (any
    case; the MathQA answer format), is that option.

    Letters beyond ``num_choices`` are never returned (with 4 choices "E" is ignored).
    """
    if not 1 <= num_choices <= 26:
        raise ValueError(f"num_choices must be between 1 and 26, got {num_choices}")
    if not generation:
        return None
    valid = {chr(ord("A") + i) for i in range(num_choices)}
    leading = _LEADING_LABEL_RE.match(generation)
    if leading and leading.group("letter").upper() in valid:
        return leading.group("letter").upper()
    for m in _EXPLICIT_CHOICE_RE.finditer(generation):
        letter = m.group("letter").upper()
        if letter in valid:
            # "answer is a ..." with a lowercase bare letter followed by a word is an article
            raw = m.group("letter")
            if (
                raw.islower()
                and not re.search(r"[\(\[]\s*$", generation[: m.start("letter")])
                and re.match(r"\s+[a-z]", generation[m.end("letter") :])
            ):
                continue
            return letter
    candidates: list[tuple[int, str]] = []
    for m in _PAREN_CHOICE_RE.finditer(generation):
        letter = m.group("letter").upper()
        if letter in valid:
            candidates.append((m.start(), letter))
    for m in _BARE_CHOICE_RE.finditer(generation):
        letter = m.group("letter")
        if letter in valid and not _is_article(generation, m.start()):
            candidates.append((m.start(), letter))
    if not candidates:
        return None
    return min(candidates)[1]
