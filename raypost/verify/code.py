"""Program builders for MBPP and HumanEval tests, code extraction, and sandboxed verification."""

from __future__ import annotations

import re

from raypost.verify.sandbox import SandboxResult, run_python

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}


def mbpp_program(code: str, test_list: list[str], test_setup_code: str = "",
                 test_imports: list[str] | None = None) -> str:
    """MBPP convention: the solution, the setup code, then each `assert` of the task.
    Sanitized MBPP's `test_imports` go first so both the solution and the tests see them."""
    parts = [*(test_imports or []), code, test_setup_code or "", *test_list]
    return "\n".join(p for p in parts if p) + "\n"


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """HumanEval convention (Chen et al. 2021): prompt + completion, the test code, check(entry_point)."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def extract_code(response: str) -> str:
    """The code in a markdown answer: the first ```python block (else the first fenced block of
    any language; an unclosed fence from a truncated answer counts), or the text unchanged."""
    blocks = _FENCE.findall(response or "")
    for tag, body in blocks:
        if tag.lower() in _PYTHON_TAGS:
            return body
    return blocks[0][1] if blocks else (response or "")


def humaneval_completion(prompt: str, code: str, entry_point: str) -> str:
    """Chat models often answer with the whole function rather than the body that continues the
    prompt; a full definition is appended after the prompt (whose stub is then overridden, while
    its imports and helpers stay)."""
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return "\n" + code
    return code


def build_program(response: str, tests_spec: dict) -> str:
    """The program to run for `response` under `tests_spec` (see `verify_code`)."""
    fmt = tests_spec.get("format")
    code = extract_code(response)
    if fmt == "mbpp":
        return mbpp_program(code, list(tests_spec["test_list"]), tests_spec.get("test_setup_code", ""),
                            tests_spec.get("test_imports"))
    if fmt == "humaneval":
        prompt, entry_point = tests_spec["prompt"], tests_spec["entry_point"]
        return humaneval_program(prompt, humaneval_completion(prompt, code, entry_point),
                                 tests_spec["test"], entry_point)
    raise ValueError(f"tests_spec.format must be 'mbpp' or 'humaneval', got {fmt!r}")


def describe(result: SandboxResult) -> str:
    """Sandbox status plus a short detail, e.g. "fail: AssertionError", "timeout after 10.0s"."""
    if result.status == "pass":
        return "pass"
    if result.status == "timeout":
        return f"timeout after {result.seconds:.1f}s"
    return f"{result.status}: {result.detail}"


def verify_code(response: str, tests_spec: dict, *, timeout_s: float | None = None,
                memory_mb: int = 512) -> tuple[bool, str]:
    """Run the code in `response` against its tests in the sandbox: (passed, reason).

    tests_spec: {"format": "mbpp", "test_list": [...], "test_setup_code": "", "test_imports": []}
    or {"format": "humaneval", "prompt": ..., "test": ..., "entry_point": ...}; an optional
    "timeout_s" in it sets the wall-clock limit (default 10 s).
    """
    try:
        program = build_program(response, tests_spec)
    except (KeyError, TypeError, ValueError) as e:
        return False, f"error: bad tests_spec: {e!r}"
    timeout = timeout_s if timeout_s is not None else float(tests_spec.get("timeout_s", 10))
    result = run_python(program, timeout_s=timeout, memory_mb=memory_mb)
    return result.status == "pass", describe(result)
