"""Model references: GGUF -> safetensors conversion, packaged models, clear errors."""

from __future__ import annotations

import pytest
import torch

from raypost.models import ModelError, resolve_model
from tests.gguf_writer import write_llama_gguf


def test_gguf_converts_to_a_dense_checkpoint_with_the_same_weights(tiny_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = write_llama_gguf(tiny_model, tmp_path / "tiny.gguf")
    converted = resolve_model(str(gguf_path), cache_dir=tmp_path / "cache")
    assert (converted / "model.safetensors").exists() and (converted / "config.json").exists()

    original = load_file(str(tiny_model / "model.safetensors"))
    dense = load_file(str(converted / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(dense[name].float(), original[name].float())

    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.chat_template, "the chat template travels with the GGUF"
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert getattr(model.config, "quantization_config", None) is None
    # second resolution reuses the cache
    assert resolve_model(str(gguf_path), cache_dir=tmp_path / "cache") == converted


@pytest.mark.slow
def test_packaged_smollm2_resolves_and_chats(tmp_path):
    from transformers import AutoTokenizer

    from raypost.models import default_cache_dir

    path = resolve_model("packaged:smollm2-135m-instruct", cache_dir=default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in text
    config = (path / "config.json").read_text()
    assert '"quantization_config"' not in config


def test_bad_references_name_the_problem(tmp_path):
    with pytest.raises(ModelError, match="unknown packaged model 'nope'"):
        resolve_model("packaged:nope", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), cache_dir=tmp_path)
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"), cache_dir=tmp_path)


def test_hub_id_without_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="hub could not provide it"):
        resolve_model("someone/some-model-that-is-not-cached", cache_dir=tmp_path)
