"""The closed loop's engines, measured: staying up across rounds against starting per phase.

    python bench/loop.py [--recipe recipes/loop.yaml] [--student vllm|transformers] [--output-dir DIR] [a.b=value ...]

Runs the testbed's 3-round loop (recipes/loop.yaml, its student on vLLM by default: the engine
whose start-up a restart costs most) twice in this process, with the same settings and seeds:
first with `loop.engines: persistent` (the student and teacher are Ray actors for the whole loop
and the student takes each round's weights in place; `loop.trainer: auto` then trains every round
on one training actor that stays up), then with `loop.engines: per_phase` (every phase that needs
an engine starts its own, the student from the round's weights, and stops it after; each round's
training is its own Ray Train run).
Each round record says where the time went (engine start-up, scoring, teacher, training and the
trainer's own compute, weight sync, eval); "other" is the rest of the round.

Last line, one JSON object:
- `persistent_vs_restart`: the per-phase loop's wall time over the persistent loop's (goal >= 1.5);
- `weight_sync_s`: the slowest in-place weight load of the persistent loop (goal <= 10 s, against
  the `engine_start_s` a restart costs);
- `overhead_fraction`: the persistent loop's round time outside engine calls (scoring, teacher,
  eval) and the trainer's compute (HF's train_runtime), over its round time (goal <= 0.15);
  `overhead_s` splits it (training start-up and export outside the trainer's steps, weight sync,
  engine start-up inside rounds, other).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STUDENT_ENGINES = {"vllm": {"backend": "vllm", "batch_size": 64, "max_model_len": 1024},
                   "transformers": {"backend": "transformers", "batch_size": 40, "cpu_threads": 2}}


def run_once(output_dir: Path, engines: str, args: argparse.Namespace) -> dict:
    from raypost.loop.config import LoopRecipe
    from raypost.loop.controller import run_loop
    from raypost.recipe import load_recipe

    engine = ",".join(f"{k}: {v}" for k, v in STUDENT_ENGINES[args.student].items())
    recipe = load_recipe(args.recipe, [f"name=bench-{engines}", f"output_dir={output_dir / engines}",
                                       f"loop.engines={engines}", f"loop.student.engine={{{engine}}}",
                                       *args.overrides], schema=LoopRecipe)
    started = time.perf_counter()
    rounds = run_loop(recipe)
    wall = time.perf_counter() - started
    phases = ("engine_start", "score", "teacher", "train", "train_compute", "weight_sync", "eval")
    totals = {p: sum(r["seconds"].get(p, 0.0) for r in rounds) for p in phases}
    round_wall = sum(r["seconds"].get("round", 0.0) for r in rounds[1:])
    in_rounds = {p: sum(r["seconds"].get(p, 0.0) for r in rounds[1:]) for p in phases}
    accounted = sum(in_rounds[p] for p in ("engine_start", "score", "teacher", "train", "weight_sync", "eval"))
    compute = in_rounds["score"] + in_rounds["teacher"] + in_rounds["eval"] + in_rounds["train_compute"]
    syncs = [r["weight_sync"]["seconds"] for r in rounds if r.get("weight_sync")]
    return {
        "wall_s": round(wall, 1),
        "seconds": {k: round(v, 1) for k, v in totals.items()},
        "round_wall_s": round(round_wall, 1),
        "overhead_fraction": round((round_wall - compute) / round_wall, 3) if round_wall else None,
        "overhead_s": {"train_outside_steps": round(in_rounds["train"] - in_rounds["train_compute"], 1),
                       "weight_sync": round(in_rounds["weight_sync"], 1),
                       "engine_start": round(in_rounds["engine_start"], 1),
                       "other": round(round_wall - accounted, 1)},
        "weight_sync_max_s": round(max(syncs), 2) if syncs else None,
        "weight_sync_how": sorted({r["weight_sync"]["how"] for r in rounds if r.get("weight_sync")}),
        "accuracy": [round(r["accuracy"], 4) for r in rounds],
        "teacher_tokens": rounds[-1]["teacher_total"]["tokens"],
        "trainer": sorted({str(r.get("trainer")) for r in rounds[1:]}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "loop.yaml"))
    parser.add_argument("--student", choices=sorted(STUDENT_ENGINES), default="vllm")
    parser.add_argument("--output-dir", default=None, help="default: a fresh temporary directory")
    parser.add_argument("overrides", nargs="*", help="loop recipe overrides, e.g. loop.rounds=2")
    args = parser.parse_args()

    from raypost.runtime import ensure_ray

    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="raypost-bench-loop-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray(None)   # one local Ray for both runs: its start-up is in neither
    persistent = run_once(output_dir, "persistent", args)
    restart = run_once(output_dir, "per_phase", args)
    result = {
        "recipe": args.recipe, "student": args.student, "overrides": args.overrides,
        "persistent": persistent, "per_phase": restart,
        "persistent_vs_restart": round(restart["wall_s"] / persistent["wall_s"], 3),
        "weight_sync_s": persistent["weight_sync_max_s"],
        "engine_start_s_per_phase_run": restart["seconds"]["engine_start"],
        "overhead_fraction": persistent["overhead_fraction"],
        "output_dir": str(output_dir),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
