"""Training on real Ray Train + TRL with a tiny model: every method, DDP, DeepSpeed, resume, bad data."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from raypost.models.tiny import make_tiny_model
from raypost.training import DatasetError, TrainConfig, TrainError, load_training_rows, train
from raypost.training.callbacks import CrashOnceCallback

pytestmark = pytest.mark.timeout(600)


def _user(i: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {i} plus {i}?"}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def rows_for(method: str, n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        if method == "sft":
            rows.append({"prompt": _user(i), "completion": _assistant(f"{i} plus {i} is {2 * i}.")})
        elif method == "kto":
            good = i % 2 == 0
            rows.append({"prompt": _user(i), "completion": _assistant(f"It is {2 * i if good else i - 7}."), "label": good})
        else:
            rows.append({"prompt": _user(i), "chosen": _assistant(f"{i} plus {i} is {2 * i}."),
                         "rejected": _assistant("I do not know, sorry.")})
    return rows


def assert_no_actor_process_left(actor: str = "TrainController", wait_s: float = 60) -> None:
    """No process of this session runs `actor` (default: a Ray Train controller). An actor's process
    ends a moment after its last handle goes, hence the wait; one still referenced never ends."""
    import gc

    from tests.conftest import session_processes

    gc.collect()   # an earlier test's failure traceback (a cycle) may still hold a controller's handle
    deadline = time.monotonic() + wait_s
    while (left := [p for p in session_processes() if actor in p[1]]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"{actor} processes still alive after training returned: {left}"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small_config(method: str, **overrides) -> TrainConfig:
    # one fixed batch (4 rows, batch 4) repeated, a high lr: the loss must fall within a few steps
    block = {"learning_rate": 2e-3, "max_steps": 5, "per_device_train_batch_size": 4, "max_length": 64}
    data = {"method": method, method: block, "checkpointing": {"save_steps": 50}, "failure": {"max_failures": 0}}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return TrainConfig.model_validate(data)


def losses(result) -> list[float]:
    return [h["loss"] for h in result.history if "loss" in h]


def assert_loads(model_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    assert list(path.glob("*.safetensors")), f"no safetensors in {path}"
    assert not (path / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(path)
    text = tokenizer.apply_chat_template(_user(1), tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


# --- bad datasets: clear errors before any worker starts -------------------------------------

def test_missing_column_names_file_and_column(tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "a", "rejected": "b"}])
    with pytest.raises(DatasetError, match=r"pref\.jsonl.*missing \['chosen'\]"):
        load_training_rows(path, "dpo")


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetError, match=r"empty\.jsonl: empty training set"):
        load_training_rows(tmp_path / "empty.jsonl", "sft")


def test_kto_labels_must_be_boolean(tmp_path):
    rows = rows_for("kto")
    rows[2]["label"] = "yes"
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DatasetError, match=r"kto\.jsonl: column 'label' must be boolean.*kto\.jsonl:3: 'yes'"):
        load_training_rows(path, "kto")


def test_bad_rows_are_set_aside_and_all_bad_is_an_error(tmp_path):
    rows = rows_for("sft") + [{"prompt": 5, "completion": "x"}, {"prompt": _user(1), "completion": [{"role": "assistant"}]}]
    loaded = load_training_rows(write_jsonl(tmp_path / "sft.jsonl", rows), "sft")
    assert len(loaded.rows) == 4 and len(loaded.rejected) == 2
    assert loaded.rejected[0].source.endswith("sft.jsonl:5") and "'prompt'" in loaded.rejected[0].reason
    with pytest.raises(DatasetError, match=r"no usable rows \(2 rejected; first at .*bad\.jsonl:1"):
        load_training_rows(write_jsonl(tmp_path / "bad.jsonl", rows[4:]), "sft")


def test_parquet_dir_and_bad_data_fails_before_workers(tmp_path, tiny_model):
    from raypost import records

    records.write_part(tmp_path / "pref", rows_for("dpo"))
    assert len(load_training_rows(tmp_path / "pref", "orpo").rows) == 4
    with pytest.raises(DatasetError, match="missing"):
        # KTO columns absent: fails in validation, without Ray
        train(small_config("kto"), model=str(tiny_model), dataset=tmp_path / "pref", output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "ray").exists()


def test_rows_from_parts_train_in_one_order_whatever_blocks_wrote_them(tmp_path):
    """Ray Data workers commit a stage's rows in whatever blocks the run made: the same rows
    split into other parts must reach the trainer in the same order."""
    from raypost import records

    rows = [{"id": f"q{i}", **row} for i, row in enumerate(rows_for("sft") * 3)]
    records.write_part(tmp_path / "a", rows[:5])
    records.write_part(tmp_path / "a", rows[5:])
    for row in reversed(rows):
        records.write_part(tmp_path / "b", [row])
    first, second = load_training_rows(tmp_path / "a", "sft"), load_training_rows(tmp_path / "b", "sft")
    assert len(first.rows) == 12 and first.rows == second.rows


def test_cpu_precision_is_bf16_autocast_only_where_the_cpu_has_it(tmp_path):
    from raypost.training.methods import cpu_has_native_bf16, training_arguments, uses_cpu_bf16_autocast

    default = TrainConfig.model_validate({"method": "sft"})
    arguments = training_arguments(default, str(tmp_path), ["none"])
    # TRL's own default is bf16 even where the CPU emulates it; raypost turns it on only with native support
    assert arguments.bf16 is cpu_has_native_bf16()
    assert str(arguments.model_init_kwargs["dtype"]) == "torch.float32"  # fp32 master weights
    assert training_arguments(small_config("sft", scaling={"bf16": False}), str(tmp_path), ["none"]).bf16 is False
    assert uses_cpu_bf16_autocast(small_config("sft", scaling={"deepspeed": "zero2"})) is False


def test_warmup_is_a_ratio_of_the_steps_or_a_step_count(tmp_path):
    from raypost.training.methods import training_arguments

    def warmup(**block):
        config = TrainConfig.model_validate({"method": "sft", "sft": {"max_steps": 200, **block}})
        return training_arguments(config, str(tmp_path), ["none"]).get_warmup_steps(200)

    assert warmup() == 0
    assert warmup(warmup_ratio=0.1) == 20
    assert warmup(warmup_ratio=1.0) == 200      # all of them, not one step
    assert warmup(warmup_steps=5) == 5
    assert warmup(warmup_steps=5, warmup_ratio=0.5) == 5


def test_row_packing_keeps_documents_apart(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from raypost.training.packing import RowPackedCollator

    collator = RowPackedCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))
    # two packed rows as TRL's bfd packing writes them: documents of 3+2 and 4 tokens
    rows = [{"input_ids": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]}, {"input_ids": [10, 11, 12, 13], "seq_lengths": [4]}]
    batch = collator(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, 5)  # rows stay rows
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 11, 12, 13, -100]]
    assert collator.tokens_seen == 9  # real tokens, not the padded width
    # the second document of row 0 sees nothing of the first: same logits as on its own
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():  # use_cache=False as TRL trains (a KV cache turns packed-sequence masking off)
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0, 3:5]
        alone = model(input_ids=torch.tensor([[8, 9]]), use_cache=False).logits[0]
    assert torch.allclose(packed, alone, atol=1e-5)


# --- each method on Ray Train ----------------------------------------------------------------

# SFT and KTO learn in the two-stage recipe test below, with the same assertions
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_method_loss_falls_and_exports(method, tmp_path, tiny_model, ray_local):
    data = write_jsonl(tmp_path / f"{method}.jsonl", rows_for(method))
    handler = signal.getsignal(signal.SIGINT)
    result = train(small_config(method), model=str(tiny_model), dataset=data, output_dir=tmp_path / "out")
    assert result.steps == 5
    # the run's controller ends with the run: Ray Train's Ctrl-C handler (which held it) is gone
    assert signal.getsignal(signal.SIGINT) is handler
    assert_no_actor_process_left()
    history = losses(result)
    assert len(history) == 5 and history[-1] < history[0], history
    if method != "orpo":  # TRL's ORPO logs no token count
        assert all(h.get("tokens_per_s", 0) > 0 for h in result.history[1:5])
    assert_loads(result.model_dir)
    again = train(small_config(method), model=str(tiny_model), dataset=data, output_dir=tmp_path / "out")
    assert again.skipped and again.steps == 5
    with pytest.raises(TrainError, match="another config"):
        train(small_config(method, seed=1), model=str(tiny_model), dataset=data, output_dir=tmp_path / "out")


# --- distributed -----------------------------------------------------------------------------

def test_a_resident_trainer_fits_as_ray_train_does_and_outlives_a_lost_actor(tmp_path, tiny_model, ray_local):
    """The closed loop's trainer that stays up: the same losses and weights as a Ray Train run of
    the same config, a second fit on the same actor (no new process), a fit whose actor dies at a
    step resumes on a new one from the last TRL checkpoint; configs it cannot run go to Ray Train."""
    import ray

    from raypost.training.resident import ResidentTrainer, supports

    data = write_jsonl(tmp_path / "sft.jsonl", rows_for("sft"))
    config = small_config("sft", checkpointing={"save_steps": 2}, failure={"max_failures": 1})
    on_ray_train = train(config, model=str(tiny_model), dataset=data, output_dir=tmp_path / "ray_train")
    resident = ResidentTrainer(config)
    try:
        first = train(config, model=str(tiny_model), dataset=data, output_dir=tmp_path / "first", resident=resident)
        assert (first.trainer, on_ray_train.trainer) == ("resident", "ray_train")
        assert losses(first) == losses(on_ray_train) and len(losses(first)) == 5
        assert first.ranks_consistent and first.metrics["host_allocator"] == "retain"
        assert _weights(first.model_dir) == _weights(on_ray_train.model_dir)
        assert_loads(first.model_dir)
        # only the export is kept: the fit's own checkpoints went with its success
        assert sorted(p.name for p in (tmp_path / "first").iterdir()) == ["model", "train_result.json"]
        pid = ray.get(resident.actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
        second = train(config, model=first.model_dir, dataset=data, output_dir=tmp_path / "second", resident=resident)
        assert second.steps == 5 and losses(second)[0] < losses(first)[0]   # it went on from the first's weights
        assert resident.starts == 1 and ray.get(resident.actor.__ray_call__.remote(
            lambda self: __import__("os").getpid())) == pid
        # the actor dies after step 3: a new one resumes from checkpoint-2 and ends as if nothing happened
        crash = CrashOnceCallback(3, str(tmp_path / "crashed"))
        resumed = train(config, model=str(tiny_model), dataset=data, output_dir=tmp_path / "crash",
                        resident=resident, callbacks=[crash])
        assert (tmp_path / "crashed").exists() and resident.starts == 2
        assert resumed.steps == 5 and _weights(resumed.model_dir) == _weights(first.model_dir)
        # what one actor cannot run goes to Ray Train, and the actor steps aside for it
        two = small_config("sft", scaling={"num_workers": 2})
        assert "num_workers is 2" in supports(two) and not resident.accepts(two)
        other = small_config("sft", scaling={"allocator": "system"}, checkpointing={"save_steps": 50})
        plain = train(other, model=str(tiny_model), dataset=data, output_dir=tmp_path / "system", resident=resident)
        # a worker of another shape: a new actor, started with the system allocator
        assert plain.trainer == "resident" and plain.metrics["host_allocator"] == "system" and resident.starts == 3
    finally:
        resident.close()
    assert_no_actor_process_left("TrainerActor")


def _weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return {name: tensor.sum().item() for path in sorted(Path(model_dir).glob("*.safetensors"))
            for name, tensor in load_file(path).items()}


@pytest.mark.slow
def test_two_worker_ddp_lora_identical_weights_one_mlflow_run_and_the_configured_allocator(
        tmp_path, tiny_model, ray_local, monkeypatch):
    """One fit (each costs ~25 s of start-up) for four things: two DDP workers end with the same
    weights; LoRA adapters are merged into a full checkpoint with plain weight names; rank 0
    alone logs to MLflow (one run); the workers run with the configured host allocator ('system'
    here; 'retain', the default, is asserted by the two-stage recipe test)."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this reading client, as for the worker
    data = write_jsonl(tmp_path / "sft.jsonl", rows_for("sft", 8))
    tracking_dir = tmp_path / "mlruns"
    config = small_config("sft", sft={"learning_rate": 2e-3, "max_steps": 3, "per_device_train_batch_size": 2,
                                      "max_length": 64, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                          scaling={"num_workers": 2, "allocator": "system"},
                          tracking={"backend": "mlflow", "dir": str(tracking_dir)})
    result = train(config, model=str(tiny_model), dataset=data, output_dir=tmp_path / "out")
    assert result.steps == 3
    assert len(result.peak_rss_mb_per_worker) == 2
    assert result.ranks_consistent is True
    assert result.metrics["host_allocator"] == "system"
    assert_loads(result.model_dir)
    base = load_file(next(Path(tiny_model).glob("*.safetensors")))
    merged = load_file(next(Path(result.model_dir).glob("*.safetensors")))
    assert set(base) == set(merged)  # plain weight names: no lora_A/lora_B left
    assert [k for k in base if "q_proj" in k and not (base[k] == merged[k]).all()]
    # rank 0 alone logs: one MLflow run with every step, not one per worker
    client = MlflowClient(tracking_uri=tracking_dir.resolve().as_uri())
    experiment = client.get_experiment_by_name("raypost")
    [run] = client.search_runs([experiment.experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert client.get_metric_history(run.info.run_id, "tokens_per_s")
    assert run.data.params["learning_rate"] == "0.002"


@pytest.mark.slow
def test_two_worker_deepspeed_zero2_killed_worker_resumes_from_last_checkpoint(tmp_path, tiny_model, ray_local):
    """ZeRO-2 on two CPU workers, one of which dies at step 3: Ray Train restarts the group and
    it resumes from the step-2 checkpoint (one fit for both: each costs ~25 s of start-up)."""
    data = write_jsonl(tmp_path / "sft.jsonl", rows_for("sft", 8))
    marker = tmp_path / "crashed"
    config = small_config("sft", sft={"max_steps": 6, "per_device_train_batch_size": 2},
                          scaling={"num_workers": 2, "deepspeed": "zero2"},
                          checkpointing={"save_steps": 2}, failure={"max_failures": 1})
    result = train(config, model=str(tiny_model), dataset=data, output_dir=tmp_path / "out",
                   callbacks=[CrashOnceCallback(step=3, marker=str(marker))])
    assert marker.read_text() == "3"  # a worker really died at step 3
    assert result.steps == 6
    assert result.ranks_consistent is True
    # the restarted run resumed at step 2 (its checkpoint) rather than from scratch: trainer
    # state carries the log of steps 1-2 from the first attempt and 3-6 from the second
    stepped = [h for h in result.history if "loss" in h]
    assert [h["step"] for h in stepped] == [1, 2, 3, 4, 5, 6]
    assert stepped[-1]["loss"] < stepped[0]["loss"], stepped
    # every rank's own files are in each stored checkpoint (the resume above needed rank 1's)
    stored = sorted((tmp_path / "out" / "ray").rglob("checkpoint-0*"))
    assert stored
    for checkpoint in stored:
        names = {p.name for p in checkpoint.rglob("*")}
        assert {"rng_state_0.pth", "rng_state_1.pth", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names, (checkpoint, sorted(names))
    assert_loads(result.model_dir)


@pytest.mark.slow
def test_recipe_two_stage_sft_then_kto(tmp_path, tiny_model, ray_local):
    import yaml

    from raypost import records
    from raypost.recipe import load_recipe
    from raypost.recipe import run_recipe

    # the curation stage's layout: <stage>/sft and <stage>/kto Parquet dirs
    records.write_part(tmp_path / "runs" / "curated" / "sft", rows_for("sft"))
    records.write_part(tmp_path / "runs" / "curated" / "kto", rows_for("kto"))
    block = {"learning_rate": 2e-3, "max_steps": 2, "per_device_train_batch_size": 4, "max_length": 64}
    recipe = {
        "name": "two-stage", "output_dir": str(tmp_path / "runs"),
        "models": {"student": str(tiny_model)},
        "stages": [
            {"kind": "train", "name": "sft", "method": "sft", "model": "student",
             "dataset": {"path": str(tmp_path / "runs" / "curated" / "sft")}, "sft": block, "tracking": {"backend": "tensorboard"}},
            {"kind": "train", "name": "kto", "method": "kto", "model": "stage:sft",
             "dataset": {"path": str(tmp_path / "runs" / "curated" / "kto")}, "kto": block},
        ],
    }
    # a second model by path, read by the merge only: its identity is its content, not where it lives
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    recipe["stages"].append({"kind": "merge", "name": "merged", "method": "linear",
                             "models": ["stage:sft", str(other)]})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    summaries = run_recipe(load_recipe(path))
    assert summaries["sft"]["steps"] == 2 and summaries["kto"]["steps"] == 2
    # each method learns (the DPO and ORPO runs above assert the same) and counts its tokens
    for name in ("sft", "kto"):
        history = json.loads((tmp_path / "runs" / name / "train_result.json").read_text())["history"]
        stepped = [h for h in history if "loss" in h]
        assert len(stepped) == 2 and stepped[-1]["loss"] < stepped[0]["loss"], (name, stepped)
        assert stepped[-1].get("tokens_per_s", 0) > 0, (name, stepped)
        assert summaries[name]["metrics"]["host_allocator"] == "retain"   # the default
    assert list((tmp_path / "runs" / "sft" / "tracking").rglob("events.out.tfevents*"))
    assert_loads(summaries["kto"]["model_dir"])
    # KTO started from the SFT export, not from the base model
    assert summaries["kto"]["base_model"] == str((tmp_path / "runs" / "sft" / "model").resolve())

    def ran(summaries):
        return {name for name, s in summaries.items() if not s.get("up_to_date")}

    # a second run runs nothing, and says so
    assert ran(run_recipe(load_recipe(path))) == set()
    # one training setting changed: that stage and what reads it run, the others do not
    assert ran(run_recipe(load_recipe(path, ["stages.kto.kto.learning_rate=1e-3"]))) == {"kto"}
    # a model retrained into the same path is another model: the merge that reads it runs again,
    # and only the merge (the trained stages never read it)
    merged_before = (tmp_path / "runs" / "merged" / "manifest.json").read_text()
    shutil.rmtree(other)
    make_tiny_model(other, seed=7)
    again = run_recipe(load_recipe(path, ["stages.kto.kto.learning_rate=1e-3"]))
    assert ran(again) == {"merged"}
    assert (tmp_path / "runs" / "merged" / "manifest.json").read_text() != merged_before
