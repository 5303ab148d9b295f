"""SIPF on the testbed, measured: what a round costs and whether the student got better.

    python bench/sipf.py [--recipe recipes/sipf.yaml] [--output-dir DIR] [a.b=value ...]
    python bench/sipf.py --run-dir runs/sipf          (read a finished run, run nothing)

Runs `raypost sipf` on a fresh output dir (its own local Ray) unless --run-dir names a finished
run, then reads its round records and per-item eval results:

- `accuracy` per round (round 0 = the warm-up SFT, the baseline) with Wilson 95% intervals, and
  `last_minus_sft` with its paired bootstrap 95% interval over the same held-out items;
- `round_seconds` (each round's phases) and `run_seconds` (the whole command, when it ran one);
- `rollouts_per_question`: rollout sequences per sampled question, each round;
- `rollout_tok_s` and `sample_tok_s`: completion tokens per second of each round's rollout phase
  and sampling phase (same engine actor), and their ratio `rollout_vs_sample_tok_s`;
- `rollout_vs_bare_tok_s` (goal >= 0.9): round 1's rollout phase through raypost (a Ray actor,
  the ledger fsynced per batch, budget checks) over the bare engine in this process on the same
  prefixes, model, engine and sampling settings (`bare_rollout_round1`).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raypost.evaluation.compare import paired_bootstrap  # noqa: E402
from raypost.loop.ledger import Ledger  # noqa: E402


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def summarize(run_dir: Path) -> dict:
    rounds = _rows(run_dir / "rounds.jsonl")
    if not rounds:
        raise SystemExit(f"{run_dir}: no rounds.jsonl (not a finished loop run)")
    ledger = Ledger(run_dir / "ledger.jsonl")
    out: dict = {"run_dir": str(run_dir), "rounds": len(rounds) - 1, "strategy": rounds[-1].get("strategy"),
                 "accuracy": {}, "accuracy_ci95": {}, "per_level": {}, "round_seconds": {},
                 "rollouts_per_question": {}, "rollout_tok_s": {}, "sample_tok_s": {}, "rollout_vs_sample_tok_s": {},
                 "pairs": {}, "pool_accuracy": {}}
    correct_by_round = {}
    for record in rounds:
        r = record["round"]
        out["accuracy"][r] = round(record["accuracy"], 4)
        out["accuracy_ci95"][r] = [round(x, 4) for x in record["accuracy_ci95"]]
        out["per_level"][r] = {g: round(v["accuracy"], 4) for g, v in record["per_group"].items()}
        out["round_seconds"][r] = {k: round(v, 1) for k, v in (record.get("seconds") or {}).items()}
        items = _rows(run_dir / f"round_{r}" / "eval_items.jsonl")
        correct_by_round[r] = {i["id"]: float(i["correct"]) for i in items}
        if r == 0:
            continue
        sample = _json(run_dir / f"round_{r}" / "sample.json") or {}
        rollout = _json(run_dir / f"round_{r}" / "rollout.json") or {}
        out["pairs"][r] = record.get("pairs")
        out["pool_accuracy"][r] = record.get("pool_accuracy")
        questions = sample.get("questions") or 0
        out["rollouts_per_question"][r] = round(rollout.get("rollouts", 0) / questions, 2) if questions else None
        rollout_tokens = sum(e.get("completion_tokens", 0) for e in ledger.entries.values() if e["round"] == r)
        rollout_tok_s = rollout_tokens / rollout["seconds"] if rollout.get("seconds") and rollout_tokens else None
        sample_tok_s = (sample["completion_tokens"] / sample["seconds"]
                        if sample.get("completion_tokens") and sample.get("seconds") else None)
        out["rollout_tok_s"][r] = None if rollout_tok_s is None else round(rollout_tok_s, 1)
        out["sample_tok_s"][r] = None if sample_tok_s is None else round(sample_tok_s, 1)
        out["rollout_vs_sample_tok_s"][r] = (round(rollout_tok_s / sample_tok_s, 3)
                                           if rollout_tok_s and sample_tok_s else None)
    last = max(correct_by_round)
    shared = sorted(set(correct_by_round[0]) & set(correct_by_round[last]))
    if last > 0 and shared:
        base = np.array([correct_by_round[0][i] for i in shared])
        after = np.array([correct_by_round[last][i] for i in shared])
        out["last_minus_sft"] = round(float(after.mean() - base.mean()), 4)
        out["last_minus_sft_ci95"] = [round(x, 4) for x in paired_bootstrap(base, after)]
        out["eval_items"] = len(shared)
    out["rollout_tokens_total"] = ledger.totals().completion_tokens
    return out


def bare_rollouts(run_dir: Path, round_index: int = 1, limit: int | None = None) -> dict:
    """Round `round_index`'s rollout prefixes (the first `limit`, in the order the loop sent them),
    continued by the bare engine in this process (no Ray, no loop, no ledger), with the same model,
    engine and sampling settings."""
    from raypost.config import EngineConfig, SamplingConfig
    from raypost.engines import build_engine
    from raypost.engines.base import Request
    from raypost.loop.sipf import rollout_messages, step_prefixes

    settings = json.loads((run_dir / "loop.json").read_text())["settings"]
    sipf = settings["sipf"]
    pool = {r["id"]: r for r in _rows(run_dir / "pool.jsonl")}
    system = settings["pool"].get("system_prompt")
    prefixes = {
        (question_id, prefix): rollout_messages(
            ([{"role": "system", "content": system}] if system else [])
            + [{"role": "user", "content": pool[question_id]["question"]}], prefix)
        for question_id, prefix in step_prefixes(_rows(run_dir / f"round_{round_index}" / "paths.jsonl"))
    }
    if not prefixes:
        return {"prefixes": 0}
    model = _rows(run_dir / "rounds.jsonl")[round_index - 1]["model"]
    engine_config = EngineConfig.model_validate(settings["student"]["engine"])
    sampling = SamplingConfig.model_validate({**settings["student"]["sampling"], "n": sipf["k"],
                                              "temperature": sipf["temperature"], "top_p": sipf["top_p"],
                                              "max_tokens": sipf["rollout_max_tokens"], "logprobs": None, "seed": 0})
    engine = build_engine(model, engine_config)
    requests = [Request(id=str(i), messages=m) for i, m in enumerate(prefixes.values())][:limit]
    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(requests), engine_config.batch_size):
        for samples in engine.generate(requests[start:start + engine_config.batch_size], sampling):
            tokens += sum(c.completion_tokens for c in samples)
    seconds = time.perf_counter() - started
    engine.close()
    return {"prefixes": len(requests), "tokens": tokens, "seconds": round(seconds, 1), "tok_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "sipf.yaml"))
    parser.add_argument("--output-dir", help="where the run goes (default: a fresh temporary dir)")
    parser.add_argument("--run-dir", help="a finished run to read instead of running one")
    parser.add_argument("overrides", nargs="*", metavar="a.b=value")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-engine baseline")
    parser.add_argument("--bare-prefixes", type=int, default=64,
                        help="prefixes the bare baseline continues (0: all of round 1's)")
    args = parser.parse_args()
    if args.run_dir:
        run_dir = Path(args.run_dir)
        result = summarize(run_dir)
    else:
        output = Path(args.output_dir or tempfile.mkdtemp(prefix="raypost-bench-sipf-"))
        started = time.perf_counter()
        command = [sys.executable, "-m", "raypost", "sipf", args.recipe, f"output_dir={output}", *args.overrides]
        completed = subprocess.run(command, cwd=REPO)
        if completed.returncode != 0:
            raise SystemExit(f"raypost sipf exited {completed.returncode}")
        run_dir = output
        result = {**summarize(output), "run_seconds": round(time.perf_counter() - started, 1),
                  "recipe": args.recipe, "overrides": args.overrides}
    rollout_tok_s = result["rollout_tok_s"].get(1)
    if not args.no_bare and rollout_tok_s:
        bare = bare_rollouts(run_dir, 1, args.bare_prefixes or None)
        result["bare_rollout_round1"] = bare
        # the goal: raypost's rollout phase (Ray actor, ledger, budget checks) >= 0.9 of the bare engine
        result["rollout_vs_bare_tok_s"] = round(rollout_tok_s / bare["tok_s"], 3) if bare.get("tok_s") else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
