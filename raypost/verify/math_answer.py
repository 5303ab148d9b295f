"""Final-answer extraction and numeric comparison for math word problems (GSM8K-style).

Extraction order: the last GSM8K `#### N` marker, then the last `\\boxed{...}`, then the last
number in the text. Numbers may carry thousands commas, `$`, `%`, units, a trailing period,
a sign, decimals, fractions (`3/4`, `\\frac{3}{4}`, `1 1/2`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# A number as written in prose: optional sign (not a hyphen inside "3-5" or "x-2"), optional $,
# integer part with or without thousands commas, optional decimals, optional fraction part.
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_DEC = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(
    rf"(?<![\w.\)])(?P<sign>-\s?)?\$?\s?"
    rf"(?:(?P<whole>\d+)\s+(?=\d+\s*/\s*\d))?"
    rf"(?P<num>{_DEC})(?:\s*/\s*(?P<den>{_DEC}))?(?![\d])(?P<pct>\s?%)?"
)
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_UNITS_TAIL = re.compile(r"^(?P<n>.*?\d)\s*(?:[A-Za-z][A-Za-z.²³/^ ]*)?$")


def _clean(text: str) -> str:
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("\\$", "$").replace("\\%", "%")
    text = text.replace("\\,", "").replace("\\!", "").replace("{,}", ",")
    text = _FRAC.sub(r"\1/\2", text)
    return _TEXT_CMD.sub(r" \1", text)


def _to_fraction(match: re.Match) -> Fraction | None:
    try:
        value = Fraction(Decimal(match.group("num").replace(",", "")))
        if match.group("den"):
            den = Fraction(Decimal(match.group("den").replace(",", "")))
            if den == 0:
                return None
            value /= den
        if match.group("whole"):
            value += int(match.group("whole"))
    except (InvalidOperation, ValueError):
        return None
    return -value if match.group("sign") else value


def _format(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    decimal = Decimal(value.numerator) / Decimal(value.denominator)
    if Fraction(decimal) == value and len(str(decimal)) <= 20:
        return format(decimal.normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def _numbers(text: str) -> list[re.Match]:
    return list(_NUMBER.finditer(_clean(text)))


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...}, nested braces balanced."""
    out = []
    for start in (m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[start : i - 1])
    return out


def _single_number(text: str) -> Fraction | None:
    """The value of `text` if it is one number, possibly with $, %, units or `x =` around it."""
    cleaned = _clean(text).strip().rstrip(".").strip()
    cleaned = re.sub(r"^[A-Za-z]\w*\s*=\s*", "", cleaned).strip()
    cleaned = cleaned.strip("$").strip()
    found = _numbers(cleaned)
    if len(found) != 1:
        return None
    m = found[0]
    rest = (cleaned[: m.start()] + " " + cleaned[m.end() :]).strip()
    # What is left may only be words (units such as "dollars", "cm", "km/h").
    if rest and not re.fullmatch(r"[A-Za-z][A-Za-z.²³/^\s]*", rest):
        return None
    return _to_fraction(m)


def extract_answer(text: str) -> str | None:
    """The final answer of a model output as a canonical string (e.g. "1234", "-2.5", "3/4").

    A `\\boxed{}` holding something other than a number (e.g. `\\frac{\\pi}{2}`) is returned as
    written, for symbolic comparison. None when nothing answer-like is found.
    """
    if not text:
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        found = _numbers(tail)
        if found:
            value = _to_fraction(found[0])
            if value is not None:
                return _format(value)
    boxed = _boxed_contents(text)
    if boxed:
        content = boxed[-1].strip()
        value = _single_number(content)
        if value is not None:
            return _format(value)
        if content:
            return content
    for match in reversed(_numbers(text)):
        value = _to_fraction(match)
        if value is not None:
            return _format(value)
    return None


def normalize_number(text: str) -> float | None:
    """The numeric value of an answer string ("$1,234.50", "3/4", "\\frac{3}{4}", "25%", "12 cm"),
    or None when it is not a single number. A percent sign is dropped: "25%" is 25."""
    if text is None:
        return None
    value = _single_number(str(text))
    return None if value is None else float(value)


def reference_answer(reference: str) -> str | None:
    """The answer part of a reference: a bare answer, or a full GSM8K solution ending in `#### N`."""
    if reference is None:
        return None
    reference = str(reference)
    if "####" in reference:
        tail = reference.rsplit("####", 1)[1].strip()
        return extract_answer("#### " + tail) or tail or None
    return reference.strip() or None


class _DropTimeoutNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _symbolic_match(predicted: str, reference: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTimeoutNotice) for f in logger.filters):
            logger.addFilter(_DropTimeoutNotice())
    # math-verify's own timeouts use signals, which work only on the main thread (curation and
    # evaluation call this from Ray actors' and thread pools' threads).
    on_main = threading.current_thread() is threading.main_thread()
    parse_timeout, verify_timeout = (5, 5) if on_main else (None, None)

    def wrap(s: str) -> str:
        return s if "$" in s or "\\boxed" in s else f"${s}$"

    try:
        gold = parse(wrap(reference), parsing_timeout=parse_timeout)
        pred = parse(wrap(predicted), parsing_timeout=parse_timeout)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=verify_timeout))
    except Exception:
        return False


def answers_match(predicted: str | None, reference: str, rel_tol: float = 1e-6) -> bool:
    """True when `predicted` equals the reference's answer: numerically when both are numbers
    (whole numbers exactly, others within `rel_tol`, absolute 1e-9 near zero), else symbolically
    (math-verify), else as text."""
    if predicted is None:
        return False
    ref = reference_answer(reference)
    if ref is None:
        return False
    p, r = normalize_number(predicted), normalize_number(ref)
    if p is None:
        p = normalize_number(extract_answer(predicted) or "")
    if p is not None and r is not None:
        if p.is_integer() and r.is_integer():
            # whole numbers match exactly: within 1e-6, 2000001 would pass for 2000000
            return p == r
        return math.isclose(p, r, rel_tol=rel_tol, abs_tol=1e-9)
    squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    if squash(predicted) == squash(ref):
        return True
    return _symbolic_match(predicted, ref)


def verify_math(response: str, reference: str) -> tuple[bool, str]:
    """(verified, reason): reason is "match", "mismatch: got X, expected Y", "no answer found"
    or "no reference answer"."""
    expected = reference_answer(reference)
    if expected is None:
        return False, "no reference answer"
    got = extract_answer(response or "")
    if got is None:
        return False, "no answer found"
    if answers_match(got, reference):
        return True, "match"
    return False, f"mismatch: got {got}, expected {expected}"
