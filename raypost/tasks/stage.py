"""The `synth` recipe stage: a seeded pool of procedural problems as prompt rows.

    <stage dir>/pool.jsonl      GSM8K format (question, answer, level), as `raypost data synth` writes
    <stage dir>/part-*.parquet  prompt rows (id, messages, reference): a generate stage's `input: {stage: ...}`

Questions of the shipped held-out test set are never drawn.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from raypost import console
from raypost import records, schema
from raypost.tasks.cli import synth_items
from raypost.tasks.config import SynthStage


def prompt_row(item, system_prompt: str | None) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": item.question}]
    return {schema.ID: item.id, schema.MESSAGES: messages, schema.REFERENCE: item.answer}


def run_synth_stage(stage: SynthStage, context) -> dict[str, Any]:
    from raypost.tasks import arith

    out = context.stage_dir(stage.name)
    items = synth_items(stage.family, stage.n, stage.levels, stage.seed, stage.distractors)
    out.mkdir(parents=True, exist_ok=True)
    for part in records.part_files(out):
        part.unlink()
    arith.write_jsonl(items, out / "pool.jsonl")
    records.write_part(out, [prompt_row(i, stage.system_prompt) for i in items], schema.PROMPT_SCHEMA)
    levels = dict(sorted(Counter(i.level for i in items).items()))
    console.say(f"synth {stage.family}: {len(items)} problems (levels {levels}) -> {out}")
    return {"family": stage.family, "items": len(items), "levels": levels, "seed": stage.seed,
            "output_dir": str(out)}
