"""The four benchmarks: where their data is, how to prompt, how to score.

A benchmark is a small bundle of plain functions (no class hierarchy): `load` reads the
standard file, `prompts` builds one chat prompt per item (plus stop strings), `score` turns
generation rows into per-sample `Score`s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from raypost.evaluation import prompts as P
from raypost.evaluation.loaders import (
    EvalItem,
    Loaded,
    load_gsm8k,
    load_humaneval,
    load_mbpp,
    load_mmlu,
    mbpp_split,
)
from raypost.evaluation.scoring import (
    Score,
    humaneval_completion_from_response,
    mbpp_code_from_response,
    run_programs,
    score_gsm8k,
    score_letter,
)
from raypost.records import DataError

REPO = Path(__file__).resolve().parents[2]


def data_roots() -> list[Path]:
    """Where default benchmark files are looked up: $RAYPOST_EVAL_DATA, the repo's data/, and
    the shared data directory beside the repo."""
    roots = [Path(p) for p in os.environ.get("RAYPOST_EVAL_DATA", "").split(os.pathsep) if p]
    return roots + [REPO / "data", REPO.parent / "shared" / "data"]


@dataclass
class BenchmarkOptions:
    shots: int | None = None           # None: the benchmark's default
    shots_path: str | None = None      # where exemplars come from (never the evaluated items)
    prompt_style: str = "chat"         # chat | completion (resolved from "auto" by the harness)
    split: str = "test"                # MBPP split (Austin et al. task-id ranges) or "all"
    subjects: list[str] | None = None  # MMLU subjects; default: the three math ones
    method: str = "generate"           # MMLU: generate | loglik
    timeout_s: float = 10.0            # per program, code benchmarks


@dataclass
class Benchmark:
    name: str
    default_data: str                  # relative to a data root
    default_shots: int
    max_tokens: int
    load: Callable[[Path, BenchmarkOptions], Loaded]
    prompts: Callable[[list[EvalItem], Path, BenchmarkOptions], tuple[list[P.Messages], list[str]]]
    score: Callable[[list[EvalItem], list[dict[str, Any]], BenchmarkOptions], list[Score]]
    runs_code: bool = False            # scoring runs programs in the sandbox: a CPU per scoring task
    notes: list[str] = field(default_factory=list)


# Where the standard files come from, for a default file that is not here.
DATA_SOURCES = {
    "gsm8k": "github.com/openai/grade-school-math (grade_school_math/data/test.jsonl)",
    "mbpp": "github.com/google-research/google-research (mbpp/sanitized-mbpp.json)",
    "humaneval": "github.com/openai/human-eval (data/HumanEval.jsonl.gz)",
    "mmlu_math": "people.eecs.berkeley.edu/~hendrycks/data.tar (the dev/ and test/ CSV folders)",
}


def default_data_path(benchmark: Benchmark) -> Path:
    for root in data_roots():
        candidate = root / benchmark.default_data
        if candidate.exists():
            return candidate
    source = DATA_SOURCES.get(benchmark.name)
    raise DataError(f"{benchmark.name}: no data_path given and no {benchmark.default_data} under "
                    f"{', '.join(str(r) for r in data_roots())}. The repo does not ship it"
                    + (f" (get it from {source})" if source else "")
                    + f": put it at {REPO / 'data' / benchmark.default_data}, set RAYPOST_EVAL_DATA to the "
                      f"folder that holds {benchmark.default_data}, or set data_path in the benchmark")


def _shots_count(options: BenchmarkOptions, benchmark_default: int) -> int:
    shots = benchmark_default if options.shots is None else options.shots
    if shots < 0:
        raise DataError(f"shots must be >= 0, got {shots}")
    return shots


# --- GSM8K -------------------------------------------------------------------------------

def _gsm8k_prompts(items, data_path, options):
    k = _shots_count(options, 4)
    if options.shots_path:
        evaluated = {i.fields["question"] for i in items}
        pool = [i for i in load_gsm8k(options.shots_path).items if i.fields["question"] not in evaluated]
        shots = [P.gsm8k_shot_from_item(i) for i in pool[:k]]
    else:
        shots = P.GSM8K_COT_EXEMPLARS[:k]
    if len(shots) < k:
        raise DataError(f"gsm8k: {k} shots asked, only {len(shots)} available "
                        f"({options.shots_path or 'built-in exemplars of Wei et al. 2022'})")
    stop = P.GSM8K_COMPLETION_STOP if options.prompt_style == "completion" else []
    return [P.gsm8k_messages(i, shots, options.prompt_style) for i in items], stop


def _gsm8k_score(items, rows, options):
    by_id = {i.id: i for i in items}
    return [score_gsm8k(r["response"], by_id[r["id"]].reference) for r in rows]


def _testbed_prompts(items, data_path, options):
    if _shots_count(options, 0):
        raise DataError("arith: zero-shot only (the student is trained on the same prompt)")
    stop = P.GSM8K_COMPLETION_STOP if options.prompt_style == "completion" else []
    return [P.testbed_messages(i, options.prompt_style) for i in items], stop


# --- MBPP --------------------------------------------------------------------------------

def _mbpp_load(path, options):
    loaded = load_mbpp(path)
    loaded.items = mbpp_split(loaded.items, options.split)
    return loaded


def _mbpp_prompts(items, data_path, options):
    k = _shots_count(options, 3)
    evaluated = {i.id for i in items}
    pool = [i for i in load_mbpp(options.shots_path or data_path).items if i.id not in evaluated]
    preferred = [i for task in P.MBPP_SHOT_IDS for i in pool if i.fields["task_id"] == task]
    rest = [i for i in mbpp_split(pool, "prompt") if i not in preferred]
    shots = (preferred + rest)[:k]
    if len(shots) < k:
        raise DataError(f"mbpp: {k} shots asked, only {len(shots)} prompt-split tasks (ids 1-10) not evaluated")
    stop = P.MBPP_COMPLETION_STOP if options.prompt_style == "completion" else []
    return [P.mbpp_messages(i, shots, options.prompt_style) for i in items], stop


def _mbpp_score(items, rows, options):
    from raypost.verify.code import mbpp_program

    by_id = {i.id: i for i in items}
    programs, codes = [], []
    for r in rows:
        item = by_id[r["id"]]
        codes.append(mbpp_code_from_response(r["response"]))
        programs.append(mbpp_program(codes[-1], item.fields["test_list"], item.fields["test_setup_code"],
                                     item.fields["test_imports"] or None))
    return run_programs(programs, codes, options.timeout_s)


# --- HumanEval ---------------------------------------------------------------------------

def _humaneval_prompts(items, data_path, options):
    if _shots_count(options, 0):
        raise DataError("humaneval: zero-shot only (the prompt is the function to complete)")
    stop = P.HUMANEVAL_COMPLETION_STOP if options.prompt_style == "completion" else []
    return [P.humaneval_messages(i, options.prompt_style) for i in items], stop


def _humaneval_score(items, rows, options):
    from raypost.verify.code import humaneval_program

    by_id = {i.id: i for i in items}
    programs, codes = [], []
    for r in rows:
        f = by_id[r["id"]].fields
        codes.append(humaneval_completion_from_response(r["response"], f["prompt"], f["entry_point"],
                                                        options.prompt_style))
        programs.append(humaneval_program(f["prompt"], codes[-1], f["test"], f["entry_point"]))
    return run_programs(programs, codes, options.timeout_s)


# --- MMLU math ---------------------------------------------------------------------------

def _mmlu_load(path, options):
    return load_mmlu(path, "test", options.subjects)


def mmlu_dev_path(data_path: Path, options: BenchmarkOptions) -> Path:
    """Few-shot exemplars: `shots_path`, else the `dev` split beside the test files."""
    if options.shots_path:
        return Path(options.shots_path)
    data_path = Path(data_path)
    for candidate in (data_path / "dev", data_path.parent / "dev", data_path.parent.parent / "dev"):
        if candidate.is_dir():
            return candidate
    raise DataError(f"mmlu: no dev/ directory near {data_path} for few-shot exemplars; set shots_path or shots: 0")


def mmlu_shots(items: list[EvalItem], data_path: Path, options: BenchmarkOptions) -> dict[str, list[EvalItem]]:
    k = _shots_count(options, 5)
    subjects = sorted({i.subject for i in items})
    if k == 0:
        return {s: [] for s in subjects}
    dev = mmlu_dev_path(data_path, options)
    pool = load_mmlu(dev, "dev", subjects).items
    shots = {s: [i for i in pool if i.subject == s][:k] for s in subjects}
    short = [s for s, v in shots.items() if len(v) < k]
    if short:
        raise DataError(f"mmlu: {k} shots asked; {dev} has fewer for {', '.join(short)}")
    return shots


def _mmlu_prompts(items, data_path, options):
    shots = mmlu_shots(items, data_path, options)
    stop = P.MMLU_COMPLETION_STOP if options.prompt_style == "completion" else []
    return [P.mmlu_messages(i, shots[i.subject], options.prompt_style) for i in items], stop


def _mmlu_score(items, rows, options):
    by_id = {i.id: i for i in items}
    return [score_letter(r["response"], by_id[r["id"]].reference, by_id[r["id"]].fields["choices"]) for r in rows]


BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark("gsm8k", "gsm8k/heldout.jsonl", 4, 512,
                       lambda path, options: load_gsm8k(path), _gsm8k_prompts, _gsm8k_score),
    # the procedural testbed (raypost data synth arith): GSM8K's format, scored like it, per level
    "arith": Benchmark("arith", "arith/test.jsonl", 0, 256,
                       lambda path, options: load_gsm8k(path), _testbed_prompts, _gsm8k_score),
    "mbpp": Benchmark("mbpp", "mbpp/sanitized-mbpp.json", 3, 512, _mbpp_load, _mbpp_prompts, _mbpp_score,
                      runs_code=True),
    "humaneval": Benchmark("humaneval", "humaneval/HumanEval.jsonl.gz", 0, 512,
                           lambda path, options: load_humaneval(path), _humaneval_prompts, _humaneval_score,
                           runs_code=True),
    "mmlu_math": Benchmark("mmlu_math", "mmlu", 5, 256, _mmlu_load, _mmlu_prompts, _mmlu_score),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
