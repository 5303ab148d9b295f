"""The loop's report: `report/report.json`, a self-contained `report/index.html` (inline SVG and
PNGs as data, no external scripts or fonts), and the PNGs as files (matplotlib). `raypost loop report RUN...`
overlays several runs (strategies, seeds) in one report."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _svg_accuracy_vs_tokens(runs: dict[str, list[dict]], width: int = 640, height: int = 360) -> str:
    pad = 50
    points = [(r["teacher_total"]["tokens"], r["accuracy"]) for rs in runs.values() for r in rs]
    max_x = max([x for x, _ in points] + [1])
    max_y = max([r["accuracy_ci95"][1] for rs in runs.values() for r in rs] + [0.05])

    def sx(x):
        return pad + (width - 2 * pad) * x / max_x

    def sy(y):
        return height - pad - (height - 2 * pad) * y / max_y

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">teacher tokens</text>',
             f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
             'held-out accuracy (95% CI)</text>']
    for tick in range(5):
        x, y = max_x * tick / 4, max_y * tick / 4
        parts.append(f'<text x="{sx(x)}" y="{height - pad + 14}" text-anchor="middle">{x:.0f}</text>')
        parts.append(f'<text x="{pad - 6}" y="{sy(y) + 4}" text-anchor="end">{y:.2f}</text>')
    for i, (label, rounds) in enumerate(runs.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [(sx(r["teacher_total"]["tokens"]), sy(r["accuracy"])) for r in rounds]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in xy) + '"/>')
        for r, (x, y) in zip(rounds, xy):
            low, high = r["accuracy_ci95"]
            parts.append(f'<line x1="{x:.1f}" y1="{sy(low):.1f}" x2="{x:.1f}" y2="{sy(high):.1f}" stroke="{colour}" '
                         'stroke-opacity="0.5"/>')
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>')
        parts.append(f'<text x="{width - pad - 150}" y="{pad + 14 * i}" fill="{colour}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(label: str, rounds: list[dict]) -> str:
    groups = sorted({g for r in rounds for g in r.get("per_group", {})})
    head = "".join(f"<th>group {html.escape(g)}</th>" for g in groups)
    rows = []
    for r in rounds:
        cells = "".join(f"<td>{r['per_group'][g]['accuracy']:.2f}</td>" if g in r.get("per_group", {}) else "<td></td>"
                        for g in groups)
        low, high = r["accuracy_ci95"]
        rows.append(f"<tr><td>{r['round']}</td><td>{r['accuracy']:.3f} [{low:.3f}, {high:.3f}]</td>{cells}"
                    f"<td>{r['teacher_round']['requests']}</td><td>{r['teacher_total']['tokens']}</td>"
                    f"<td>{r.get('kept', '')}</td><td>{r.get('rejected', '')}</td></tr>")
    return (f"<h2>{html.escape(label)}</h2><table border='1' cellpadding='4' cellspacing='0'><tr><th>round</th>"
            f"<th>accuracy [95% CI]</th>{head}<th>teacher requests</th><th>teacher tokens (total)</th><th>kept</th>"
            f"<th>rejected</th></tr>{''.join(rows)}</table>")


def _pngs(runs: dict[str, list[dict]], directory: Path) -> list[str]:
    """accuracy_vs_tokens.png (each run's rounds against its teacher tokens, 95% intervals),
    accuracy_per_group.png (one panel per group, accuracy per round), budget_per_round.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    def save(figure, name):
        figure.tight_layout()
        figure.savefig(directory / name, dpi=100)
        plt.close(figure)
        names.append(name)

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for label, rounds in runs.items():
        x = [r["teacher_total"]["tokens"] for r in rounds]
        y = [r["accuracy"] for r in rounds]
        err = [[r["accuracy"] - r["accuracy_ci95"][0] for r in rounds], [r["accuracy_ci95"][1] - r["accuracy"] for r in rounds]]
        axis.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    axis.set_xlabel("teacher tokens (cumulative)")
    axis.set_ylabel("held-out accuracy (95% CI)")
    axis.legend(fontsize=7)
    save(figure, "accuracy_vs_tokens.png")

    groups = sorted({g for rounds in runs.values() for r in rounds for g in r.get("per_group", {})}, key=str)
    if groups:
        figure, axes = plt.subplots(1, len(groups), figsize=(3 * len(groups), 3.2), sharey=True, squeeze=False)
        for axis, group in zip(axes[0], groups):
            for label, rounds in runs.items():
                shown = [r for r in rounds if group in r.get("per_group", {})]
                axis.plot([r["round"] for r in shown], [r["per_group"][group]["accuracy"] for r in shown],
                          marker="o", label=label)
            axis.set_title(f"group {group}")
            axis.set_xlabel("round")
        axes[0][0].set_ylabel("accuracy")
        axes[0][-1].legend(fontsize=6)
        save(figure, "accuracy_per_group.png")

    figure, axis = plt.subplots(figsize=(6.5, 3.5))
    width = 0.8 / max(1, len(runs))
    for i, (label, rounds) in enumerate(runs.items()):
        spent = [r for r in rounds if r["round"] > 0]
        axis.bar([r["round"] + i * width for r in spent], [r["teacher_round"]["tokens"] for r in spent], width,
                 label=label)
    axis.set_xlabel("round")
    axis.set_ylabel("teacher tokens this round")
    axis.legend(fontsize=7)
    save(figure, "budget_per_round.png")
    return names


def _inline_png(path: Path) -> str:
    import base64

    data = base64.b64encode(path.read_bytes()).decode()
    return f"<p><img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'/></p>"


def render(runs: dict[str, list[dict]], directory: Path, extra: dict[str, Any] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps({"runs": runs, **(extra or {})}, indent=1, default=str))
    pngs = _pngs(runs, directory)
    body = ["<h1>raypost loop report</h1>", _svg_accuracy_vs_tokens(runs)]
    body += [_inline_png(directory / name) for name in pngs[1:]]   # the first is the SVG above, as a file
    body += [_table(label, rounds) for label, rounds in runs.items()]
    (directory / "index.html").write_text("<!doctype html><html><head><meta charset='utf-8'><title>raypost loop"
                                          "</title></head><body>" + "".join(body) + "</body></html>")
    return directory / "index.html"


def write_report(run_dir: Path, rounds: list[dict], recipe) -> Path:
    label = f"{recipe.name} ({recipe.loop.selection.strategy})"
    return render({label: rounds}, run_dir / "report", {"recipe": recipe.model_dump(mode="json")})


def overlay(run_dirs: list[str | Path], output: str | Path) -> Path:
    runs = {}
    for run_dir in map(Path, run_dirs):
        rounds_file = run_dir / "rounds.jsonl"
        if not rounds_file.exists():
            from raypost.records import DataError

            raise DataError(f"{run_dir}: no rounds.jsonl (is it a loop's output_dir?)")
        rounds = [json.loads(line) for line in rounds_file.read_text().splitlines() if line.strip()]
        strategy = rounds[0]["strategy"] if rounds else "?"
        runs[f"{run_dir.name} ({strategy})"] = rounds
    return render(runs, Path(output))
