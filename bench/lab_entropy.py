"""The claim of arXiv 2506.21220 on the testbed: answer-only SFT vs full chain-of-thought
distillation vs entropy-routed distillation, and the routing signals as predictors of errors.

    python bench/lab_entropy.py [--seeds 1 2 3] [--output-root DIR] [--plot FILE]

Runs recipes/lab/entropy_routing.yaml once per seed (pool and training seeded; a seed already
finished under --output-root is up to date and costs nothing), then reads:
- every model's per-item results on the same held-out items: contrasts are paired over (seed,
  item) units (bootstrap 95% interval); the verdict is "held" when the interval lies above zero,
  "not held" when below, else "inconclusive";
- the teacher's chain-of-thought tokens each variant trains on (the saving routing claims);
- each signal's ROC AUC as a predictor of the student being wrong, per level and pooled, over the
  curated items of all seeds: `first_token` against the answer-only reply's correctness, the
  chain-of-thought signals against the student's own chain of thought's final answer.
Writes a PNG (accuracy per model, per level) and prints one JSON object last.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import lab
from raypost import records
from raypost.curation.entropy import entropy_auc
from raypost.evaluation.compare import bootstrap_interval

MODELS = {"student": "base", "stage-sft_answer_only": "answer_only", "stage-sft_cot": "cot",
          "stage-sft_routed": "routed"}
CONTRASTS = [("answer_only", "routed"), ("cot", "routed"), ("answer_only", "cot"), ("base", "answer_only"),
             ("base", "cot"), ("base", "routed")]
TRAIN_STAGES = ("sft_cot", "sft_answer_only", "sft_routed")


def run_seed(recipe: Path, seed: int, output_dir: Path) -> float:
    return lab.run_recipe(recipe, seed, [f"stages.pool.seed={seed}", *[f"stages.{s}.seed={seed}" for s in TRAIN_STAGES],
                                         f"name=lab-entropy-s{seed}", f"output_dir={output_dir}"])


def cot_tokens(run: Path) -> dict[str, int]:
    """Teacher chain-of-thought tokens each variant trains on (short answers count none)."""
    out = {"base": 0}
    cot = records.read_rows(run / "cot")
    out["cot"] = int(sum(r.get("completion_tokens") or 0 for r in cot))
    for name in ("answer_only", "routed"):
        rows = records.read_rows(run / name)
        out[name] = int(sum(r.get("completion_tokens") or 0 for r in rows if r.get("target_source") == "teacher_cot"))
    return out


def signal_rows(run: Path) -> list[dict]:
    """One row per curated item: its level, every signal measured, and the student's correctness
    under the pass that measured it."""
    levels = {}
    for line in (run / "pool" / "pool.jsonl").read_text().splitlines():
        item = json.loads(line)
        levels[str(item["id"])] = str(item["level"])
    rows = []
    for stage in ("answer_only", "routed"):
        for r in records.read_rows(run / stage):
            for name, value in (r.get("signals") or {}).items():
                if value is not None:
                    rows.append({"level": levels.get(str(r["id"])), "signal": name, "value": value,
                                 "correct": r.get("student_correct")})
    return rows


def aucs(rows: list[dict]) -> dict:
    out = {}
    for name in sorted({r["signal"] for r in rows}):
        mine = [r for r in rows if r["signal"] == name]
        by_level = {}
        for level in sorted({r["level"] for r in mine}):
            at = [r for r in mine if r["level"] == level]
            wrong = sum(1 for r in at if r["correct"] is False)
            auc = entropy_auc([r["value"] for r in at], [r["correct"] for r in at])
            by_level[level] = {"auc": None if auc is None else round(auc, 3), "items": len(at), "wrong": wrong}
        pooled = entropy_auc([r["value"] for r in mine], [r["correct"] for r in mine])
        out[name] = {"pooled": None if pooled is None else round(pooled, 3), "by_level": by_level,
                     "student_accuracy": round(float(np.mean([bool(r["correct"]) for r in mine])), 4)}
    return out


def plot(path: Path, accuracy: dict, interval: dict, by_level: dict) -> None:
    names = list(accuracy)
    figure, (left, right) = lab.pyplot().subplots(1, 2, figsize=(10, 3.8))
    for i, name in enumerate(names):
        low, high = interval[name]
        left.errorbar([i], [accuracy[name]], yerr=[[accuracy[name] - low], [high - accuracy[name]]], fmt="o",
                      capsize=4, color="black")
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("held-out accuracy (95% CI)")
    levels = sorted({level for values in by_level.values() for level in values})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        right.bar([k + i * width for k in range(len(levels))], [by_level[name].get(level, 0) for level in levels],
                  width, label=name)
    names_of_levels = [level if str(level).startswith("level") else f"level {level}" for level in levels]
    right.set_xticks([k + 0.4 - width / 2 for k in range(len(levels))], names_of_levels)
    right.legend(fontsize=7)
    figure.suptitle("answer-only vs chain of thought vs entropy-routed SFT (testbed, seeds pooled)", fontsize=9)
    lab.save(figure, path)


def main() -> None:
    args = lab.arguments(__doc__, "entropy_routing.yaml", "lab-entropy", "lab_entropy.png")

    root = Path(args.output_root)
    seconds = {seed: round(run_seed(Path(args.recipe), seed, root / f"s{seed}"), 1) for seed in args.seeds}
    units: dict[str, list[float]] = {name: [] for name in MODELS.values()}
    per_seed: dict[str, list[float]] = {name: [] for name in MODELS.values()}
    levels: list[str] = []
    tokens: dict[str, list[int]] = {name: [] for name in MODELS.values()}
    signals: list[dict] = []
    for seed in args.seeds:
        run = root / f"s{seed}"
        results = {name: lab.per_item(run / "eval", label) for label, name in MODELS.items()}
        shared = sorted(set.intersection(*(set(r[0]) for r in results.values())))
        for name, (scores, _) in results.items():
            units[name].extend(scores[i] for i in shared)
            per_seed[name].append(round(float(np.mean([scores[i] for i in shared])), 4))
        levels.extend(results["base"][1][i] for i in shared)
        for name, count in cot_tokens(run).items():
            tokens[name].append(count)
        signals.extend(signal_rows(run))
    arrays = {name: np.array(values) for name, values in units.items()}
    levels_array = np.array(levels)
    accuracy = {name: round(float(a.mean()), 4) for name, a in arrays.items()}
    interval = {name: [round(x, 4) for x in bootstrap_interval(a)] for name, a in arrays.items()}
    by_level = {name: {level: round(float(a[levels_array == level].mean()), 4) for level in sorted(set(levels))}
                for name, a in arrays.items()}
    contrasts = {f"{b}_minus_{a}": {**lab.contrast(arrays[a], arrays[b]),
                                    "per_seed": [round(x - y, 4) for x, y in zip(per_seed[b], per_seed[a])]}
                 for a, b in CONTRASTS}
    plot(Path(args.plot), accuracy, interval, by_level)
    print(json.dumps({"seeds": args.seeds, "units": len(levels), "accuracy": accuracy, "accuracy_ci95": interval,
                      "accuracy_per_seed": per_seed, "accuracy_by_level": by_level, "contrasts": contrasts,
                      "teacher_cot_tokens": {k: v for k, v in tokens.items() if k != "base"},
                      "signal_roc_auc": aucs(signals), "plot": args.plot, "seed_seconds": seconds}))


if __name__ == "__main__":
    main()
