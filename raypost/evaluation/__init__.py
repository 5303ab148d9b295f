"""Evaluation: GSM8K, MBPP, HumanEval and MMLU-math, on the same engines as generation.

    from raypost.evaluation import evaluate, compare
    summary = evaluate("gsm8k", model="packaged:smollm2-135m-instruct", output_dir="runs/eval/gsm8k", limit=50)
    print(compare("runs/eval-base", "runs/eval-student"))
"""

from raypost.evaluation.compare import compare
from raypost.evaluation.harness import EvalSummary, evaluate
from raypost.evaluation.scoring import extract_letter, pass_at_k

__all__ = ["EvalSummary", "compare", "evaluate", "extract_letter", "pass_at_k"]
