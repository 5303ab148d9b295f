"""merge_checkpoints: fuse two or more HF checkpoints of one architecture into a new checkpoint.

The merge streams: for each output tensor it reads that tensor from every input (memory-mapped
safetensors), merges it, and appends it to the output shard, whose header was written before
any math. Peak memory is a few copies of the largest tensor, not a model.

The output is written to `<output_dir>.partial` and renamed when complete; `merge.json` inside
records what was merged, so a finished merge can be recognized and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from raypost import metrics
from raypost.merging import methods
from raypost.merging.config import check_merge_arguments
from raypost.merging.checkpoint import (
    Checkpoint,
    MergeError,
    ShardWriter,
    check_compatible,
    copy_side_files,
    parse_size,
    plan_shards,
    shard_names,
    write_index,
)

MARKER = "merge.json"

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "auto": None,
}


@dataclass
class MergeSummary:
    output_dir: str
    method: str
    models: list[str]
    base_model: str | None
    tensors_merged: int
    tensors_copied: int
    shards: int
    output_bytes: int
    seconds: float
    peak_rss_mb: float  # the process's peak resident memory so far (includes what ran before)

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"merge[{self.method}]: {len(self.models) + (self.base_model is not None)} checkpoints -> {self.output_dir} "
                f"({self.tensors_merged} tensors merged, {self.output_bytes / 1e6:.1f} MB, {self.seconds:.1f}s, "
                f"peak RSS {self.peak_rss_mb:.0f} MB)")


def tensor_seed(seed: int, name: str) -> int:
    """Each tensor gets its own DARE generator, so masks do not depend on order or sharding."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def merge_checkpoints(
    models: list[str | Path],
    output_dir: str | Path,
    *,
    method: str = "linear",
    weights: list[float] | None = None,
    base_model: str | Path | None = None,
    t: float = 0.5,
    density: float = 0.5,
    normalize: bool | None = None,
    rescale: bool | None = None,
    seed: int = 0,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
) -> MergeSummary:
    """Merge checkpoints with `method`; write an HF safetensors checkpoint to `output_dir`.

    models: model references (local HF dir, .gguf, packaged:NAME, hub id); `weights` has one
    entry per model (default 1.0 each). base_model: the checkpoint task vectors are taken
    against (task_arithmetic, ties, dare_*); for slerp, the t=0 end (default: models[0]).
    If base_model also appears in `models` it is the base only (its weight is dropped).
    normalize / rescale: None means mergekit's default for the method. dtype: output dtype
    (default: the donor's per tensor); math runs in float32. Config, tokenizer and chat template
    come from base_model, else models[0].
    """
    from raypost.models import resolve_model

    started = time.time()
    request = merge_spec(models, method=method, weights=weights, base_model=base_model, t=t, density=density,
                         normalize=normalize, rescale=rescale, seed=seed, dtype=dtype)
    try:
        check_merge_arguments(method, len(models), weights, base_model is not None, t, density)
    except ValueError as error:
        raise MergeError(str(error)) from None
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"dtype: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    weights = list(weights) if weights is not None else [1.0] * len(models)
    paths = [resolve_model(str(m), cache_dir=cache_dir) for m in models]
    base_path = resolve_model(str(base_model), cache_dir=cache_dir) if base_model is not None else None

    if base_path is not None:
        kept = [(p, w) for p, w in zip(paths, weights) if p.resolve() != base_path.resolve()]
        paths, weights = [p for p, _ in kept], [w for _, w in kept]
    if method == "slerp":
        if base_path is None:
            base_path, paths, weights = paths[0], paths[1:], weights[1:]
        if len(paths) != 1:
            raise MergeError("models: slerp interpolates between exactly two models (base_model and one other)")
    elif method in methods.NEEDS_BASE and not paths:
        raise MergeError(f"models: {method} needs at least one model besides base_model")
    elif method == "linear" and len(paths) < 2:
        raise MergeError("models: linear merging needs two or more models")
    if method == "linear" and normalize is not False and abs(sum(weights)) < 1e-12:
        raise MergeError(f"weights: they sum to zero, so they cannot be normalized ({weights}); set normalize: false")

    output = Path(output_dir).expanduser().absolute()
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise MergeError(f"{output}: output directory exists and is not empty (pass overwrite=True to replace it)")
    partial = output.with_name(output.name + ".partial")

    normalize = methods.default_normalize(method) if normalize is None else normalize
    rule = methods.TASK_RULES.get(method)
    rescale = (rule.default_rescale if rule else False) if rescale is None else rescale
    out_dtype = DTYPES[dtype] if dtype is not None else None  # "auto" maps to None too

    with ExitStack() as stack:
        inputs = [Checkpoint(p, stack) for p in paths]
        base = Checkpoint(base_path, stack) if base_path is not None else None
        donor = base if base is not None else inputs[0]
        check_compatible(donor, [c for c in inputs if c is not donor])
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        try:
            counts = _write_tensors(partial, donor, out_dtype, parse_size(max_shard_size), lambda name: _merge_tensor(
                method, name, base, inputs, weights, t=t, density=density, normalize=normalize, rescale=rescale,
                seed=seed, rule=rule))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    merged, copied, total, n_shards = counts

    copy_side_files(donor.path, partial, str(out_dtype).removeprefix("torch.") if out_dtype is not None else None)
    summary = MergeSummary(
        output_dir=str(output), method=method, models=[str(p) for p in paths],
        base_model=str(base_path) if base_path is not None else None, tensors_merged=merged, tensors_copied=copied,
        shards=n_shards, output_bytes=total, seconds=round(time.time() - started, 3),
        peak_rss_mb=metrics.peak_rss_mb(),
    )
    resolved = {"normalize": normalize, "rescale": rescale, "weights": weights}
    (partial / MARKER).write_text(json.dumps({"request": request, "resolved": resolved, "summary": summary.as_dict()},
                                             indent=2, default=str))
    if output.exists():
        shutil.rmtree(output)
    os.replace(partial, output)
    return summary


def _write_tensors(directory: Path, donor: Checkpoint, out_dtype: torch.dtype | None, max_shard_bytes: int,
                   merge_one) -> tuple[int, int, int, int]:
    """Write the donor's tensor layout, each floating tensor replaced by merge_one(name)."""
    layout = []
    for name in donor.names():
        stored = donor.dtypes[name]
        layout.append((name, donor.shapes[name], out_dtype if out_dtype is not None and stored.is_floating_point else stored))
    shards = plan_shards(layout, max_shard_bytes)
    files = shard_names(len(shards))
    merged = copied = total = 0
    for shard, file in zip(shards, files):
        writer = ShardWriter(directory / file, shard)
        for name, _, target in shard:
            if donor.dtypes[name].is_floating_point:
                result = merge_one(name)
                merged += 1
            else:  # integer buffers (position ids and the like) are copied from the donor
                result = donor.get(name)
                copied += 1
            writer.write(name, result.to(target))
            del result
        writer.close()
        total += writer.nbytes
    write_index(directory, shards, files, total)
    return merged, copied, total, len(files)


def merge_spec(models, **arguments) -> dict:
    """What a merge was asked to do, in a form that compares equal when asked again."""
    spec = {"models": [str(m) for m in models]}
    for key, value in arguments.items():
        spec[key] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return spec


def read_marker(output_dir: str | Path) -> dict | None:
    """The `merge.json` of a finished merge, or None when the output is missing or incomplete."""
    marker = Path(output_dir) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None


def _merge_tensor(method, name, base, inputs, weights, *, t, density, normalize, rescale, seed, rule) -> torch.Tensor:
    if method == "linear":
        return methods.linear((checkpoint.get(name) for checkpoint in inputs), weights, normalize)
    if method == "slerp":
        return methods.slerp(t, base.get(name), inputs[0].get(name))
    tensors = (checkpoint.get(name) for checkpoint in inputs)
    generator = None
    if rule.sparsification == "random":
        generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    return methods.task_arithmetic_family(rule, base.get(name), tensors, weights, density=density,
                                          normalize=normalize, rescale=rescale, generator=generator)
