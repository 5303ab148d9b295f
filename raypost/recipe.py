"""The recipe: which models, which stages in which order, with what resources.

Each stage kind has a config model (validated here) and a runner in its own package; the
runner is a thin wrapper that calls the stage's plain Python function.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Union

import yaml
from pydantic import Field, ValidationError, ValidationInfo, model_validator

from raypost.config import RecipeError, RecipeFile, Resources, StrictModel, resolve_data_path
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


# Stage kinds that export a checkpoint to `<stage dir>/model`: what `stage:NAME` names as a model.
MODEL_STAGES = {"train", "merge"}
STAGE_PREFIX = "stage:"
# Fields that name a model: a name from `models`, a model reference, or stage:NAME.
MODEL_FIELDS = {"model", "models", "base_model", "scorer_model", "tokenizer"}
# Fields that name an earlier stage's output directory (or, failing that, a path).
OUTPUT_FIELDS = {"stage", "input"}
# Fields that name a data file or directory the stage reads.
PATH_FIELDS = {"path", "data_path", "shots_path"}


@dataclass(frozen=True)
class Reference:
    """One thing a stage reads, found in its config: an earlier stage's model or output, a model
    by name or reference, or a data path. `field` is the path inside the stage (`models[1]`)."""

    field: str
    stage: str | None = None
    model: str | None = None
    path: str | None = None

    @property
    def wants_model(self) -> bool:
        return self.field.split(".")[-1].split("[")[0] in MODEL_FIELDS


def stage_references(stage, stage_names: set[str]) -> list[Reference]:
    """Every reference in one stage's config: the one place that knows how stages name each other."""
    found: list[Reference] = []

    def walk(node: Any, where: str, key: str | None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{where}.{k}" if where else k, k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]", key)
        elif isinstance(node, str) and key is not None:
            if node.startswith(STAGE_PREFIX):
                found.append(Reference(where, stage=node[len(STAGE_PREFIX):]))
            elif key in MODEL_FIELDS:
                found.append(Reference(where, model=node))
            elif key in OUTPUT_FIELDS:
                found.append(Reference(where, stage=node) if node in stage_names else Reference(where, path=node))
            elif key in PATH_FIELDS:
                found.append(Reference(where, path=node))

    walk({k: v for k, v in stage.model_dump(exclude_none=True).items() if k not in ("name", "kind")}, "", None)
    return found


StageConfig = Annotated[Union[tuple(cls for cls, _ in STAGES.values())], Field(discriminator="kind")]


class Recipe(RecipeFile):
    """Stages run in order; each writes `<output_dir>/<stage name>/`."""

    resources: Resources = Field(default_factory=Resources)
    stages: list[StageConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "Recipe":
        seen: set[str] = set()
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages[{i}].name: duplicate stage name {stage.name!r}")
            seen.add(stage.name)
        return self

    @model_validator(mode="after")
    def _references_resolve(self, info: ValidationInfo) -> "Recipe":
        """A typo in a stage reference fails when the recipe loads, not after the stages
        before it have run."""
        recipe_path = (info.context or {}).get("recipe_path")
        names = [stage.name for stage in self.stages]
        problems = []
        for i, stage in enumerate(self.stages):
            for ref in stage_references(stage, set(names)):
                where = f"stages[{i}].{ref.field}"
                earlier = names[:i] or "none"
                if ref.stage is not None:
                    if ref.stage not in names[:i]:
                        later = f" (stages[{names.index(ref.stage)}] comes later)" if ref.stage in names else ""
                        problems.append(f"{where}: no stage named {ref.stage!r} before this one{later}; "
                                        f"earlier stages: {earlier}")
                    elif ref.wants_model and self.stages[names.index(ref.stage)].kind not in MODEL_STAGES:
                        kind = self.stages[names.index(ref.stage)].kind
                        problems.append(f"{where}: stage {ref.stage!r} is a {kind} stage and exports no model "
                                        f"(only {sorted(MODEL_STAGES)} stages do)")
                elif ref.path is not None and ref.field.split(".")[-1] in OUTPUT_FIELDS:
                    if "://" in ref.path or any(c in ref.path for c in "*?["):
                        continue   # a URI or glob: its stage's own field checked that it matches
                    if not resolve_data_path(ref.path, recipe_path).exists():
                        problems.append(f"{where}: {ref.path!r} is neither an earlier stage ({earlier}) nor a "
                                        "path (looked in the working directory and beside the recipe)")
        if problems:
            raise ValueError("\n".join(problems))
        return self

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
        """A model as a stage names it: `stage:NAME` is the checkpoint that train or merge
        stage exported (it must exist by now); anything else goes through `models`."""
        if name_or_ref.startswith(STAGE_PREFIX):
            name = name_or_ref[len(STAGE_PREFIX):]
            path = self.stage_dir(name) / "model"
            if not (path / "config.json").is_file():
                raise RecipeError(f"model {name_or_ref!r}: {path} holds no exported checkpoint; run stage {name!r} first")
            return str(path)
        return self.recipe.models.lookup(name_or_ref)

    def stage_output(self, name_or_path: str) -> Path:
        """A field that names an earlier stage's output directory, or else a data path."""
        if name_or_path in {stage.name for stage in self.recipe.stages}:
            return self.stage_dir(name_or_path)
        return resolve_data_path(name_or_path, self.recipe.source)

    def identity(self, reference: Reference, digests: dict[str, str]) -> str | None:
        """What a reference points at, by content (see raypost.manifest)."""
        from raypost import manifest

        if reference.stage is not None:
            return digests.get(reference.stage)
        if reference.model is not None:
            try:
                return manifest.model_identity(self.recipe.models.lookup(reference.model))
            except RecipeError:
                return None  # a `models` name left unset: the stage fails on it if it uses it
        if "://" in reference.path or any(c in reference.path for c in "*?["):
            return manifest.input_digest(reference.path)
        path = self.stage_output(reference.path)
        return manifest.content_digest(path) if path.exists() else None

    def manifest_for(self, stage, digests: dict[str, str]) -> dict[str, Any]:
        from raypost import manifest

        references = stage_references(stage, {s.name for s in self.recipe.stages})
        return {
            "kind": stage.kind,
            "settings": manifest.settings_of(stage.model_dump(mode="json", exclude={"name"})),
            "reads": {ref.field: self.identity(ref, digests) for ref in references},
        }

    def plan(self, only: list[str] | None = None) -> list:
        """What a run would do with each selected stage, and why (raypost.manifest.Decision)."""
        from raypost import manifest

        digests: dict[str, str] = {}
        decisions = []
        for stage in self.recipe.stages:
            decision = manifest.decide(stage.name, stage.kind, self.stage_dir(stage.name),
                                       self.manifest_for(stage, digests))
            digests[stage.name] = decision.digest
            if not only or stage.name in only or stage.kind in only:
                decisions.append(decision)
        return decisions

    def resources_for(self, stage) -> Resources:
        return getattr(stage, "resources", None) or self.recipe.resources


def run_recipe(recipe: Recipe, only: list[str] | None = None,
               before_first_run: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run the recipe's stages in order (or only the named ones), skipping those that are up to
    date (raypost.manifest); returns each stage's summary (with its wall time, `seconds`).
    `before_first_run` is called once, before the first stage that runs (e.g. to start Ray)."""
    import json
    import time

    from raypost import console, manifest

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
    for decision in context.plan(only):
        stage = recipe.stage(decision.stage)
        stage_dir = context.stage_dir(stage.name)
        console.say(decision.line())
        if decision.action == "skip":
            context.summaries[stage.name] = {**(decision.summary or {}), "up_to_date": True}
            summary_path.write_text(json.dumps(context.summaries, indent=2, default=str))
            continue
        if before_first_run is not None:
            before_first_run()
            before_first_run = None
        # A later stage's manifest names this one's digest, so re-planning after it runs is not
        # needed: what it reads is what was planned.
        manifest.begin(stage_dir, decision)
        started = time.perf_counter()
        summary = runner_for(stage.kind)(stage, context)
        seconds = time.perf_counter() - started
        if isinstance(summary, dict):
            summary = {**summary, "seconds": round(seconds, 1)}
        manifest.finish(stage_dir, decision, summary)
        context.summaries[stage.name] = summary
        console.say(f"stage {stage.name} ({stage.kind}) finished in {seconds:.0f}s")
        summary_path.write_text(json.dumps(context.summaries, indent=2, default=str))
    return context.summaries


# --- reading a recipe file: YAML, overrides, validation errors as file: field: message -------

def _format_location(location: tuple[Any, ...], stage_kinds: set[str]) -> str:
    parts: list[str] = []
    for i, item in enumerate(location):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif i > 0 and location[i - 1] == "stages" or (
            # pydantic puts a discriminated union's tag into the path: drop it
            i > 0 and isinstance(location[i - 1], int) and item in stage_kinds
        ):
            if item in stage_kinds:
                continue
            parts.append(f".{item}")
        else:
            parts.append(f".{item}" if parts else str(item))
    return "".join(parts) or "(top level)"


def format_validation_error(source: str, error: ValidationError, stage_kinds: set[str]) -> str:
    lines = []
    for item in error.errors():
        message = item["msg"]
        if not item["loc"] and item["type"] == "value_error":
            # a recipe-wide check names its own field paths, one problem per line
            lines.extend(f"{source}: {line}" for line in message.removeprefix("Value error, ").splitlines())
            continue
        where = _format_location(tuple(item["loc"]), stage_kinds)
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "field required"
        got = item.get("input")
        got_text = "" if item["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {where}: {message}{got_text}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key:
        raise RecipeError(f"override {text!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_override(data: dict[str, Any], path: list[str], value: Any, source: str) -> None:
    """Set data[a][b]... = value. In `stages`, an element is addressed by index or by name."""
    node: Any = data
    for depth, key in enumerate(path[:-1]):
        # Copy each node on the way down: a YAML anchor shares one object between places, and
        # an override names one place.
        if isinstance(node, list):
            index = _list_index(node, key, path, source)
            node[index] = _shallow_copy(node[index])
            node = node[index]
        elif isinstance(node, dict):
            node[key] = _shallow_copy(node.get(key, {}))
            node = node[key]
        else:
            raise RecipeError(f"{source}: override {'.'.join(path)}: {'.'.join(path[:depth])} is not a mapping")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path, source)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"{source}: override {'.'.join(path)}: parent is not a mapping")


def _shallow_copy(node: Any) -> Any:
    return dict(node) if isinstance(node, dict) else list(node) if isinstance(node, list) else node


def _list_index(node: list[Any], key: str, path: list[str], source: str) -> int:
    if key.isdigit() and int(key) < len(node):
        return int(key)
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name", item.get("kind")) == key:
            return i
    raise RecipeError(f"{source}: override {'.'.join(path)}: no list element {key!r}")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise RecipeError(f"{p}: {where}: invalid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: the recipe must be a YAML mapping")
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), schema=None):
    """Read, override and validate a recipe (`schema`: another top-level model, e.g. a loop's).
    Raises RecipeError with a one-line-per-problem message."""
    data = read_yaml(path)
    if schema is None and isinstance(data, dict) and "loop" in data and "stages" not in data:
        from raypost.loop.config import LoopRecipe

        schema = LoopRecipe   # a loop recipe: `raypost loop FILE`
    schema = schema or Recipe
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value, str(path))
    try:
        recipe = schema.model_validate(data, context={"recipe_path": Path(path)})
    except ValidationError as error:
        raise RecipeError(format_validation_error(str(path), error, stage_kinds())) from None
    recipe.source = Path(path)
    return recipe
