"""The closed loop's engines, measured: staying up across rounds against starting per phase.

    python bench/loop.py [--rounds 3] [--student vllm|transformers] [--output-dir DIR] [a.b=value ...]

Runs one small loop on the testbed twice in this process, with the same settings and seeds: first
with `loop.engines: persistent` (the student and teacher are Ray actors for the whole loop and the
student takes each round's weights in place), then with `loop.engines: per_phase` (every phase
that needs an engine starts its own, the student from the round's weights, and stops it after).
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

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def loop_spec(args: argparse.Namespace) -> dict:
    student_engine = {"backend": args.student, "batch_size": 64, "max_model_len": 1024}
    if args.student == "transformers":
        student_engine = {"backend": "transformers", "batch_size": 40, "cpu_threads": 2}
    return {
        "pool": {"synth": {"n": args.pool, "levels": "1-4", "seed": 11}},
        "student": {"engine": student_engine, "sampling": {"max_tokens": 160},
                    "resources": {"cpus_per_actor": 0.25}},
        "teacher": {"model": "procedural:arith", "mode": "rewrite", "sampling": {"max_tokens": 320},
                    "engine": {"backend": "procedural", "tokenizer": "student", "batch_size": 32}},
        "budget": {"requests": args.requests_per_round * args.rounds},
        "rounds": args.rounds,
        "selection": {"strategy": "loss_self", "quota_by": "level"},
        "train": {"method": "sft",
                  "sft": {"learning_rate": 1.0e-4, "lr_scheduler_type": "cosine", "max_steps": args.steps,
                          "per_device_train_batch_size": 8, "max_length": 256, "packing": False},
                  "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1}, "cpu_threads": 2},
                  "checkpointing": {"save_steps": args.steps, "keep": 1}},
        "eval": {"path": str(REPO / "data" / "arith" / "test.jsonl"), "limit": args.eval_per_level, "max_tokens": 200},
    }


def run_once(output_dir: Path, engines: str, args: argparse.Namespace) -> dict:
    from raypost.loop.config import LoopRecipe
    from raypost.loop.controller import run_loop
    from raypost.recipe import load_recipe

    path = output_dir / f"loop-{engines}.yaml"
    spec = {**loop_spec(args), "engines": engines}
    path.write_text(yaml.safe_dump({"name": f"bench-{engines}", "output_dir": str(output_dir / engines),
                                    "models": {"student": "packaged:smollm2-135m-instruct"}, "loop": spec}))
    recipe = load_recipe(path, args.overrides, schema=LoopRecipe)
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--student", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--pool", type=int, default=80, help="seed questions")
    parser.add_argument("--requests-per-round", type=int, default=24)
    parser.add_argument("--steps", type=int, default=6, help="SFT steps per round")
    parser.add_argument("--eval-per-level", type=int, default=10)
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
        "student": args.student, "rounds": args.rounds, "pool": args.pool,
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
