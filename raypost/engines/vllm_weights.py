"""New weights into a running vLLM engine, without a restart.

vLLM runs the model in its worker processes (EngineCore, and one worker per GPU under tensor
parallelism), not in the process that holds `LLM`. A worker extension (vLLM's
`worker_extension_cls`, the hook verl and OpenRLHF use for weight sync) adds a method to every
worker; `LLM.collective_rpc` calls it on each. The weights travel as a checkpoint directory, not
as tensors through the RPC: the trainer has written it anyway, and each worker reads only what
it needs. Each worker hands the tensors to the model's own `load_weights`, which knows the
model's fused layouts (qkv, gate_up) and tied embeddings.
"""

from __future__ import annotations

from pathlib import Path

EXTENSION = "raypost.engines.vllm_weights.WeightLoader"


class WeightLoader:
    """Mixed into each vLLM worker by `worker_extension_cls`."""

    def raypost_load_weights(self, model_path: str) -> int:
        from safetensors.torch import load_file

        files = sorted(Path(model_path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_path}: no *.safetensors files")
        count = 0
        for file in files:
            tensors = load_file(str(file))
            self.model_runner.model.load_weights(weights=tensors.items())
            count += len(tensors)
        return count
