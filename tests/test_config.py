"""Recipe validation: every kind of bad recipe gets one clear message and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raypost.config import RecipeError
from raypost.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]

GOOD = {
    "name": "t",
    "models": {"teacher": "packaged:smollm2-135m-instruct"},
    "stages": [
        {
            "kind": "generate",
            "name": "teacher",
            "sampling": {"max_tokens": 16},
            "input": {"path": str(REPO / "data/gsm8k/quickstart.jsonl"), "prompt_field": "question"},
        }
    ],
}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def mutate(**changes):
    import copy

    data = copy.deepcopy(GOOD)
    stage = data["stages"][0]
    for key, value in changes.items():
        node, *rest = key.split("__")
        target = stage if node == "stage" else data
        path = rest if node == "stage" else [node] + rest
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return data


def test_good_recipe_and_overrides(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD), ["stages.teacher.sampling.max_tokens=32", "resources.concurrency=2"])
    assert recipe.stages[0].sampling.max_tokens == 32
    assert recipe.resources.concurrency == 2
    recipe = load_recipe(write(tmp_path, GOOD), ["stages.0.engine.backend=transformers"])
    assert recipe.stages[0].engine.backend == "transformers"


@pytest.mark.parametrize(
    "data, expected",
    [
        (mutate(stage__sampling__temprature=0.5), "stages[0].sampling.temprature: unknown key"),
        (mutate(stage__sampling__max_tokens="many"), "stages[0].sampling.max_tokens: Input should be a valid integer"),
        (mutate(stage__input__path="nowhere/prompts.jsonl"), "stages[0].input.path: Value error, path does not exist: nowhere/prompts.jsonl"),
        (mutate(stage__engine__backend="tgi"), "stages[0].engine.backend: Input should be 'auto', 'vllm'"),
        (mutate(stage__kind="gnerate"), "stages[0]: Input tag 'gnerate' found using 'kind' does not match"),
        ({k: v for k, v in GOOD.items() if k != "name"}, "name: field required"),
        (mutate(resources__concurrency=0), "resources.concurrency: Input should be greater than or equal to 1"),
    ],
    ids=["unknown-key", "wrong-type", "bad-path", "bad-enum", "unknown-stage-kind", "missing-field", "out-of-range"],
)
def test_bad_recipes_name_file_field_and_expectation(tmp_path, data, expected):
    path = write(tmp_path, data)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert message.startswith(str(path) + ": ")
    assert expected in message


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "name: t\nstages: [\n  - kind: generate\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml: line \d+: invalid YAML"):
        load_recipe(path)


def test_bad_override_is_reported(tmp_path):
    with pytest.raises(RecipeError, match="no list element 'nope'"):
        load_recipe(write(tmp_path, GOOD), ["stages.nope.sampling.n=2"])
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe(write(tmp_path, GOOD), ["stages"])


def test_cli_exits_2_with_one_message_and_no_traceback(tmp_path):
    path = write(tmp_path, mutate(stage__sampling__temperature="hot"))
    result = subprocess.run([sys.executable, "-m", "raypost", "run", str(path)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{path}: stages[0].sampling.temperature: Input should be a valid number" in result.stderr


def test_help_on_each_command():
    for command in (["--help"], ["run", "--help"], ["generate", "--help"], ["models", "list", "--help"]):
        result = subprocess.run([sys.executable, "-m", "raypost", *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage: raypost" in result.stdout


def test_every_shipped_recipe_loads():
    """Run from any working directory: data paths are found beside the recipe."""
    for path in [*(REPO / "recipes").glob("*.yaml"), *(REPO / "recipes" / "examples").glob("*.yaml"),
                 *(REPO / "recipes" / "lab").glob("*.yaml")]:
        if path.name == "serve.yaml":
            continue
        recipe = load_recipe(path)
        assert getattr(recipe, "stages", None) or recipe.loop.rounds, path
    gsm8k = load_recipe(REPO / "recipes" / "examples" / "gsm8k.yaml")
    assert gsm8k.stages[0].kind == "generate" and gsm8k.models.teacher == "packaged:smollm2-135m-instruct"


def _pipeline(**stage_changes):
    """synth -> generate -> train -> merge -> eval, with one field of one stage replaced."""
    stages = [
        {"kind": "synth", "name": "pool", "n": 8},
        {"kind": "generate", "name": "teacher", "input": {"stage": "pool"}, "engine": {"backend": "procedural"}},
        {"kind": "train", "name": "sft", "method": "sft", "dataset": {"stage": "teacher"}},
        {"kind": "merge", "name": "merged", "method": "linear", "models": ["stage:sft", "student"]},
        {"kind": "eval", "name": "eval", "models": ["student", "stage:merged"], "benchmarks": ["arith"]},
    ]
    for key, value in stage_changes.items():
        index, field = key.split("__", 1)
        stages[int(index[1:])][field] = value
    return {"name": "t", "models": {"teacher": "procedural:arith", "student": "packaged:smollm2-135m-instruct"},
            "stages": stages}


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"s3__models": ["stage:sft", "stage:mergd"]},
         "stages[3].models[1]: no stage named 'mergd' before this one; earlier stages: ['pool', 'teacher', 'sft']"),
        ({"s2__dataset": {"stage": "merged"}}, "stages[2].dataset.stage: no stage named 'merged' before this one "
                                               "(stages[3] comes later)"),
        ({"s2__model": "stage:teacher"}, "stages[2].model: stage 'teacher' is a generate stage and exports no model"),
        ({"s4__models": ["stage:pool"]}, "stages[4].models[0]: stage 'pool' is a synth stage and exports no model"),
        ({"s1__input": {"stage": "pol"}}, "stages[1].input.stage: 'pol' is neither an earlier stage (['pool']) nor a path"),
    ],
    ids=["typo", "later-stage", "not-a-model-stage", "eval-of-data", "unknown-input"],
)
def test_stage_references_are_checked_when_the_recipe_loads(tmp_path, changes, expected):
    assert load_recipe(write(tmp_path, _pipeline())).stages[4].models == ["student", "stage:merged"]
    path = write(tmp_path, _pipeline(**changes))
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value) == f"{path}: {expected}" or str(error.value).startswith(f"{path}: {expected}")


def test_an_override_changes_one_place_even_under_a_yaml_anchor(tmp_path):
    # safe_dump writes the one shared `sampling` dict as an anchor and an alias
    text = yaml.safe_dump({**GOOD, "stages": [{**GOOD["stages"][0], "name": n} for n in ("a", "b")]})
    assert "sampling: *id" in text
    recipe = load_recipe(write(tmp_path, text), ["stages.b.sampling.max_tokens=32"])
    assert [s.sampling.max_tokens for s in recipe.stages] == [16, 32]


def test_a_data_path_is_one_setting_however_the_recipe_is_named(tmp_path, monkeypatch):
    """A relative data path beside the recipe resolves to one absolute path whether the recipe is
    given relative to the working directory, absolute, or through `..`: a rerun with another
    spelling finds its stages up to date (the settings are part of each stage's manifest)."""
    import yaml

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "models": {"student": "gold"}, "stages": [
        {"kind": "eval", "name": "eval", "models": ["student"], "engine": {"backend": "reference"},
         "benchmarks": [{"name": "arith", "data_path": "../data/test.jsonl"}]}]}))
    monkeypatch.chdir(tmp_path)
    spellings = [path, Path("recipes/r.yaml"), tmp_path / "recipes" / ".." / "recipes" / "r.yaml"]
    seen = {load_recipe(p).stages[0].benchmarks[0].data_path for p in spellings}
    assert seen == {str((tmp_path / "data" / "test.jsonl").resolve())}
