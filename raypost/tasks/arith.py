"""`arith`: multi-step arithmetic word problems with exact step-by-step solutions.

A testbed on which a 135M student starts weak, can learn, and has graded difficulty. Level L
is L operations among +, -, x k (k = 2..5) and exact division by k, with operands of up to
1, 2, 2, 3 digits for levels 1-4. Names, objects, verbs and sentence templates vary, and
optional distractor sentences carry numbers that do not matter, so dedup and diversity have
real work. The gold solution has one step per line and ends with `#### N` (GSM8K's format).

    problem, question = make_problem(random.Random(0), level=3)
    parse_problem(question) == problem     # the operations read back from the text
    solve(problem).text                    # the exact chain of thought, ending `#### N`

Every sentence the generator writes has a pattern the parser reads back, so the procedural
teacher (raypost.engines.procedural_engine) answers new questions of the family, not only
stored ones; a sentence it cannot read is an error, never a guess.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

FAMILY = "arith"
# The prompt the testbed's training data and its evaluation share.
SYSTEM_PROMPT = "Solve the math problem step by step. End with '#### <number>'."
LEVELS = (1, 2, 3, 4)
# Largest operand digits per level (the start value and every added/subtracted amount).
LEVEL_DIGITS = {1: 1, 2: 2, 3: 2, 4: 3}
MAX_LEVEL = 8

NAMES = {
    "Ava": "she", "Liam": "he", "Mia": "she", "Noah": "he", "Emma": "she", "Omar": "he", "Sofia": "she",
    "Ravi": "he", "Chloe": "she", "Mateo": "he", "Aisha": "she", "Lucas": "he", "Hana": "she", "Ethan": "he",
    "Zara": "she", "Diego": "he", "Nora": "she", "Kenji": "he", "Lena": "she", "Samuel": "he", "Priya": "she",
    "Felix": "he", "Ines": "she", "Tariq": "he", "Grace": "she", "Hugo": "he", "Yara": "she", "Owen": "he",
}
OBJECTS = [
    "apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells", "stamps", "cookies",
    "beads", "candles", "buttons", "tickets", "stones", "ribbons", "crayons", "postcards", "seeds", "balloons",
    "liters of juice", "meters of rope", "kilograms of rice", "bags of flour", "boxes of tea", "jars of jam",
]
PLACES = ["at the market", "at school", "in the park", "at the fair", "on Monday", "on the weekend", "after lunch"]

# Operation sentences. {p} is the capitalized pronoun, {q} its object form, {r} its possessive,
# {f} another person, {b} the amount or factor, {o} the object, {w} a fraction word, {t} a place.
OPERATIONS: dict[str, list[str]] = {
    "add": [
        "{p} buys {b} more {o}.",
        "{p} finds {b} more {o} {t}.",
        "{f} gives {q} {b} {o}.",
        "{p} receives {b} {o} as a gift.",
        "{p} collects {b} more {o}.",
    ],
    "sub": [
        "{p} gives {b} {o} to {f}.",
        "{p} loses {b} {o} {t}.",
        "{p} sells {b} {o}.",
        "{p} uses {b} {o}.",
    ],
    "mul": [
        "{p} then ends up with {b} times as many {o} as before.",
        "The number of {o} {p_low} has grows to {b} times what it was.",
    ],
    "div": [
        "{p} splits {r} {o} into {b} equal piles and keeps one pile.",
        "{p} keeps only {w} of {r} {o} and gives the rest away.",
    ],
}
STARTS = ["{n} has {a} {o}.", "{n} starts with {a} {o}.", "At first, {n} owns {a} {o}."]
QUESTIONS = ["How many {o} does {n} have now?", "How many {o} does {n} have at the end?",
             "In the end, how many {o} does {p_low} have?"]
DISTRACTORS = ["{f} has {c} {o2}.", "{n} is {c} years old.", "{f} lives {c} kilometers away.",
               "There are {c} people {t}."]
FRACTIONS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}
STEP_LINES = {
    "add": "After getting {b} more, {n} has {x} + {b} = {y} {o}.",
    "sub": "After {n} gives up {b}, {n} has {x} - {b} = {y} {o}.",
    "mul": "{b} times as many means {x} * {b} = {y} {o}.",
    "div": "Keeping one of {b} equal parts leaves {x} / {b} = {y} {o}.",
}


class ParseError(ValueError):
    """A question outside the family's grammar: the teacher sets it aside, never guesses."""


@dataclass(frozen=True)
class Problem:
    name: str
    obj: str
    start: int
    ops: tuple[tuple[str, int], ...]    # (add|sub|mul|div, amount or factor)

    @property
    def level(self) -> int:
        return len(self.ops)

    @property
    def digits(self) -> int:
        amounts = [self.start] + [b for op, b in self.ops if op in ("add", "sub")]
        return max(len(str(a)) for a in amounts)


@dataclass
class Solution:
    steps: list[str]
    answer: int
    wrong_step: int | None = None       # where an injected error went in, if one did

    @property
    def text(self) -> str:
        return "\n".join(self.steps + [f"#### {self.answer}"])


@dataclass
class Item:
    id: str
    question: str
    answer: str                         # the gold solution, ending `#### N`
    level: int
    family: str = FAMILY

    def as_record(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": self.answer, "level": self.level,
                "family": self.family}


def _pronouns(name: str) -> dict[str, str]:
    subject = NAMES.get(name, "she")
    return {"p": subject.capitalize(), "p_low": subject, "q": "her" if subject == "she" else "him",
            "r": "her" if subject == "she" else "his"}


def _amount(rng: random.Random, digits: int) -> int:
    return rng.randint(1, 10 ** digits - 1)


def _choose_ops(rng: random.Random, start: int, steps: int, digits: int,
                operations: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    value, ops = start, []
    for _ in range(steps):
        choices = [op for op in operations
                   if not (op == "sub" and value < 2)
                   and not (op == "div" and not any(value % k == 0 for k in range(2, 6)))
                   and not (op == "mul" and value * 2 > 10 ** (digits + 2))]
        op = rng.choice(choices or ["add"])
        if op == "add":
            b = _amount(rng, digits)
            value += b
        elif op == "sub":
            b = rng.randint(1, min(value - 1, 10 ** digits - 1))
            value -= b
        elif op == "mul":
            b = rng.randint(2, 5)
            value *= b
        else:
            b = rng.choice([k for k in range(2, 6) if value % k == 0])
            value //= b
        ops.append((op, b))
    return tuple(ops)


def make_problem(rng: random.Random, level: int, *, digits: int | None = None, distractors: int = 0,
                 operations: tuple[str, ...] = ("add", "sub", "mul", "div")) -> tuple[Problem, str]:
    """A random problem of `level` operations and its question text."""
    if not 1 <= level <= MAX_LEVEL:
        raise ValueError(f"level must be 1..{MAX_LEVEL}, got {level}")
    digits = digits or LEVEL_DIGITS.get(level, 3)
    name = rng.choice(sorted(NAMES))
    obj = rng.choice(OBJECTS)
    start = _amount(rng, digits)
    problem = Problem(name, obj, start, _choose_ops(rng, start, level, digits, operations))
    return problem, render_question(problem, rng, distractors)


def render_question(problem: Problem, rng: random.Random, distractors: int = 0) -> str:
    others = [n for n in sorted(NAMES) if n != problem.name]
    words = {"n": problem.name, "o": problem.obj, **_pronouns(problem.name)}
    sentences = [rng.choice(STARTS).format(a=problem.start, **words)]
    for op, b in problem.ops:
        template = rng.choice(OPERATIONS[op])
        if op == "div" and "{w}" in template and b not in FRACTIONS:
            template = OPERATIONS["div"][0]
        sentences.append(template.format(b=b, f=rng.choice(others), w=FRACTIONS.get(b, ""),
                                         t=rng.choice(PLACES), **words))
    for _ in range(distractors):
        other_obj = rng.choice([o for o in OBJECTS if o != problem.obj])
        text = rng.choice(DISTRACTORS).format(f=rng.choice(others), c=rng.randint(2, 99), o2=other_obj,
                                              t=rng.choice(PLACES), **words)
        sentences.insert(rng.randint(1, len(sentences)), text)
    sentences.append(rng.choice(QUESTIONS).format(**words))
    return " ".join(sentences)


def solve(problem: Problem, *, error_at: int | None = None, error_delta: int = 1) -> Solution:
    """The step-by-step solution; with `error_at`, that step's result is off by `error_delta`
    and the mistake is carried to the end (a plausible wrong chain for verifiers to catch)."""
    steps = [f"{problem.name} starts with {problem.start} {problem.obj}."]
    value = problem.start
    for index, (op, b) in enumerate(problem.ops):
        result = {"add": value + b, "sub": value - b, "mul": value * b,
                  "div": value // b if value % b == 0 else value / b}[op]
        if index == error_at:
            # a wrong count, never a negative one
            result = result + error_delta if result + error_delta >= 0 else result + abs(error_delta)
        if isinstance(result, float):
            result = round(result, 2)
        steps.append(STEP_LINES[op].format(b=b, x=value, y=result, n=problem.name, o=problem.obj))
        value = result
    return Solution(steps, value, error_at)


def grade(problem: Problem, answer: str) -> int:
    """A judge's 1-10 rating of an answer, as a strong teacher would give it: 10 for the right
    final answer; otherwise 1 plus up to 7 for the exact intermediate results it reached, in
    order (a chain that goes wrong late is closer than one that goes wrong at once)."""
    from raypost.verify.math_answer import verify_math

    exact = solve(problem)
    if verify_math(answer or "", exact.text)[0]:
        return 10
    intermediates, value = [], problem.start
    for op, b in problem.ops[:-1]:
        value = {"add": value + b, "sub": value - b, "mul": value * b, "div": value / b}[op]
        intermediates.append(value)
    found = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", (answer or "").replace(",", ""))]
    reached, position = 0, 0
    for target in intermediates:
        while position < len(found) and abs(found[position] - target) > 1e-6:
            position += 1
        if position == len(found):
            break
        reached, position = reached + 1, position + 1
    return 1 + round(7 * reached / max(1, len(intermediates)))


# --- Reading questions back ------------------------------------------------------------------

def _pattern(template: str) -> re.Pattern:
    groups = {"n": r"(?P<n>[A-Z][a-z]+)", "a": r"(?P<a>\d+)", "b": r"(?P<b>\d+)", "o": r"(?P<o>[a-z][a-z ]*?)",
              "p": r"(?:She|He)", "p_low": r"(?:she|he)", "q": r"(?:her|him)", "r": r"(?:her|his)",
              "f": r"[A-Z][a-z]+", "t": "(?:" + "|".join(map(re.escape, PLACES)) + ")",
              "w": "(?P<w>" + "|".join(map(re.escape, FRACTIONS.values())) + ")", "c": r"\d+",
              "o2": r"[a-z][a-z ]*?"}
    out, last = [], 0
    for match in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[last:match.start()]))
        key = match.group(1)
        group = groups[key]
        # a name or object that appears twice must be the same both times
        if key in ("n", "o") and f"(?P<{key}>" in "".join(out):
            group = f"(?P={key})"
        out.append(group)
        last = match.end()
    out.append(re.escape(template[last:]))
    return re.compile("".join(out) + r"$")


_STARTS = [_pattern(t) for t in STARTS]
_OPS = [(op, _pattern(t)) for op, templates in OPERATIONS.items() for t in templates]
_QUESTIONS = [_pattern(t) for t in QUESTIONS]
_DISTRACTORS = [_pattern(t) for t in DISTRACTORS]
_SENTENCE = re.compile(r"(?<=[.?])\s+")
_WORD_FACTOR = {word: k for k, word in FRACTIONS.items()}


def find_question(text: str) -> str:
    """The problem inside a prompt (instructions around it are not part of it)."""
    for paragraph in re.split(r"\n\s*\n", text):
        candidate = paragraph.strip()
        if candidate.lower().startswith(("problem:", "question:")):
            candidate = candidate.split(":", 1)[1].strip()
        first = _SENTENCE.split(candidate, 1)[0]
        if any(p.match(first) for p in _STARTS):
            return candidate
    raise ParseError("no arith problem found (expected a sentence like '<Name> has <N> <objects>.')")


def parse_problem(text: str) -> Problem:
    """Read a question back into its operations; ParseError names the sentence it cannot read."""
    question = find_question(text)
    sentences = [s.strip() for s in _SENTENCE.split(question) if s.strip()]
    start = next((m for p in _STARTS if (m := p.match(sentences[0]))), None)
    name, obj, value = start.group("n"), start.group("o"), int(start.group("a"))
    ops: list[tuple[str, int]] = []
    asked = False
    for sentence in sentences[1:]:
        if asked:
            raise ParseError(f"text after the question: {sentence!r}")
        if any(p.match(sentence) for p in _QUESTIONS):
            asked = True
            continue
        for op, pattern in _OPS:
            match = pattern.match(sentence)
            if match and match.groupdict().get("o", obj) == obj:
                ops.append((op, int(match.group("b")) if "b" in match.groupdict() else _WORD_FACTOR[match.group("w")]))
                break
        else:
            if not any(p.match(sentence) for p in _DISTRACTORS):
                raise ParseError(f"cannot read the sentence {sentence!r}")
    if not asked:
        raise ParseError("the problem asks no question ('How many ...?')")
    if not ops:
        raise ParseError("the problem has no operation")
    return Problem(name, obj, value, tuple(ops))


# --- Writing a new problem from a seed (what a closed loop asks a teacher) -------------------

REWRITE_INSTRUCTION = ("Write a new math word problem of the same kind and difficulty as the one below, "
                       "then solve it step by step. Start with 'Problem:', then 'Solution:', and end "
                       "with '#### <number>'.")
_WRITTEN = re.compile(r"Problem:\s*(?P<q>.+?)\s*\n\s*Solution:\s*\n?(?P<s>.+)$", re.S)


def rewrite_prompt(question: str) -> str:
    return f"{REWRITE_INSTRUCTION}\n\nProblem: {question}"


def is_rewrite_request(text: str) -> bool:
    return text.lstrip().startswith(REWRITE_INSTRUCTION[:40])


def written_problem(text: str) -> tuple[str, str] | None:
    """(question, solution) from a teacher's answer to `rewrite_prompt`, or None."""
    match = _WRITTEN.search(text or "")
    if not match or "####" not in match.group("s"):
        return None
    return match.group("q").strip(), match.group("s").strip()


def stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts, default=str).encode()).digest()[:8], "big")


# --- Data sets ---------------------------------------------------------------------------------

def parse_levels(text: str) -> tuple[int, ...]:
    """'1-4' or '1,3' -> (1, 2, 3, 4) / (1, 3)."""
    levels: list[int] = []
    try:
        for part in str(text).split(","):
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                levels.extend(range(low, high + 1))
            else:
                levels.append(int(part))
    except ValueError:
        raise ValueError(f"levels {text!r}: expected e.g. 1-4 or 1,3") from None
    bad = [lv for lv in levels if not 1 <= lv <= MAX_LEVEL]
    if not levels or bad:
        raise ValueError(f"levels {text!r}: each level must be 1..{MAX_LEVEL}")
    return tuple(dict.fromkeys(levels))


def synthesize(n: int, levels: Iterable[int] = LEVELS, seed: int = 0, *, distractors: float = 0.3,
               exclude: Iterable[str] = (), id_prefix: str | None = None) -> list[Item]:
    """n items, levels in turn (an even share each), questions unique and not in `exclude`.

    `distractors` is the chance that a problem carries one irrelevant sentence (two at 2x).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    levels = tuple(levels)
    rng = random.Random(seed)
    seen = set(exclude)
    prefix = id_prefix or f"arith-s{seed}"
    items: list[Item] = []
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct questions at levels {levels}")
        level = levels[len(items) % len(levels)]
        count = int(distractors) + (1 if rng.random() < distractors % 1 else 0)
        problem, question = make_problem(rng, level, distractors=count)
        if question in seen:
            continue
        seen.add(question)
        items.append(Item(f"{prefix}-{len(items)}", question, solve(problem).text, level))
    return items


def write_jsonl(items: Iterable[Item], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item.as_record()) + "\n")
    tmp.replace(path)
    return path


def read_questions(path: str | Path) -> Iterator[str]:
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)["question"]
