"""Generation at scale with the reference engine (no model: the pipeline itself is measured).

    python bench/scale.py                       # 10k and 1M prompts, today's path and the legacy one
    python bench/scale.py --sizes 10000 --no-legacy

For each size the prompts are written as JSONL shards, and a fresh driver process runs
`generate_files` over them; the driver reports its own peak RSS (VmHWM: the driver alone, not this parent,
not Ray's worker processes) and rows/s. `--legacy-ref` runs the same prompts through the code
path before streaming (the driver loads every row, builds the dataset with from_items and
writes every part itself), checked out from git into a temp dir. At the largest size the driver
is also SIGKILLed mid-run (after 5 committed parts) and rerun: every (id, sample) must be there
exactly once. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The child's own peak: VmHWM, not ru_maxrss, which Linux carries across fork and exec from this
# parent (which held the generated rows): the children run legacy trees too, so they carry it.
PEAK_RSS = """
def peak_rss_mb():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

CHILD_NEW = """
import json, sys, time
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.generation.pipeline import generate_files
from raypost.records import PromptFormat
from raypost.runtime import ensure_ray

if __name__ == "__main__":
    shards, out = sys.argv[1], sys.argv[2]
    ensure_ray()
    started = time.perf_counter()
    s = generate_files(shards, PromptFormat(prompt_field="question", id_field="qid", reference_field="answer"),
                       model="gold", output_dir=out, engine=EngineConfig(backend="reference", batch_size=1024),
                       sampling=SamplingConfig(max_tokens=16), resources=Resources(concurrency=2, cpus_per_actor=0.5),
                       progress=False)
    seconds = time.perf_counter() - started
    print("RESULT", json.dumps({"rows": s.rows_written, "skipped": s.rows_skipped, "seconds": seconds,
                                "peak_rss_mb": peak_rss_mb()}), flush=True)
"""

CHILD_LEGACY = """
import json, sys, time
from pathlib import Path
from raypost import records
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.generation.pipeline import generate
from raypost.runtime import ensure_ray

if __name__ == "__main__":
    shards, out = Path(sys.argv[1]), sys.argv[2]
    ensure_ray()
    started = time.perf_counter()
    fmt = records.PromptFormat(prompt_field="question", id_field="qid", reference_field="answer")
    rows = []
    for shard in sorted(shards.glob("*.jsonl")):
        rows.extend(records.load_prompts(shard, fmt).rows)
    s = generate(rows, model="gold", output_dir=out, engine=EngineConfig(backend="reference", batch_size=1024),
                 sampling=SamplingConfig(max_tokens=16), resources=Resources(concurrency=2, cpus_per_actor=0.5),
                 progress=False)
    seconds = time.perf_counter() - started
    print("RESULT", json.dumps({"rows": s.rows_written, "skipped": s.rows_skipped, "seconds": seconds,
                                "peak_rss_mb": peak_rss_mb()}), flush=True)
"""


def write_shards(directory: Path, rows: int, files: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // files)
    for f in range(files):
        with open(directory / f"prompts-{f:03d}.jsonl", "w") as handle:
            for i in range(f * per_file, min(rows, (f + 1) * per_file)):
                handle.write(json.dumps({"qid": f"q{i}", "question": f"What is {i} plus {i}? Show the steps.",
                                         "answer": f"{i} + {i} = {2 * i}. #### {2 * i}"}) + "\n")
    return directory


def run_child(code: str, pythonpath: str, shards: Path, out: Path, fault: str | None = None,
              timeout: int = 3600, extra_args: list[str] = ()) -> dict | None:
    script = out.parent / f"child-{abs(hash(code)) % 10_000}.py"
    script.write_text(PEAK_RSS + code)
    env = {**os.environ, "PYTHONPATH": pythonpath, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    if fault:
        env["RAYPOST_GENERATE_FAULT"] = fault
    result = subprocess.run([sys.executable, str(script), str(shards), str(out), *extra_args], env=env, capture_output=True,
                            text=True, timeout=timeout)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if not fault:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
    return None


def exactly_once(out: Path, rows: int) -> dict:
    import pyarrow.compute as pc

    sys.path.insert(0, str(REPO))
    from raypost import records

    table = records.read_table(out, columns=["id", "sample_index"])
    unique = len(pc.unique(table.column("id"))) if table is not None else 0
    present = table.num_rows if table is not None else 0
    return {"rows": present, "unique_ids": unique, "exactly_once": present == rows == unique}


def legacy_tree(ref: str, into: Path) -> str:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "raypost"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return str(into)


def measure(result: dict, code: str, pythonpath: str, inputs: Path, out: Path, prefix: str, name: str,
            rows: int, extra_args: list[str] = ()) -> dict | None:
    """Run one child driver over `inputs` into a fresh `out`; its peak RSS, rows/s and seconds go
    into `result` under `prefix` and the size's `name`. Returns what the child reported."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    started = time.perf_counter()
    measured = run_child(code, pythonpath, inputs, out, extra_args=extra_args)
    print(f"{prefix or 'streaming_'}{name}: {measured} ({time.perf_counter() - started:.0f} s with start-up)",
          file=sys.stderr, flush=True)
    if measured is None:
        result[f"{prefix}failed_{name}"] = True
    else:
        result[f"{prefix}driver_peak_rss_mb_{name}"] = round(measured["peak_rss_mb"], 1)
        result[f"{prefix}rows_per_s_{name}"] = round(rows / measured["seconds"], 1)
        result[f"{prefix}seconds_{name}"] = round(measured["seconds"], 1)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return measured


def ratios(result: dict, names: list[str]) -> None:
    """The largest size against the smallest: driver RSS and rows/s, for each code path measured."""
    small, large = names[0], names[-1]
    for prefix in ("", "legacy_"):
        if small != large and f"{prefix}driver_peak_rss_mb_{large}" in result \
                and f"{prefix}driver_peak_rss_mb_{small}" in result:
            result[f"{prefix}driver_rss_ratio_{large}_vs_{small}"] = round(
                result[f"{prefix}driver_peak_rss_mb_{large}"] / result[f"{prefix}driver_peak_rss_mb_{small}"], 3)
            result[f"{prefix}rows_per_s_ratio_{large}_vs_{small}"] = round(
                result[f"{prefix}rows_per_s_{large}"] / result[f"{prefix}rows_per_s_{small}"], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--files", type=int, default=8, help="JSONL shards per size")
    parser.add_argument("--legacy-ref", default="f2844df", help="git ref of the pre-streaming code path")
    parser.add_argument("--no-legacy", action="store_true")
    parser.add_argument("--no-kill", action="store_true")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="raypost-scale-"))
    legacy_path = None if args.no_legacy else legacy_tree(args.legacy_ref, Path(tempfile.mkdtemp(prefix="raypost-legacy-")))
    result: dict = {"engine": "reference", "files_per_size": args.files, "sizes": args.sizes}
    label = {10_000: "10k", 1_000_000: "1m"}
    for size in args.sizes:
        name = label.get(size, str(size))
        shards = write_shards(work / f"prompts-{size}", size, args.files)
        for path_name, code, pythonpath in (("", CHILD_NEW, str(REPO)), ("legacy_", CHILD_LEGACY, legacy_path)):
            if pythonpath is not None:
                measure(result, code, pythonpath, shards, work / f"out-{path_name or 'new_'}{size}", path_name, name, size)
    ratios(result, [label.get(s, str(s)) for s in args.sizes])
    if not args.no_kill:
        size = args.sizes[-1]
        name = label.get(size, str(size))
        shards = work / f"prompts-{size}"
        out = work / f"out-kill-{size}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        run_child(CHILD_NEW, str(REPO), shards, out, fault="KILL:5")
        from raypost import records  # noqa: E402  (the repo is on sys.path from here)

        before = records.count_rows(out) if out.exists() else 0
        rerun = run_child(CHILD_NEW, str(REPO), shards, out)
        check = exactly_once(out, size)
        result[f"kill_resume_{name}"] = {"rows_before_kill": before, "rows_written_after": rerun and rerun["rows"],
                                         **check}
        subprocess.run(["rm", "-rf", str(out)], check=True)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
