"""Tiny random models with a real tokenizer, for tests and quick local runs.

Hidden size 64, 2 layers: loads in well under a second, trains at a fraction of a second a
step on a CPU, and exercises the same code paths (chat template, generate, TRL, vLLM) as a
real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "tests" / "assets" / "smollm2_tokenizer"


def make_tiny_model(target: str | Path, tokenizer_dir: str | Path = DEFAULT_TOKENIZER, hidden_size: int = 64,
                    num_layers: int = 2, seed: int = 0, max_position_embeddings: int = 1024) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = Path(target)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        # head_dim 32: vLLM's CPU attention kernels support 32 and up, not 16.
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target
