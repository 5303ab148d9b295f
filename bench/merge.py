"""Merge speed and memory: raypost's streaming merge vs mergekit on the same checkpoints.

Inputs: a real model (default packaged:smollm2-135m-instruct) and two copies with small random
perturbations (stand-ins for fine-tunes). Each merge runs in a fresh subprocess that reports its
wall time, its RSS after imports, and its peak RSS (VmHWM); the last line is one JSON object:

  model_mb, and per method: raypost_s, mergekit_s, speedup (mergekit_s / raypost_s),
  raypost_peak_rss_mb, mergekit_peak_rss_mb, raypost_peak_over_imports_mb, max_abs_diff.

Usage: python bench/merge.py [--model REF] [--methods linear,ties]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, resource
spec = json.loads(sys.argv[1])
import torch  # noqa: F401  both engines need it; count it in the import baseline
def rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
if spec["engine"] == "raypost":
    from raypost.merging import merge_checkpoints
else:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
after_imports = rss_mb("VmRSS:")
start = time.time()
if spec["engine"] == "raypost":
    merge_checkpoints(spec["models"], spec["out"], method=spec["method"], base_model=spec.get("base"),
                      weights=spec["weights"], density=0.5)
else:
    entries = [{"model": m, "parameters": {"weight": w, "density": 0.5}} for m, w in zip(spec["models"], spec["weights"])]
    config = {"merge_method": spec["method"], "dtype": "float32", "models": entries}
    if spec.get("base"):
        config["base_model"] = spec["base"]
    run_merge(MergeConfiguration.model_validate(config), spec["out"],
              MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=False))
print(json.dumps({"seconds": time.time() - start, "after_imports_mb": after_imports, "peak_mb": rss_mb("VmHWM:")}))
"""


def perturbed_copy(source: Path, target: Path, seed: int, scale: float = 1e-3) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    generator = torch.Generator().manual_seed(seed)
    for file in source.glob("*.safetensors"):
        tensors = load_file(str(file))
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensors[name] = (tensor.float() + scale * noise * tensor.float().std()).to(tensor.dtype)
        save_file(tensors, str(target / file.name), metadata={"format": "pt"})
    if (source / "model.safetensors.index.json").exists():
        shutil.copy(source / "model.safetensors.index.json", target)
    return target


def run_child(spec: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{spec['engine']} {spec['method']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    def handles(directory):
        out = {}
        for file in directory.glob("*.safetensors"):
            handle = safe_open(str(file), framework="pt")
            out.update({name: handle for name in handle.keys()})
        return out

    ha, hb = handles(a), handles(b)
    return max((ha[n].get_tensor(n).double() - hb[n].get_tensor(n).double()).abs().max().item() for n in ha)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--methods", default="linear,ties")
    args = parser.parse_args()
    from raypost.models import resolve_model

    base = resolve_model(args.model)
    model_mb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    report: dict = {"model": args.model, "model_mb": round(model_mb, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        a = perturbed_copy(base, tmp / "a", seed=1)
        b = perturbed_copy(base, tmp / "b", seed=2)
        for method in args.methods.split(","):
            spec = {"method": method, "models": [str(a), str(b)], "weights": [0.6, 0.4]}
            if method != "linear":
                spec["base"] = str(base)
            ours = run_child({**spec, "engine": "raypost", "out": str(tmp / f"raypost-{method}")})
            theirs = run_child({**spec, "engine": "mergekit", "out": str(tmp / f"mergekit-{method}")})
            report[method] = {
                "raypost_s": round(ours["seconds"], 2),
                "mergekit_s": round(theirs["seconds"], 2),
                "speedup": round(theirs["seconds"] / ours["seconds"], 2),
                "raypost_peak_rss_mb": round(ours["peak_mb"]),
                "mergekit_peak_rss_mb": round(theirs["peak_mb"]),
                "raypost_peak_over_imports_mb": round(ours["peak_mb"] - ours["after_imports_mb"]),
                "max_abs_diff": max_abs_diff(tmp / f"raypost-{method}", tmp / f"mergekit-{method}"),
            }
            print(json.dumps({method: report[method]}), file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
