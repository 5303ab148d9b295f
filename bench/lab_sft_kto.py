"""The claim of arXiv 2411.02939 on the testbed: SFT alone vs SFT -> KTO vs merges of the two.

    python bench/lab_sft_kto.py [--seeds 1 2 3] [--output-root DIR] [--plot FILE]

Runs recipes/lab/sft_kto_merge.yaml once per seed (pool, training order and KTO all seeded; a
seed already finished under --output-root is up to date and costs nothing), then reads every
model's per-item results on the same held-out items. Contrasts are paired: the same (seed, item)
units for both models, resampled together (bootstrap 95% interval). The verdict per contrast:
"held" when the interval lies above zero, "not held" when below, else "inconclusive". Writes a PNG
(accuracy per model with its interval, one dot per seed) and prints one JSON object last.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import lab
from raypost.evaluation.compare import bootstrap_interval, paired_bootstrap

MODELS = {"student": "base", "stage-sft": "sft", "stage-kto": "sft_kto", "stage-linear": "merge_linear",
          "stage-slerp": "merge_slerp"}
CONTRASTS = [("sft", "sft_kto"), ("sft", "merge_linear"), ("sft", "merge_slerp"), ("sft_kto", "merge_linear"),
             ("base", "sft")]


def run_seed(recipe: Path, seed: int, output_dir: Path) -> float:
    return lab.run_recipe(recipe, seed, [f"stages.pool.seed={seed}", f"stages.sft.seed={seed}", f"stages.kto.seed={seed}",
                                         f"name=lab-sft-kto-s{seed}", f"output_dir={output_dir}"])


def plot(path: Path, accuracy: dict, interval: dict, per_seed: dict) -> None:
    from PIL import Image, ImageDraw

    names = list(accuracy)
    width, height, left, bottom, top = 760, 420, 70, 60, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    top_value = max(0.05, max(max(h for _, h in interval.values()), max(max(v) for v in per_seed.values())) * 1.15)

    def y(value: float) -> float:
        return height - bottom - (height - bottom - top) * value / top_value

    draw.line([(left, top), (left, height - bottom), (width - 20, height - bottom)], fill="black")
    for tick in np.linspace(0, top_value, 5):
        draw.line([(left - 4, y(tick)), (left, y(tick))], fill="black")
        draw.text((8, y(tick) - 6), f"{100 * tick:.0f}%", fill="black")
    slot = (width - left - 40) / len(names)
    for i, name in enumerate(names):
        x = left + 20 + slot * i + slot / 2
        draw.rectangle([x - slot * 0.3, y(accuracy[name]), x + slot * 0.3, y(0)], fill=(120, 160, 210))
        low, high = interval[name]
        draw.line([(x, y(low)), (x, y(high))], fill="black", width=2)
        draw.line([(x - 6, y(low)), (x + 6, y(low))], fill="black", width=2)
        draw.line([(x - 6, y(high)), (x + 6, y(high))], fill="black", width=2)
        for j, value in enumerate(per_seed[name]):
            dx = (j - (len(per_seed[name]) - 1) / 2) * 8
            draw.ellipse([x + dx - 3, y(value) - 3, x + dx + 3, y(value) + 3], fill=(200, 60, 40))
        draw.text((x - slot * 0.4, height - bottom + 8), name, fill="black")
    draw.text((left, 10), "testbed pass@1 (held-out), mean over seeds, bootstrap 95% CI; dots: seeds",
              fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    args = lab.arguments(__doc__, "sft_kto_merge.yaml", "lab-sft-kto", "lab_sft_kto.png")

    root = Path(args.output_root)
    seconds = {seed: round(run_seed(Path(args.recipe), seed, root / f"s{seed}"), 1) for seed in args.seeds}
    units: dict[str, list[float]] = {name: [] for name in MODELS.values()}
    levels: list[str] = []
    per_seed: dict[str, list[float]] = {name: [] for name in MODELS.values()}
    stage_seconds = {}
    for seed in args.seeds:
        run = root / f"s{seed}"
        summary = json.loads((run / "summary.json").read_text())
        stage_seconds[seed] = {n: s.get("seconds") for n, s in summary.items() if isinstance(s, dict)}
        results = {name: lab.per_item(run / "eval", label) for label, name in MODELS.items()}
        shared = sorted(set.intersection(*(set(r[0]) for r in results.values())))
        for name, (scores, _) in results.items():
            units[name].extend(scores[i] for i in shared)
            per_seed[name].append(round(float(np.mean([scores[i] for i in shared])), 4))
        subjects = results["base"][1]
        levels.extend(subjects[i] for i in shared)
    arrays = {name: np.array(values) for name, values in units.items()}
    levels_array = np.array(levels)
    accuracy = {name: round(float(a.mean()), 4) for name, a in arrays.items()}
    interval = {name: [round(x, 4) for x in bootstrap_interval(a)] for name, a in arrays.items()}
    contrasts = {}
    for a, b in CONTRASTS:
        low, high = paired_bootstrap(arrays[a], arrays[b])
        by_level = {}
        for level in sorted(set(levels)):
            mask = levels_array == level
            l_low, l_high = paired_bootstrap(arrays[a][mask], arrays[b][mask])
            by_level[level] = {"diff": round(float(arrays[b][mask].mean() - arrays[a][mask].mean()), 4),
                               "ci95": [round(l_low, 4), round(l_high, 4)], "units": int(mask.sum())}
        contrasts[f"{b}_minus_{a}"] = {
            "diff": round(float(arrays[b].mean() - arrays[a].mean()), 4), "ci95": [round(low, 4), round(high, 4)],
            "verdict": lab.verdict(low, high),
            "per_seed": [round(x - y, 4) for x, y in zip(per_seed[b], per_seed[a])], "by_level": by_level}
    plot(Path(args.plot), accuracy, interval, per_seed)
    print(json.dumps({"seeds": args.seeds, "units": len(levels), "accuracy": accuracy, "accuracy_ci95": interval,
                      "accuracy_per_seed": per_seed, "contrasts": contrasts, "plot": args.plot,
                      "seed_seconds": seconds, "stage_seconds": stage_seconds}))


if __name__ == "__main__":
    main()
