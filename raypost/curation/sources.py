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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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

    def responses(self, by_id: dict[str, list[dict[str, Any]]], ids: list[str] | None = None, *,
                  resources: Resources | None = None, cache_dir: str | None = None,
                  progress: bool | str = False) -> tuple[dict[str, list[dict[str, Any]]], int | None]:
        """Response rows (`response`, `sample_index`, whatever else the source has) per prompt id
        of `ids` (default: all of `by_id`), and the completion tokens generated now (None unless
        `generate`)."""
        from raypost import records

        wanted = list(by_id) if ids is None else list(ids)
        found: dict[str, list[dict[str, Any]]] = {}
        if self.from_ == "reference":
            for i in wanted:
                if by_id[i][0].get(schema.REFERENCE):
                    found[i] = [{**by_id[i][0], schema.RESPONSE: clean_reference(by_id[i][0][schema.REFERENCE]),
                                 schema.SAMPLE_INDEX: None}]
            return found, None
        if self.from_ == "input":
            return {i: [dict(r) for r in by_id[i]] for i in wanted}, None
        tokens = None
        directory = self.stage_dir
        if self.from_ == "generate":
            from raypost.generation.pipeline import generate

            directory = self.output_dir or f"responses_{self.name}"
            summary = generate([{schema.ID: i, schema.MESSAGES: by_id[i][0][schema.MESSAGES],
                                 schema.REFERENCE: by_id[i][0].get(schema.REFERENCE)} for i in wanted],
                               model=self.model, output_dir=directory, engine=self.engine, sampling=self.sampling,
                               resources=resources, cache_dir=cache_dir, source=f"curate:{self.name}",
                               progress=progress)
            tokens = summary.completion_tokens
        keep = set(wanted)
        for row in records.read_rows(Path(directory)):
            if str(row[schema.ID]) in keep:
                found.setdefault(str(row[schema.ID]), []).append(row)
        return found, tokens
