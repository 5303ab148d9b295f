"""Weight fusion on tiny real checkpoints: hand-computed tensors, mergekit on the same inputs,
architecture checks, tied embeddings, sharding, the recipe stage, and loading the result."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raypost.merging import MergeError, merge_checkpoints
from raypost.merging.merge import tensor_seed

Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.1.self_attn.k_proj.weight"
EMBED = "model.embed_tokens.weight"
NORM = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    from raypost.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("merge-inputs")
    return [make_tiny_model(root / f"m{seed}", seed=seed) for seed in range(3)]


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def tensor(model: Path, name: str) -> torch.Tensor:
    return load_all(model)[name].double()


def test_linear_matches_hand_computed(models, tmp_path):
    merge_checkpoints(models, tmp_path / "out", method="linear", weights=[0.7, 0.5, 0.2])
    out = load_all(tmp_path / "out")
    for name in (Q, K, EMBED):
        a, b, c = (tensor(m, name) for m in models)
        expected = (0.7 * a + 0.5 * b + 0.2 * c) / 1.4
        assert (out[name].double() - expected).abs().max() < 1e-6
    merge_checkpoints(models[:2], tmp_path / "raw", method="linear", weights=[0.7, 0.5], normalize=False)
    raw = load_all(tmp_path / "raw")[Q].double()
    assert (raw - (0.7 * tensor(models[0], Q) + 0.5 * tensor(models[1], Q))).abs().max() < 1e-6


def test_slerp_matches_hand_computed(models, tmp_path):
    merge_checkpoints(models[:2], tmp_path / "out", method="slerp", t=0.3)
    out = load_all(tmp_path / "out")
    for name in (Q, EMBED):
        a, b = tensor(models[0], name).flatten(), tensor(models[1], name).flatten()
        theta = math.acos(float((a / a.norm()) @ (b / b.norm())))
        assert theta > 0.1  # random inits are far from colinear: the spherical branch is tested
        expected = (math.sin(0.7 * theta) * a + math.sin(0.3 * theta) * b) / math.sin(theta)
        assert (out[name].double().flatten() - expected).abs().max() < 1e-6
    # All-ones norm weights are colinear in both models: the lerp fallback keeps them at one.
    assert torch.equal(out[NORM], torch.ones_like(out[NORM]))
    merge_checkpoints(models[:2], tmp_path / "t0", method="slerp", t=0.0)
    assert (load_all(tmp_path / "t0")[Q].double() - tensor(models[0], Q)).abs().max() < 1e-6


def test_task_arithmetic_matches_hand_computed(models, tmp_path):
    base, m1, m2 = models
    merge_checkpoints([m1, m2], tmp_path / "out", method="task_arithmetic", base_model=base, weights=[0.7, 0.5])
    out = load_all(tmp_path / "out")
    for name in (Q, EMBED):
        b0, x1, x2 = (tensor(m, name) for m in models)
        assert (out[name].double() - (b0 + 0.7 * (x1 - b0) + 0.5 * (x2 - b0))).abs().max() < 1e-6


def ties_by_hand(base, xs, weights, density):
    """TIES (Yadav et al. 2023) as mergekit defines it, written out element by element."""
    flat_base = base.flatten()
    trimmed = []
    for x in xs:
        delta = x.flatten() - flat_base
        k = max(1, int(density * delta.numel()))
        threshold = delta.abs().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    out = flat_base.clone()
    for j in range(flat_base.numel()):
        weighted = [w * d[j].item() for w, d in zip(weights, trimmed)]
        sign = 1.0 if sum(weighted) >= 0 else -1.0
        agree = [(wd, w) for wd, w in zip(weighted, weights) if wd != 0 and math.copysign(1.0, wd) == sign]
        divisor = sum(w for _, w in agree) or 1.0
        out[j] += sum(wd for wd, _ in agree) / divisor
    return out.reshape(base.shape)


def test_ties_matches_hand_computed(models, tmp_path):
    base, m1, m2 = models
    merge_checkpoints([m1, m2], tmp_path / "out", method="ties", base_model=base, weights=[0.7, 0.5], density=0.3)
    out = load_all(tmp_path / "out")
    b0, x1, x2 = (tensor(m, K) for m in models)
    expected = ties_by_hand(b0, [x1, x2], [0.7, 0.5], 0.3)
    assert (out[K].double() - expected).abs().max() < 1e-6


def test_dare_keeps_density_and_rescales(models, tmp_path):
    base, m1, _ = models
    merge_checkpoints([m1], tmp_path / "out", method="dare_linear", base_model=base, density=0.3, seed=7)
    out = load_all(tmp_path / "out")
    delta = tensor(m1, EMBED) - tensor(base, EMBED)
    merged_delta = out[EMBED].double() - tensor(base, EMBED)
    kept = merged_delta != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.005  # 3.1M entries: 0.005 is > 10 sigma
    # DARE rescale (mergekit: match the L1 norm) multiplies every kept entry by one factor,
    # |delta|_1 / |kept|_1, which is close to the paper's 1/density.
    factor = delta.abs().sum() / delta[kept].abs().sum()
    assert torch.allclose(merged_delta[kept], delta[kept] * factor, atol=1e-6)
    assert abs(factor.item() - 1 / 0.3) < 0.05
    # Fixed seed: the same masks again; another seed: other masks.
    merge_checkpoints([m1], tmp_path / "again", method="dare_linear", base_model=base, density=0.3, seed=7)
    merge_checkpoints([m1], tmp_path / "other", method="dare_linear", base_model=base, density=0.3, seed=8)
    assert torch.equal(load_all(tmp_path / "again")[EMBED], out[EMBED])
    assert not torch.equal(load_all(tmp_path / "other")[EMBED], out[EMBED])


# --- against mergekit on the same inputs -------------------------------------------------------

MERGEKIT_CASES = {
    "linear": dict(models=[0, 1, 2], weights=[0.7, 0.5, 0.2]),
    "slerp": dict(models=[0, 1], t=0.3),
    "task_arithmetic": dict(models=[1, 2], base=0, weights=[0.7, 0.5]),
    "ties": dict(models=[1, 2], base=0, weights=[0.7, 0.5], density=0.4),
    # DARE's random masks depend on the order mergekit's graph visits tensors; at density 1 the
    # rest of the rule (rescale, sign election, sums) is compared exactly. Masks: next test.
    "dare_ties": dict(models=[1, 2], base=0, weights=[0.7, 0.5], density=1.0),
    "dare_linear": dict(models=[1, 2], base=0, weights=[0.7, 0.5], density=1.0),
}


def run_mergekit(method: str, case: dict, models: list[Path], out: Path) -> None:
    mergekit_config = pytest.importorskip("mergekit.config")
    from mergekit.merge import MergeOptions, run_merge

    entries = []
    for index in case["models"]:
        parameters = {}
        if "weights" in case:
            parameters["weight"] = case["weights"][case["models"].index(index)]
        if "density" in case:
            parameters["density"] = case["density"]
        entries.append({"model": str(models[index]), "parameters": parameters})
    config = {"merge_method": method, "dtype": "float32", "models": entries}
    if "base" in case:
        config["base_model"] = str(models[case["base"]])
    if method == "slerp":
        config["base_model"] = str(models[0])
        config["parameters"] = {"t": case["t"]}
    run_merge(mergekit_config.MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=False))


@pytest.mark.parametrize("method", list(MERGEKIT_CASES))
def test_matches_mergekit(method, models, tmp_path):
    case = MERGEKIT_CASES[method]
    run_mergekit(method, case, models, tmp_path / "mergekit")
    merge_checkpoints([models[i] for i in case["models"]], tmp_path / "raypost", method=method,
                      base_model=models[case["base"]] if "base" in case else None, weights=case.get("weights"),
                      t=case.get("t", 0.5), density=case.get("density", 0.5))
    theirs, ours = load_all(tmp_path / "mergekit"), load_all(tmp_path / "raypost")
    assert set(theirs) == set(ours)
    worst = max((theirs[name].double() - ours[name].double()).abs().max().item() for name in theirs)
    assert worst <= 1e-5, f"{method}: max abs difference {worst}"
    # Same side files as mergekit --copy-tokenizer (we add merge.json).
    assert {p.name for p in (tmp_path / "mergekit").iterdir()} <= {p.name for p in (tmp_path / "raypost").iterdir()}


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_masks_match_mergekit_with_same_seed(method, models, tmp_path):
    """Each tensor's masks come from its own generator seeded with tensor_seed(seed, name);
    mergekit's DARE seeded the same way for that tensor draws the same masks."""
    api = pytest.importorskip("mergekit.merge_methods.api")
    base, m1, m2 = models
    merge_checkpoints([m1, m2], tmp_path / "out", method=method, base_model=base, weights=[0.7, 0.5], density=0.3, seed=5)
    out = load_all(tmp_path / "out")
    for name in (Q, EMBED):
        inputs = [load_all(m)[name] for m in models]
        torch.manual_seed(tensor_seed(5, name))
        theirs = api.merge_tensors(inputs, method, parameters={"weight": [0.7, 0.5], "density": 0.3}, base_index=0)
        assert (theirs - out[name]).abs().max().item() <= 1e-6


# --- checks, layouts, loading ------------------------------------------------------------------

def copy_checkpoint(source: Path, target: Path, edit_tensors=None, edit_config=None) -> Path:
    shutil.copytree(source, target)
    if edit_tensors:
        tensors = edit_tensors(load_all(source))
        (target / "model.safetensors").unlink()
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


def test_mismatched_architectures_are_named(models, tmp_path):
    from raypost.models.tiny import make_tiny_model

    small = make_tiny_model(tmp_path / "small", hidden_size=32)
    with pytest.raises(MergeError, match=r"config field 'hidden_size' is 64 .* but 32"):
        merge_checkpoints([models[0], small], tmp_path / "a")
    shorter = copy_checkpoint(models[1], tmp_path / "shorter", edit_tensors=lambda t: {k: v for k, v in t.items() if k != K})
    with pytest.raises(MergeError, match=re.escape(K) + "' of .* is missing from"):
        merge_checkpoints([models[0], shorter], tmp_path / "b")
    reshaped = copy_checkpoint(models[1], tmp_path / "reshaped", edit_tensors=lambda t: {**t, K: t[K][:16]})
    with pytest.raises(MergeError, match=re.escape(K) + r"' has shape \[32, 64\] .* but \[16, 64\]"):
        merge_checkpoints([models[0], reshaped], tmp_path / "c", method="ties", base_model=models[0])
    assert not any(p.name.startswith(("a", "b", "c")) for p in tmp_path.iterdir())  # no output, no .partial


def test_argument_errors(models, tmp_path):
    with pytest.raises(MergeError, match="base_model"):
        merge_checkpoints(models[:2], tmp_path / "a", method="ties")
    with pytest.raises(MergeError, match="weights: 1 weights for 2 models"):
        merge_checkpoints(models[:2], tmp_path / "b", weights=[1.0])
    with pytest.raises(MergeError, match="slerp"):
        merge_checkpoints(models, tmp_path / "c", method="slerp")
    with pytest.raises(MergeError, match="weights: slerp takes t"):
        merge_checkpoints(models[:2], tmp_path / "c", method="slerp", weights=[1, 1])
    with pytest.raises(MergeError, match="base_model: linear merging has no base model"):
        merge_checkpoints(models[:2], tmp_path / "c", base_model=models[2])
    with pytest.raises(MergeError, match="density"):
        merge_checkpoints(models[1:], tmp_path / "c", method="ties", base_model=models[0], density=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge_checkpoints(models[:2], tmp_path / "full")


def test_tied_embedding_stored_in_one_checkpoint_only(models, tmp_path):
    # A copy of the same architecture that saved the tied lm_head as well as the embeddings.
    both = copy_checkpoint(models[1], tmp_path / "both", edit_tensors=lambda t: {**t, "lm_head.weight": t[EMBED].clone()})
    merge_checkpoints([models[0], both], tmp_path / "out", weights=[0.5, 0.5])
    out = load_all(tmp_path / "out")
    assert "lm_head.weight" not in out  # the donor (first model) ties them, so the output does too
    expected = (tensor(models[0], EMBED) + tensor(models[1], EMBED)) / 2
    assert (out[EMBED].double() - expected).abs().max() < 1e-6
    # Donor with lm_head, other without: the other's embeddings stand in for its lm_head.
    merge_checkpoints([both, models[0]], tmp_path / "reverse", weights=[0.5, 0.5])
    reverse = load_all(tmp_path / "reverse")
    assert torch.equal(reverse["lm_head.weight"], reverse[EMBED])


def test_sharded_in_and_out_loads_and_generates(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = merge_checkpoints(models, tmp_path / "sharded", method="linear", max_shard_size="4MB", dtype="bfloat16")
    out = tmp_path / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert summary.shards == len(set(index["weight_map"].values())) > 1
    assert summary.tensors_merged == len(index["weight_map"]) == 20
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_all(out).values())
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (models[0] / name).read_bytes()
    # A sharded checkpoint is a valid input too.
    merge_checkpoints([out, models[0]], tmp_path / "again", method="slerp", t=0.5)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "again")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    assert torch.isfinite(model(**prompt).logits).all()


# --- the recipe stage ----------------------------------------------------------------------------

def write_stage_recipe(tmp_path: Path, models: list[Path]) -> Path:
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        f"""
name: merge-test
output_dir: {tmp_path}/runs
models:
  student: {models[0]}
  extra: {{a: {models[1]}, b: {models[2]}}}
stages:
  - kind: merge
    name: soup
    method: linear
    models: [a, b]
  - kind: merge
    name: ties
    method: ties
    base_model: student
    models: ["stage:soup", b]
    weights: [1.0, 0.5]
    density: 0.5
"""
    )
    return recipe_path


def test_merge_stage_runs_once_and_chains(models, tmp_path):
    from raypost.recipe import load_recipe
    from raypost.recipe import run_recipe

    recipe_path = write_stage_recipe(tmp_path, models)
    summaries = run_recipe(load_recipe(recipe_path))
    soup = tmp_path / "runs" / "soup" / "model"
    assert summaries["soup"]["tensors_merged"] == 20 and summaries["ties"]["base_model"] == str(models[0])
    assert summaries["ties"]["models"][0] == str(soup)
    expected = (tensor(models[1], Q) + tensor(models[2], Q)) / 2
    assert (load_all(soup)[Q].double() - expected).abs().max() < 1e-6

    written = (soup / "model.safetensors").stat().st_mtime_ns
    again = run_recipe(load_recipe(recipe_path))
    assert again["soup"]["up_to_date"] and again["ties"]["up_to_date"]
    assert (soup / "model.safetensors").stat().st_mtime_ns == written

    # A changed request re-merges.
    summaries = run_recipe(load_recipe(recipe_path, ["stages.soup.weights=[0.9, 0.1]"]), only=["soup"])
    assert "up_to_date" not in summaries["soup"]
    expected = (0.9 * tensor(models[1], Q) + 0.1 * tensor(models[2], Q))
    assert (load_all(soup)[Q].double() - expected).abs().max() < 1e-6


@pytest.mark.slow
def test_cli_merge_command(models, tmp_path, ray_local):
    from raypost.cli import main

    recipe_path = write_stage_recipe(tmp_path, models)
    assert main(["merge", str(recipe_path)]) == 0
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert set(summary) == {"soup", "ties"}
    assert (tmp_path / "runs" / "ties" / "model" / "merge.json").is_file()


def test_merge_stage_config_errors(tmp_path):
    from raypost.config import RecipeError
    from raypost.recipe import load_recipe

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text("name: x\nstages:\n  - kind: merge\n    method: ties\n    models: [a, b]\n")
    with pytest.raises(RecipeError, match=r"stages\[0\].*base_model"):
        load_recipe(recipe_path)
    with pytest.raises(RecipeError, match=r"stages\[0\]\.method"):
        load_recipe(recipe_path, ["stages.0.method=average"])


def test_stage_reference_to_missing_export(models, tmp_path):
    from raypost.config import RecipeError
    from raypost.recipe import load_recipe
    from raypost.recipe import run_recipe

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        f"name: x\noutput_dir: {tmp_path}/runs\nstages:\n"
        f"  - kind: merge\n    name: m\n    models: ['stage:sft', {models[0]}]\n"
    )
    with pytest.raises(RecipeError, match="no stage named 'sft'"):
        run_recipe(load_recipe(recipe_path))


def test_example_recipe_validates():
    from raypost.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "examples" / "merge.yaml")
    assert [s.kind for s in recipe.stages].count("merge") >= 1

