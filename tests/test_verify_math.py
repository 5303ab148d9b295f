"""Final-answer extraction and matching on tricky model outputs."""

import pytest

from raypost.verify import answers_match, extract_answer, normalize_number, verify_math, verify_rows


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The total is 1,234 apples.", "1234"),
        ("Value: 1,234,567", "1234567"),
        ("She pays $12.50 in total.", "12.5"),
        (r"It costs \$18 in all", "18"),
        ("It is 12 dollars", "12"),
        ("The length is 5cm.", "5"),
        ("So the answer is 42.", "42"),
        ("The temperature is -5 degrees", "-5"),
        ("She lost -$5 overall", "-5"),
        ("x is -3.25", "-3.25"),
        ("from 3-5 people", "5"),  # a range's hyphen is not a minus sign
        ("She ate 3/4 of the pie", "0.75"),
        (r"That gives $\frac{3}{4}$", "0.75"),
        (r"That gives \dfrac{1}{3}", "1/3"),
        ("He has 1 1/2 cups", "1.5"),
        ("That is 25%.", "25"),
        ("First 3 then 7 then finally 10", "10"),
        ("between 10 and 20.5.", "20.5"),
        ("about .5 or 100", "100"),
        ("She had 5 apples, ate 2, so 3 remain. #### 3", "3"),
        ("Total 18 ... #### $1,200.", "1200"),
        ("#### -7", "-7"),
        (r"Thus \boxed{1,000} is it, not 999", "1000"),
        (r"\boxed{\$18} and then 3 more words 4", "18"),
        (r"\boxed{\text{12 dollars}}", "12"),
        (r"\boxed{x = 5}", "5"),
        (r"first \boxed{2} then \boxed{\frac{7}{2}}", "3.5"),
        (r"\boxed{\frac{\pi}{2}}", r"\frac{\pi}{2}"),  # nested braces, kept for symbolic matching
        ("1\u22122 = \u22121", "-1"),  # unicode minus
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["no numbers here", "", "The answer is x."])
def test_no_number(text):
    assert extract_answer(text) is None


@pytest.mark.parametrize(
    "text, value",
    [("$1,234.50", 1234.5), ("3/4", 0.75), (r"\frac{3}{4}", 0.75), ("25%", 25.0), ("12 cm", 12.0),
     ("-0.5", -0.5), ("1 1/2", 1.5), ("42.", 42.0), ("abc", None), ("3 and 4", None), ("", None)],
)
def test_normalize_number(text, value):
    assert normalize_number(text) == value


@pytest.mark.parametrize(
    "predicted, reference, ok",
    [
        ("18", "Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", True),
        ("18.0", "18", True),
        ("1,200", "#### 1200", True),
        ("0.75", "3/4", True),
        ("17", "#### 18", False),
        ("2000001", "#### 2000000", False),  # whole numbers: no relative tolerance (1e-6 would pass it)
        ("1,000,000,000,001", "1000000000000", False),
        ("2000000.0", "#### 2,000,000", True),
        ("1/3", "0.3333", False),  # tolerance is tight: rounding is not a match
        (r"\frac{\pi}{2}", r"\pi/2", True),  # symbolic, via math-verify
        (r"2\sqrt{2}", r"\sqrt{8}", True),
        (None, "18", False),
    ],
)
def test_answers_match(predicted, reference, ok):
    assert answers_match(predicted, reference) is ok


def test_verify_math_reasons():
    assert verify_math("So she makes $18 every day.", "blah\n#### 18") == (True, "match")
    assert verify_math("So the answer is 12.", "#### 14") == (False, "mismatch: got 12, expected 14")
    assert verify_math("I do not know.", "#### 14") == (False, "no answer found")
    assert verify_math("12", "") == (False, "no reference answer")


def test_verify_rows_math_keeps_every_row():
    rows = [
        {"id": "a", "response": "The answer is 1,234.", "reference": "#### 1234"},
        {"id": "b", "response": "It is 5 cm", "reference": "6"},
        {"id": "c", "response": None, "reference": "6"},
        {"id": "d", "response": "nothing", "reference": "6"},
    ]
    out = verify_rows(rows, "math")
    assert [r["id"] for r in out] == ["a", "b", "c", "d"]
    assert [r["verified"] for r in out] == [True, False, False, False]
    assert out[1]["verify_reason"] == "mismatch: got 5, expected 6"
    assert out[2]["verify_reason"] == "missing response"
    assert out[3]["verify_reason"] == "no answer found"
    assert "verified" not in rows[0]  # input rows untouched
    with pytest.raises(ValueError, match="kind"):
        verify_rows(rows, "chess")
