"""Training throughput: raypost (TRL inside Ray Train, 1 worker) vs plain TRL in one process.

Same model, data (GSM8K question + answer as prompt/completion), batch and cores. Prints one
JSON object as the last line:
  raypost_tok_s / trl_tok_s / ratio       unpacked SFT, steady-state real tokens per second
  trl_same_allocator_tok_s / ...          plain TRL again, in a process given the host allocator
                                          raypost gives its CPU workers (scaling.allocator: retain)
  packed_vs_unpacked                      raypost SFT with packing vs TRL's unpacked default
  peak_rss_mb_*                           peak resident memory per worker / of the TRL process
Goals: ratio >= 0.95, packed_vs_unpacked >= 1.5.

    python bench/train.py [--model packaged:smollm2-135m-instruct] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO / "data" / "gsm8k" / "quickstart.jsonl"


def write_dataset(path: Path, limit: int) -> Path:
    rows = []
    with GSM8K.open() as handle:
        for line in handle:
            item = json.loads(line)
            rows.append({"prompt": [{"role": "user", "content": item["question"]}],
                         "completion": [{"role": "assistant", "content": item["answer"]}]})
            if len(rows) == limit:
                break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def block(args, packing: bool) -> dict:
    return {"learning_rate": 1e-4, "max_steps": args.steps, "per_device_train_batch_size": args.batch,
            "max_length": args.max_length, "packing": packing}


def run_trl(args, model_path: str, data: Path, scratch: Path, bf16: bool) -> float:
    """Plain TRL SFTTrainer, unpacked (TRL's default), in this process, at raypost's precision
    (TRL's own default is bf16 autocast even on CPU: left implicit, the two runs would differ)."""
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from raypost.training.callbacks import ThroughputCallback

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    throughput = ThroughputCallback()
    config = SFTConfig(output_dir=str(scratch / "trl"), learning_rate=1e-4, max_steps=args.steps,
                       per_device_train_batch_size=args.batch, max_length=args.max_length, packing=False,
                       logging_steps=1, save_strategy="no", report_to=["none"], disable_tqdm=True, use_cpu=True,
                       seed=0, data_seed=0, bf16=bf16, model_init_kwargs={"dtype": torch.float32})
    trainer = SFTTrainer(model=model_path, args=config, train_dataset=datasets.Dataset.from_list(rows))
    trainer.callback_handler.callbacks.insert(0, throughput)
    trainer.train()
    return throughput.steady_tok_s


def run_trl_with_allocator(args, model_path: str, data: Path, scratch: Path, bf16: bool) -> float:
    """`run_trl` in a fresh process started with raypost's worker allocator (an allocator is
    chosen at process start), so the ratio can be read with and without that difference."""
    import subprocess

    from raypost.training.allocator import allocator_env

    command = [sys.executable, __file__, "--trl-only", "--model", model_path, "--data", str(data),
               "--scratch", str(scratch / "trl-allocator"), "--bf16", str(int(bf16)), "--steps", str(args.steps),
               "--batch", str(args.batch), "--max-length", str(args.max_length), "--cores", str(args.cores)]
    env = {**os.environ, **allocator_env("retain")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"TRL with raypost's allocator failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["trl_tok_s"]


def run_raypost(args, model_path: str, data: Path, scratch: Path, packing: bool):
    from raypost.training import TrainConfig, train

    config = TrainConfig.model_validate({
        "method": "sft", "sft": block(args, packing), "checkpointing": {"save_steps": 10**6},
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": float(args.cores)}},
    })
    result = train(config, model=model_path, dataset=data, output_dir=scratch / f"raypost-packed{int(packing)}")
    return result.metrics["steady_tokens_per_s"], result.peak_rss_mb_per_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (random, real tokenizer) or a model reference")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--trl-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.cores)
    if args.trl_only:
        scratch = Path(args.scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        print(json.dumps({"trl_tok_s": run_trl(args, args.model, Path(args.data), scratch, bool(args.bf16))}))
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="raypost-bench-train-"))
    if args.model == "tiny":
        from raypost.models.tiny import make_tiny_model

        model_path = str(make_tiny_model(scratch / "tiny"))
    else:
        from raypost.models import resolve_model

        model_path = str(resolve_model(args.model))
    data = write_dataset(scratch / "gsm8k_sft.jsonl", args.rows)

    from raypost.metrics import peak_rss_mb
    from raypost.training import TrainConfig
    from raypost.training.methods import uses_cpu_bf16_autocast

    bf16 = uses_cpu_bf16_autocast(TrainConfig.model_validate({"method": "sft"}))
    # TRL first, before Ray starts, so nothing else competes for the cores
    trl_tok_s = run_trl(args, model_path, data, scratch, bf16)
    trl_peak = peak_rss_mb()
    trl_allocator_tok_s = run_trl_with_allocator(args, model_path, data, scratch, bf16)
    from raypost.runtime import ensure_ray

    ensure_ray(num_cpus=args.cores)
    raypost_tok_s, peaks_unpacked = run_raypost(args, model_path, data, scratch, packing=False)
    packed_tok_s, peaks_packed = run_raypost(args, model_path, data, scratch, packing=True)
    report = {
        "model": args.model, "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
        "cores": args.cores, "precision": "bf16 autocast" if bf16 else "fp32",
        "raypost_tok_s": round(raypost_tok_s, 1),
        "trl_tok_s": round(trl_tok_s, 1),
        "ratio": round(raypost_tok_s / trl_tok_s, 3),
        "trl_same_allocator_tok_s": round(trl_allocator_tok_s, 1),
        "ratio_same_allocator": round(raypost_tok_s / trl_allocator_tok_s, 3),
        "raypost_packed_tok_s": round(packed_tok_s, 1),
        "packed_vs_unpacked": round(packed_tok_s / trl_tok_s, 3),
        "packed_vs_unpacked_same_allocator": round(packed_tok_s / trl_allocator_tok_s, 3),
        "peak_rss_mb_per_worker_unpacked": [round(x) for x in peaks_unpacked],
        "peak_rss_mb_per_worker_packed": [round(x) for x in peaks_packed],
        "peak_rss_mb_trl_process": round(trl_peak),
        "goals": {"ratio": 0.95, "packed_vs_unpacked": 1.5},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
