"""Where candidate responses come from, for every step that needs them: entropy routing's chain
of thought for hard prompts and response selection's candidates are the same question (which
texts answer this prompt?) with the same four answers.

    reference   the dataset's gold solution (calculator notes removed)
    input       the rows' own `response` (the input is a generate stage's output)
    stage       the responses of an earlier stage's output directory, joined by id
    generate    generated now, with `model`, for the prompts asked about only
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from raypost import schema
from raypost.config import EngineConfig, Resources, SamplingConfig

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def clean_reference(text: str) -> str:
    return _CALCULATOR.sub("", text).strip()


@dataclass
class ResponseSource:
    name: str
    from_: Literal["reference", "input", "stage", "generate"] = "input"
    stage_dir: str | None = None
    model: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_tokens=256))
    output_dir: str | None = None

    def dataset(self, rows, units, *, resources: Resources | None = None, cache_dir: str | None = None,
                progress: bool | str = False) -> tuple[Any, int | None]:
        """This source's response rows (`id`, `sample_index`, `response`, whatever else it has) as a
        Ray Dataset, and the completion tokens generated now (None unless `generate`).

        `rows`: the step's input rows; `units`: one prompt row per id asked about (`id`,
        `messages`, `reference`), both Datasets. Nothing passes through the driver: the input's
        rows and an earlier stage's parts are read by the workers, references are cleaned in a map,
        and `generate` has the workers commit the units as a prompt file that the generation stage
        reads (resumable: a rerun generates only what is not committed).
        """
        from raypost.curation.rows import LIGHT_CPUS, join_partitions, materialized, read_stage, write_dataset

        if self.from_ == "input":
            return rows, None
        if self.from_ == "stage":
            return read_stage(self.stage_dir), None
        if self.from_ == "reference":
            return units.map_batches(reference_responses, batch_format="pyarrow", num_cpus=LIGHT_CPUS), None
        from raypost import records
        from raypost.generation.pipeline import generate_files

        directory = Path(self.output_dir or f"responses_{self.name}")
        prompts = directory / "prompts"
        shutil.rmtree(prompts, ignore_errors=True)  # the units of this run, not of an earlier one
        columns = [c for c in (schema.ID, schema.MESSAGES, schema.REFERENCE) if c in units.schema().names]
        if not write_dataset(units.select_columns(columns), prompts):
            return units.limit(0), 0
        summary = generate_files(str(prompts), records.PromptFormat(prompt_field=schema.MESSAGES, id_field=schema.ID,
                                                                    reference_field=schema.REFERENCE),
                                 model=self.model, output_dir=directory, engine=self.engine, sampling=self.sampling,
                                 resources=resources, cache_dir=cache_dir, progress=progress)
        # the directory may hold answers to prompts of an earlier run that this one did not ask about
        answers = materialized(read_stage(directory)).join(
            materialized(units.select_columns([schema.ID])), "left_semi", num_partitions=join_partitions(
                summary.rows_total), on=(schema.ID,))
        return answers, summary.completion_tokens


def reference_responses(batch: pa.Table) -> pa.Table:
    """Ray Data batch function: each unit's gold solution as a response (calculator notes removed)."""
    rows = [{**row, schema.RESPONSE: clean_reference(row[schema.REFERENCE]), schema.SAMPLE_INDEX: None}
            for row in batch.to_pylist() if row.get(schema.REFERENCE)]
    return pa.Table.from_pylist(rows, schema=pa.schema([*(f for f in batch.schema if f.name != schema.RESPONSE),
                                                        pa.field(schema.RESPONSE, pa.string())]))
