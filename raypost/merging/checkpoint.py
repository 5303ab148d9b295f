"""Read HF safetensors checkpoints lazily and write one tensor at a time.

Reading: every shard is validated and listed with `safetensors.safe_open` (names, shapes,
dtypes, no data), and `get` reads one tensor. Writing: the output layout is known before any
math, so each shard's safetensors header is written first and the merged tensors are appended
as they are computed; no shard is ever held in memory.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from contextlib import ExitStack
from pathlib import Path

import torch


class MergeError(ValueError):
    """Checkpoints that cannot be merged; the message names the model, tensor or config field."""


WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# When input and output embeddings are tied, transformers saves one of them; another copy of the
# same architecture may have saved the other (or both). Names in one group stand for each other.
TIED_GROUPS = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("embed_out.weight", "gpt_neox.embed_in.weight"),
    ("lm_head.weight", "transformer.word_embeddings.weight"),
    ("lm_head.weight", "model.decoder.embed_tokens.weight"),
)

# Config fields that fix tensor shapes or the forward pass; they must agree across inputs.
ARCHITECTURE_FIELDS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "tie_word_embeddings", "hidden_act", "moe_intermediate_size", "num_experts", "num_local_experts",
)

# Files copied from the donor model: config, generation config, tokenizer, chat template.
SIDE_FILE_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken")
# Records of how the donor was made, not part of the model.
NOT_SIDE_FILES = {INDEX_NAME, "merge.json", "trainer_state.json", "training_args.json", "adapter_config.json"}

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
_BY_NAME.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Checkpoint:
    """A local HF checkpoint: its config and a name -> (shape, dtype) listing of its tensors.

    `safe_open` validates each shard and lists it; tensors are then read with plain file reads
    at the offsets in the safetensors header rather than through safe_open's memory map, whose
    touched pages would stay in this process's RSS until the end (the whole of every input)
    and make the reported peak memory meaningless.
    """

    def __init__(self, path: Path, stack: ExitStack):
        from safetensors import safe_open

        self.path = path
        config_path = path / "config.json"
        try:
            self.config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise MergeError(f"{config_path}: cannot read config ({error})") from None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._location: dict[str, tuple[object, int]] = {}  # name -> (open file, byte offset)
        for file in self._weight_files():
            try:
                with safe_open(str(path / file), framework="pt") as handle:
                    for name in handle.keys():
                        piece = handle.get_slice(name)
                        self.shapes[name] = tuple(piece.get_shape())
                        self.dtypes[name] = _BY_NAME[piece.get_dtype()]
            except Exception as error:  # safetensors raises its own error types for bad files
                raise MergeError(f"{path / file}: not a readable safetensors file ({error})") from None
            raw = stack.enter_context(open(path / file, "rb"))
            for name, offset in _data_offsets(raw).items():
                self._location[name] = (raw, offset)

    def _weight_files(self) -> list[str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise MergeError(f"{index}: not a safetensors index ({error})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise MergeError(f"{index}: lists shard(s) that do not exist: {', '.join(missing)}")
            return files
        if (self.path / WEIGHTS_NAME).is_file():
            return [WEIGHTS_NAME]
        found = sorted(p.name for p in self.path.glob("*.safetensors"))
        if found:
            return found
        others = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {', '.join(others)}: re-save it with save_pretrained(safe_serialization=True))" if others else ""
        raise MergeError(f"{self.path}: no safetensors weights{hint}")

    def names(self) -> list[str]:
        return list(self.shapes)

    def source_of(self, name: str) -> str | None:
        """The tensor that holds `name` here: itself, or its tied partner when only that was saved."""
        if name in self.shapes:
            return name
        for group in TIED_GROUPS:
            if name in group:
                for other in group:
                    if other != name and other in self.shapes:
                        return other
        return None

    def get(self, name: str) -> torch.Tensor:
        source = self.source_of(name)
        raw, offset = self._location[source]
        tensor = torch.empty(self.shapes[source], dtype=self.dtypes[source])
        if tensor.numel():
            raw.seek(offset)
            buffer = tensor.reshape(-1).view(torch.uint8).numpy()
            if raw.readinto(buffer) != buffer.nbytes:
                raise MergeError(f"{raw.name}: truncated data for tensor {source!r}")
        return tensor


def _data_offsets(raw) -> dict[str, int]:
    """Absolute byte offset of each tensor's data in a safetensors file."""
    raw.seek(0)
    (header_size,) = struct.unpack("<Q", raw.read(8))
    header = json.loads(raw.read(header_size))
    header.pop("__metadata__", None)
    return {name: 8 + header_size + entry["data_offsets"][0] for name, entry in header.items()}


def architecture_fields(config: dict) -> dict[str, object]:
    fields = {key: config[key] for key in ARCHITECTURE_FIELDS if key in config}
    text = config.get("text_config")
    if isinstance(text, dict):
        fields.update({f"text_config.{key}": text[key] for key in ARCHITECTURE_FIELDS if key in text})
    return fields


def check_compatible(reference: Checkpoint, others: list[Checkpoint]) -> None:
    """Same architecture: config fields, tensor names (tied embeddings allowed) and shapes agree."""
    expected = architecture_fields(reference.config)
    for other in others:
        got = architecture_fields(other.config)
        for key in [k for k in expected if k in got]:
            if expected[key] != got[key]:
                raise MergeError(
                    f"different architectures: config field {key!r} is {expected[key]!r} in {reference.path} "
                    f"but {got[key]!r} in {other.path}"
                )
        for name, shape in reference.shapes.items():
            source = other.source_of(name)
            if source is None:
                raise MergeError(f"different architectures: tensor {name!r} of {reference.path} is missing from {other.path}")
            if other.shapes[source] != shape:
                raise MergeError(
                    f"different architectures: tensor {name!r} has shape {list(shape)} in {reference.path} "
                    f"but {list(other.shapes[source])} in {other.path}"
                )
        for name in other.names():
            if reference.source_of(name) is None:
                raise MergeError(f"different architectures: tensor {name!r} of {other.path} is not in {reference.path}")


def parse_size(value: int | str) -> int:
    """Bytes from 5000000, '5GB', '500MB' or '2GiB'."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", value, re.IGNORECASE)
    if not match:
        raise MergeError(f"max_shard_size: cannot read {value!r} (use bytes or e.g. '5GB')")
    number, unit, binary = match.groups()
    scale = (1024 if binary else 1000) ** ("KMGT".index(unit.upper()) + 1) if unit else 1
    return int(float(number) * scale)


def plan_shards(layout: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Split (name, shape, dtype) entries into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for entry in layout:
        nbytes = _nbytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * dtype_size(dtype)


class ShardWriter:
    """Writes one safetensors file whose header is fixed up front; tensors arrive in order."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]]):
        self.path = path
        self._expected = [(name, tuple(shape), dtype) for name, shape, dtype in entries]
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self._expected:
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.nbytes = offset
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, shape, dtype = self._expected[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (expected_name, shape, dtype):
            raise RuntimeError(f"{self.path}: expected {expected_name} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if tensor.numel():
            self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._expected):
            raise RuntimeError(f"{self.path}: {len(self._expected) - self._next} tensors never written")


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: Path, shards: list[list], files: list[str], total_size: int) -> None:
    if len(files) == 1:
        return
    weight_map = {name: file for shard, file in zip(shards, files) for name, _, _ in shard}
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))


def copy_side_files(donor: Path, target: Path, output_dtype: str | None) -> list[str]:
    """Copy config, generation config, tokenizer and chat template files from the donor model."""
    copied = []
    for path in sorted(donor.iterdir()):
        if not path.is_file() or path.suffix not in SIDE_FILE_SUFFIXES or path.name in NOT_SIDE_FILES:
            continue
        shutil.copy2(path, target / path.name)
        copied.append(path.name)
    if output_dtype is not None:
        config = json.loads((target / "config.json").read_text())
        config["dtype"] = output_dtype
        config.pop("torch_dtype", None)
        (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return copied
