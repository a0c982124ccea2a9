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
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, DivisionByZero, InvalidOperation, localcontext

__all__ = [
    "extract_boxed",
    "extract_choice_letter",
    "extract_gsm8k_reference",
    "extract_predicted_number",
    "numbers_match",
    "parse_number",
]

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
