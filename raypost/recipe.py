"""The recipe: which models, which stages in which order, with what resources.

Each stage kind has a config model (validated here) and a runner in its own package; the
runner is a thin wrapper that calls the stage's plain Python function.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Field, PrivateAttr, model_validator

from raypost.config import ModelsConfig, Resources, StrictModel
from raypost.curation.config import CurateStage
from raypost.evaluation.config import EvalStage
from raypost.generation.config import GenerateStage
from raypost.merging.config import MergeStage
from raypost.tasks.config import SynthStage
from raypost.training.config import TrainStage

# kind -> (config model, "module:function" runner). A runner takes (stage, RunContext) and
# returns a JSON-able summary dict. Add a stage kind by adding one line here.
STAGES: dict[str, tuple[type[StrictModel], str]] = {
    "synth": (SynthStage, "raypost.tasks.stage:run_synth_stage"),
    "generate": (GenerateStage, "raypost.generation.stage:run_generate_stage"),
    "curate": (CurateStage, "raypost.curation.stage:run_curate_stage"),
    "eval": (EvalStage, "raypost.evaluation.stage:run_eval_stage"),
    "merge": (MergeStage, "raypost.merging.stage:run_merge_stage"),
    "train": (TrainStage, "raypost.training.stage:run_train_stage"),
}


def stage_kinds() -> set[str]:
    return set(STAGES)


StageConfig = Annotated[Union[tuple(cls for cls, _ in STAGES.values())], Field(discriminator="kind")]


class Recipe(StrictModel):
    name: str
    output_dir: str = Field("runs/{name}", description="where each stage writes `<output_dir>/<stage name>/`")
    cache_dir: str | None = Field(None, description="model cache; default ~/.cache/raypost or $RAYPOST_CACHE")
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    resources: Resources = Field(default_factory=Resources)
    stages: list[StageConfig] = Field(min_length=1)
    _source: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _unique_names(self) -> "Recipe":
        seen: set[str] = set()
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages[{i}].name: duplicate stage name {stage.name!r}")
            seen.add(stage.name)
        return self

    @property
    def source(self) -> Path | None:
        return self._source

    @source.setter
    def source(self, value: Path | None) -> None:
        self._source = value

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name)).expanduser()

    def stage(self, name: str):
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")


def runner_for(kind: str):
    module_name, function = STAGES[kind][1].split(":")
    return getattr(importlib.import_module(module_name), function)


class RunContext:
    """What a stage runner may ask about the run: paths, models, earlier stages' outputs."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.output_dir = recipe.resolved_output_dir()
        self.summaries: dict[str, dict[str, Any]] = {}

    def stage_dir(self, name: str) -> Path:
        return self.output_dir / name

    def model_reference(self, name_or_ref: str) -> str:
        return self.recipe.models.lookup(name_or_ref)

    def resources_for(self, stage) -> Resources:
        return getattr(stage, "resources", None) or self.recipe.resources


def run_recipe(recipe: Recipe, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the recipe's stages in order (or only the named ones); returns each stage's summary
    (with its wall time, `seconds`)."""
    import json
    import time

    context = RunContext(recipe)
    context.output_dir.mkdir(parents=True, exist_ok=True)
    summary_path = context.output_dir / "summary.json"
    if only and summary_path.is_file():
        # `raypost eval RECIPE` and friends run some stages: the others' summaries stay
        try:
            earlier = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            earlier = {}
        if isinstance(earlier, dict):
            context.summaries.update({name: earlier[name] for name in (s.name for s in recipe.stages)
                                      if name in earlier})
    for stage in recipe.stages:
        if only and stage.name not in only and stage.kind not in only:
            continue
        started = time.perf_counter()
        summary = runner_for(stage.kind)(stage, context)
        seconds = time.perf_counter() - started
        if isinstance(summary, dict):
            summary = {**summary, "seconds": round(seconds, 1)}
        context.summaries[stage.name] = summary
        print(f"stage {stage.name} ({stage.kind}) finished in {seconds:.0f}s", flush=True)
        summary_path.write_text(json.dumps(context.summaries, indent=2, default=str))
    return context.summaries
