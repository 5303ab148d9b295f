"""The claim of arXiv 2412.08393 on the testbed: SFT, then rounds of self-iterative preference
with process feedback, against the outcome-only ablation with the same samples.

    python bench/lab_sipf.py [--seeds 1 2 3] [--output-root DIR] [--plot FILE] [a.b=value ...]

For each seed (pool, sampling and training seeded), the process-feedback loop of
recipes/lab/sipf_process_vs_outcome.yaml (its round 0 is the SFT warm-up, the baseline), then the
outcome-only loop starting from that same warm-up model (no second warm-up), so both share round 0
exactly. One vLLM student serves every loop of every seed (each loads its weights in place). A loop already finished under --output-root is
read back, not rerun. Every round is scored on the same held-out items; contrasts are paired over
(seed, item) units (bootstrap 95% interval), with the verdict "held" when the interval lies above
zero, "not held" when below, else "inconclusive". Writes the overlay report of every run and a PNG
of accuracy per round, and prints one JSON object last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

import lab
from raypost.evaluation.compare import bootstrap_interval

VARIANTS = ("process", "outcome")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class SharedStudent:
    """One vLLM student for every seed and variant: each loop loads its own weights into it before
    use (weight sync in place), so only the first loop pays the engine start-up."""

    def __init__(self) -> None:
        self.actor = None
        self.start_s = 0.0

    def engines(self, recipe):
        if self.actor is None:
            from raypost.loop.engines import start_engine_actor
            from raypost.models import resolve_model
            from raypost.runtime import ensure_ray

            ensure_ray(None)
            base = str(resolve_model(recipe.model("student"), recipe.cache_dir))
            started = time.perf_counter()
            self.actor = start_engine_actor(base, recipe.loop.student.engine, recipe.loop.student.resources,
                                            recipe.cache_dir)
            self.start_s = round(time.perf_counter() - started, 1)
        return self.actor, None

    def close(self) -> None:
        if self.actor is not None:
            from raypost.loop.engines import stop_engine_actor

            stop_engine_actor(self.actor)
            self.actor = None


def run_seed(recipe_path: Path, seed: int, root: Path, overrides: list[str], student: SharedStudent) -> dict[str, float]:
    from raypost.loop.config import LoopRecipe
    from raypost.loop.sipf import SipfController
    from raypost.recipe import load_recipe

    common = [f"loop.pool.synth.seed={seed}", f"loop.seed={seed}", f"loop.train.seed={seed}",
              f"loop.sipf.warmup.seed={seed}", f"output_dir={root}/{{name}}", *overrides]
    process = load_recipe(recipe_path, [*common, f"name=lab-sipf-process-s{seed}", "loop.sipf.reward=process"],
                          schema=LoopRecipe)
    seconds: dict[str, float] = {}
    if not _finished(process):
        started = time.perf_counter()
        with SipfController(process, engines=student.engines(process)) as controller:
            controller.run()
        seconds["process"] = round(time.perf_counter() - started, 1)
    warmed = json.loads((process.resolved_output_dir() / "round_0" / "train.json").read_text())["model"]
    outcome = load_recipe(recipe_path, [*common, f"name=lab-sipf-outcome-s{seed}", "loop.sipf.reward=outcome",
                                        "loop.sipf.warmup=null", "loop.sipf.warmup_pool=null",
                                        f"models.student={warmed}"], schema=LoopRecipe)
    if not _finished(outcome):
        started = time.perf_counter()
        with SipfController(outcome, engines=student.engines(outcome)) as controller:
            controller.run()
        seconds["outcome"] = round(time.perf_counter() - started, 1)
    return seconds


def _finished(recipe) -> bool:
    return len(_rows(recipe.resolved_output_dir() / "rounds.jsonl")) == recipe.loop.rounds + 1


def main() -> None:
    args = lab.arguments(__doc__, "sipf_process_vs_outcome.yaml", "lab-sipf", "lab_sipf.png", overrides=True)

    from raypost.loop.report import render

    root = Path(args.output_root)
    started = time.perf_counter()
    seconds, runs = {}, {}
    correct: dict[tuple[str, int], list[float]] = {}   # (variant, round) -> per (seed, item) correctness
    by_level: dict[tuple[str, int], dict[str, list[float]]] = {}   # the same, per testbed level
    records: dict[str, list[list[dict]]] = {v: [] for v in VARIANTS}
    student = SharedStudent()
    try:
        for seed in args.seeds:
            seconds[seed] = run_seed(Path(args.recipe), seed, root, args.overrides, student)
    finally:
        student.close()
    for seed in args.seeds:
        for variant in VARIANTS:
            run_dir = root / f"lab-sipf-{variant}-s{seed}"
            rounds = _rows(run_dir / "rounds.jsonl")
            runs[f"{variant} s{seed}"] = rounds
            records[variant].append(rounds)
            for record in rounds:
                items = sorted(_rows(run_dir / f"round_{record['round']}" / "eval_items.jsonl"), key=lambda i: i["id"])
                correct.setdefault((variant, record["round"]), []).extend(float(i["correct"]) for i in items)
                for item in items:
                    by_level.setdefault((variant, record["round"]), {}).setdefault(str(item["group"]), []).append(
                        float(item["correct"]))
    render(runs, root / "report")
    arrays = {key: np.asarray(values) for key, values in correct.items()}
    last = max(r for _, r in arrays)
    out: dict = {"seeds": args.seeds, "rounds": last, "accuracy": {}, "accuracy_ci95": {}, "per_seed": {},
                 "pairs": {}, "rollout_tokens": {}}
    for variant in VARIANTS:
        out["accuracy"][variant] = {r: round(float(arrays[(variant, r)].mean()), 4) for r in range(last + 1)}
        out["accuracy_ci95"][variant] = {r: [round(x, 4) for x in bootstrap_interval(arrays[(variant, r)])]
                                         for r in range(last + 1)}
        out.setdefault("per_level", {})[variant] = {
            r: {level: round(float(np.mean(v)), 4) for level, v in sorted(by_level[(variant, r)].items())}
            for r in range(last + 1)}
        out["per_seed"][variant] = [[round(rec["accuracy"], 4) for rec in rounds] for rounds in records[variant]]
        out["pairs"][variant] = [[rec.get("pairs") for rec in rounds[1:]] for rounds in records[variant]]
        out["rollout_tokens"][variant] = [rounds[-1]["teacher_total"]["tokens"] for rounds in records[variant]]
    sft = arrays[("process", 0)]
    contrasts = {f"{variant}_round{r}_minus_sft": lab.contrast(sft, arrays[(variant, r)])
                 for variant in VARIANTS for r in range(1, last + 1)}
    contrasts.update({f"process_minus_outcome_round{r}": lab.contrast(arrays[("outcome", r)], arrays[("process", r)])
                      for r in range(1, last + 1)})
    out["contrasts"] = contrasts
    out["units"] = int(len(sft))
    out["seconds"] = seconds
    out["engine_start_s"] = student.start_s
    lab.finish(out, root, args.plot, started, plot)


def plot(path: Path, out: dict) -> None:
    figure, axis = lab.pyplot().subplots(figsize=(6.5, 3.8))
    for offset, variant in zip((-0.05, 0.05), VARIANTS):
        rounds = sorted(out["accuracy"][variant])
        means = [out["accuracy"][variant][r] for r in rounds]
        low = [means[i] - out["accuracy_ci95"][variant][r][0] for i, r in enumerate(rounds)]
        high = [out["accuracy_ci95"][variant][r][1] - means[i] for i, r in enumerate(rounds)]
        axis.errorbar([r + offset for r in rounds], means, yerr=[low, high], marker="o", capsize=3, label=variant)
    axis.set_xticks(sorted(out["accuracy"]["process"]))
    axis.set_xlabel("round (0 = SFT warm-up)")
    axis.set_ylabel("held-out accuracy (95% CI)")
    axis.set_title(f"SIPF: process vs outcome feedback ({len(out['seeds'])} seeds pooled)", fontsize=9)
    axis.legend()
    lab.save(figure, path)


if __name__ == "__main__":
    main()
