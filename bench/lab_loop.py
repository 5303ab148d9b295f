"""The claim of arXiv 2512.00884 on the testbed: selection strategies of the closed loop at equal
teacher budget.

    python bench/lab_loop.py [--seeds 1 2 3] [--strategies loss_self random static] [--output-root DIR]

For each seed, one vLLM student and one teacher are started and shared by the loops of every
strategy (recipes/lab/loop_strategies.yaml with the strategy, pool seed and loop seed set): each
loop loads the base weights into the student first, so the runs are the same loops `raypost loop`
would run, without paying the engine start-up once per strategy. A loop already finished under
--output-root is read back, not rerun. The final round of every loop is scored on the same
held-out items, so contrasts are paired over (seed, item) units (bootstrap 95% interval); the
verdict per contrast is "held" when the interval lies above zero, "not held" when below, else
"inconclusive". Writes the overlay report of every run (accuracy against teacher tokens) and a PNG
of the final accuracies, and prints one JSON object last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

import lab
from raypost.evaluation.compare import bootstrap_interval

CONTRASTS = [("random", "loss_self"), ("static", "loss_self"), ("static", "random"),
             ("max_cot_entropy", "loss_self"), ("judge", "loss_self"), ("kcenter", "loss_self")]


def run_seed(recipe_path: Path, seed: int, strategies: list[str], root: Path, overrides: list[str]) -> dict:
    """Every strategy's loop for one seed, on one pair of shared engine actors."""
    from raypost.loop.config import LoopRecipe
    from raypost.loop.controller import LoopController
    from raypost.loop.engines import start_engine_actor
    from raypost.models import resolve_model
    from raypost.recipe import load_recipe
    from raypost.runtime import ensure_ray

    recipes = {}
    for strategy in strategies:
        recipes[strategy] = load_recipe(recipe_path, [
            f"name=lab-loop-{strategy}-s{seed}", f"output_dir={root}/{{name}}", f"loop.selection.strategy={strategy}",
            f"loop.pool.synth.seed={seed}", f"loop.seed={seed}", f"loop.train.seed={seed}", *overrides],
            schema=LoopRecipe)
    pending = [s for s in strategies if not _finished(recipes[s])]
    seconds = {}
    if pending:
        ensure_ray(None)
        first = recipes[pending[0]]
        base = str(resolve_model(first.model("student"), first.cache_dir))
        started = time.perf_counter()
        student = start_engine_actor(base, first.loop.student.engine, first.loop.student.resources, first.cache_dir)
        teacher = start_engine_actor(first.model("teacher"), first.loop.teacher.engine.model_copy(
            update={"tokenizer": base}), first.loop.teacher.resources, first.cache_dir, tokenizer_of=base)
        seconds["engine_start"] = time.perf_counter() - started
        try:
            for strategy in pending:
                started = time.perf_counter()
                with LoopController(recipes[strategy], engines=(student, teacher)) as controller:
                    controller.run()
                seconds[strategy] = time.perf_counter() - started
        finally:
            import ray

            for actor in (student, teacher):
                ray.get(actor.close.remote(), timeout=120)
                ray.kill(actor)
    return {"recipes": recipes, "seconds": seconds}


def _finished(recipe) -> bool:
    rounds = recipe.resolved_output_dir() / "rounds.jsonl"
    expected = len(recipe.loop.shares()) + 1
    return rounds.exists() and len(rounds.read_text().splitlines()) == expected


def final_items(run_dir: Path) -> tuple[int, dict[str, tuple[float, str]]]:
    """The last round's per-item correctness: {item id: (correct, group)}."""
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    last = rounds[-1]["round"]
    items = [json.loads(line) for line in (run_dir / f"round_{last}" / "eval_items.jsonl").read_text().splitlines()]
    return last, {i["id"]: (float(i["correct"]), str(i["group"])) for i in items}


def main() -> None:
    args = lab.arguments(__doc__, "loop_strategies.yaml", "lab-loop", "lab_loop.png", overrides=True,
                         extra=lambda p: p.add_argument("--strategies", nargs="+",
                                                        default=["loss_self", "random", "static"]))

    from raypost.loop.report import render

    root = Path(args.output_root)
    started = time.perf_counter()
    runs, per_seed, seconds = {}, {}, {}
    for seed in args.seeds:
        done = run_seed(Path(args.recipe), seed, args.strategies, root, args.overrides)
        seconds[seed] = {k: round(v, 1) for k, v in done["seconds"].items()}
        for strategy, recipe in done["recipes"].items():
            run_dir = recipe.resolved_output_dir()
            rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
            runs[f"{strategy} s{seed}"] = rounds
            per_seed[(strategy, seed)] = (rounds, final_items(run_dir)[1])
    render(runs, root / "report")

    out: dict = {"seeds": args.seeds, "strategies": args.strategies, "accuracy": {}, "accuracy_ci95": {},
                 "per_seed": {}, "per_level": {}, "teacher_tokens": {}, "rounds": {}}
    units = {}
    for strategy in ["base", *args.strategies]:
        values, groups = [], []
        for seed in args.seeds:
            source = args.strategies[0] if strategy == "base" else strategy
            rounds, items = per_seed[(source, seed)]
            if strategy == "base":   # round 0: the base student, the same for every strategy
                run_dir = root / f"lab-loop-{source}-s{seed}"
                items = {json.loads(line)["id"]: (float(json.loads(line)["correct"]), str(json.loads(line)["group"]))
                         for line in (run_dir / "round_0" / "eval_items.jsonl").read_text().splitlines()}
            keys = sorted(items)
            values += [items[k][0] for k in keys]
            groups += [items[k][1] for k in keys]
            out["per_seed"].setdefault(strategy, []).append(round(float(np.mean([items[k][0] for k in keys])), 4))
            if strategy != "base":
                out["teacher_tokens"].setdefault(strategy, []).append(rounds[-1]["teacher_total"]["tokens"])
                out["rounds"].setdefault(strategy, []).append([round(r["accuracy"], 4) for r in rounds])
        units[strategy] = (np.asarray(values), np.asarray(groups))
        out["accuracy"][strategy] = round(float(units[strategy][0].mean()), 4)
        out["accuracy_ci95"][strategy] = [round(x, 4) for x in bootstrap_interval(units[strategy][0])]
        out["per_level"][strategy] = {g: round(float(units[strategy][0][units[strategy][1] == g].mean()), 4)
                                      for g in sorted(set(groups))}
    out["contrasts"] = {f"{b}_minus_{a}": lab.contrast(units[a][0], units[b][0])
                        for a, b in [*CONTRASTS, *[("base", s) for s in args.strategies]] if a in units and b in units}
    out["units"] = int(len(units["base"][0]))
    out["seconds"] = seconds
    lab.finish(out, root, args.plot, started, plot)


def plot(path: Path, out: dict) -> None:
    names = ["base", *out["strategies"]]
    figure, axis = lab.pyplot().subplots(figsize=(6.5, 3.8))
    for i, name in enumerate(names):
        low, high = out["accuracy_ci95"][name]
        mean = out["accuracy"][name]
        axis.errorbar([i], [mean], yerr=[[mean - low], [high - mean]], fmt="o", capsize=4, color="black")
        axis.scatter([i + 0.12] * len(out["per_seed"][name]), out["per_seed"][name], s=12, alpha=0.6, color="tab:blue")
    axis.set_xticks(range(len(names)), names)
    axis.set_ylabel("held-out accuracy, last round")
    axis.set_title(f"closed loop at equal teacher budget ({len(out['seeds'])} seeds; dots: one seed)", fontsize=9)
    lab.save(figure, path)


if __name__ == "__main__":
    main()
