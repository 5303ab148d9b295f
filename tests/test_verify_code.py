"""Program builders, code extraction and verify_rows for code, through the real sandbox."""

import json

from raypost.verify import extract_code, mbpp_program, verify_code, verify_rows

MBPP_SPEC = {"format": "mbpp", "test_list": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"],
             "test_imports": ["import math"]}


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nthen\n```\nf()\n```") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nx = 2") == "x = 2"  # truncated answer, fence never closed
    assert extract_code("    return x + 1\n") == "    return x + 1\n"  # plain continuation kept as is


def test_mbpp_program_order():
    program = mbpp_program("def f(): return math.pi", ["assert f() > 3"], "X = 1", ["import math"])
    assert program.index("import math") < program.index("def f") < program.index("X = 1") < program.index("assert")


def test_verify_code_outcomes():
    assert verify_code("```python\ndef add(a, b):\n    return a + b\n```", MBPP_SPEC) == (True, "pass")
    ok, reason = verify_code("def add(a, b):\n    return a - b", MBPP_SPEC)
    assert not ok and reason.startswith("fail: AssertionError")
    ok, reason = verify_code("def add(a, b) return", MBPP_SPEC)
    assert not ok and reason.startswith("error: SyntaxError")
    ok, reason = verify_code("def add(a, b):\n    while True: pass", {**MBPP_SPEC, "timeout_s": 1})
    assert not ok and reason.startswith("timeout")
    ok, reason = verify_code("x", {"format": "apps"})
    assert not ok and "bad tests_spec" in reason


def test_verify_rows_code():
    rows = [
        {"id": 1, "response": "def add(a, b):\n    return a + b", "reference": json.dumps(MBPP_SPEC)},
        {"id": 2, "response": "def add(a, b):\n    return 0", "reference": json.dumps(MBPP_SPEC)},
        {"id": 3, "response": "def add(a, b):\n    return a + b", "reference": "{not json"},
    ]
    out = verify_rows(rows, "code")
    assert [r["verified"] for r in out] == [True, False, False]
    assert out[1]["verify_reason"].startswith("fail")
    assert "bad tests_spec" in out[2]["verify_reason"]
