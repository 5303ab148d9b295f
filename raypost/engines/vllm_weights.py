"""New weights into a running vLLM engine, inside each of its workers (`worker_extension_cls`).

vLLM's own in-place `reload_weights` undoes and redoes the kernel repacking of the first load (on
CPU the linear layers are repacked, so a plain `load_weights` finds empty parameters). But a
layer that the checkpoint holds no weights for gets its old tensors placed back, and a model with
tied word embeddings (SmolLM2, Llama 3.2, Qwen2.5 small) stores no `lm_head`: its output layer then
keeps the *old* embeddings while the input embeddings are new, and the engine answers with a
model that never existed (measured: logprobs far from a fresh engine's on the same weights).
On CPU the output layer does not even read its weight: it multiplies with a oneDNN handle packed
from the weight when the model loaded, and nothing rebuilds that handle for a layer that loaded
nothing. So after the reload the output layer is tied to the new embeddings again and its weights
are processed again, as at load time (on GPU that processing does nothing for an unquantized one).
"""

from __future__ import annotations

EXTENSION = "raypost.engines.vllm_weights.WeightReload"


def retie_word_embeddings(model) -> bool:
    """Tie the output layer to the input embeddings again where the model ties them; True when
    it did."""
    config = getattr(model, "config", None)
    lm_head = getattr(model, "lm_head", None)
    if not getattr(config, "tie_word_embeddings", False) or lm_head is None or not hasattr(lm_head, "tie_weights"):
        return False
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is None:
        raise ValueError(f"{type(model).__name__}: ties its word embeddings but has no model.embed_tokens to tie to")
    model.lm_head = lm_head.tie_weights(embed)
    method = getattr(model.lm_head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(model.lm_head)   # the CPU kernel's packed copy, rebuilt
    return True


class WeightReload:
    """Mixed into every vLLM worker; `LLM.collective_rpc("raypost_reload_weights", ...)` calls it."""

    def raypost_reload_weights(self, weights_path: str) -> dict:
        from vllm.config import set_current_vllm_config

        self.reload_weights(weights_path=weights_path)
        with set_current_vllm_config(self.vllm_config):
            return {"retied": retie_word_embeddings(self.model_runner.get_model())}

