"""Curation at scale: does the driver's memory stay flat as the rows grow?

    python bench/scale_curate.py                      # 10k and 1M rows, today's path and the legacy one
    python bench/scale_curate.py --sizes 10000 300000 --no-legacy
    python bench/scale_curate.py --select --sizes 10000 200000 --legacy-ref f99293f

For each size a generate stage's output is written directly (Parquet parts of the generation
schema: one response per prompt, every 10th answer wrong, every 50th prompt a repeat of an
earlier one), and a fresh driver process runs `curate` over it with the steps that need no model:
exact dedup, math verification, and the SFT and KTO sets. The driver reports its own peak RSS
(VmHWM: the driver alone, not Ray's workers, nor this parent) and rows/s. `--legacy-ref` runs the same
through the code path before the workers wrote curation's rows (the driver gathered the curated
table, every rejected row and the training sets), checked out from git into a temp dir. Both
must produce the same counts. `--select` adds response selection (the gold solution and the
row's own response as candidates, the verifier ranks them, no model: `scorer: none`) and writes
the preference set too: the step whose rows the driver gathered until f99293f. `--jsonl` writes
the rows as one JSONL file instead and curates it through `load_rows` (what a curate stage whose
input is a file calls): read by the driver until 263eb5e, by Ray Data's read tasks since
(`--legacy-ref 263eb5e`). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import legacy_tree, measure, ratios  # noqa: E402

CHILD = """
import json, sys, time
from raypost.curation import curate
from raypost.curation.config import CandidateConfig, DedupStep, SelectStep, VerifyStep, WriteStep
from raypost.curation.rows import read_stage
from raypost.runtime import ensure_ray

if __name__ == "__main__":
    parts, out = sys.argv[1], sys.argv[2]
    select = "--select" in sys.argv
    ensure_ray()
    started = time.perf_counter()
    if "--jsonl" in sys.argv:
        from raypost.curation import load_rows

        dataset, unreadable = load_rows(parts)
    else:
        dataset, unreadable = read_stage(parts), []
    steps = [DedupStep(step="dedup", near=False), VerifyStep(step="verify")]
    if select:
        steps.append(SelectStep(step="select", scorer="none", candidates=[
            CandidateConfig(name="reference", source="reference"), CandidateConfig(name="teacher", source="input")]))
    steps.append(WriteStep(step="write", formats=["sft", "kto", "preference"] if select else ["sft", "kto"]))
    summary = curate(dataset, steps, output_dir=out, rejected=unreadable)
    seconds = time.perf_counter() - started
    print("RESULT", json.dumps({"rows_out": summary["rows_out"], "rows_rejected": summary["rows_rejected"],
                                "rejected_by_step": summary["rejected_by_step"],
                                "sft": summary["steps"]["write"]["sft"]["rows"],
                                "kto": summary["steps"]["write"]["kto"]["rows"],
                                "preference": summary["steps"]["write"].get("preference", {}).get("rows"),
                                "seconds": seconds,
                                "peak_rss_mb": peak_rss_mb()}), flush=True)
"""


def write_generations(directory: Path, rows: int, files: int, jsonl: bool = False) -> Path:
    """A generate stage's output of `rows` prompts in `files` parts (`jsonl`: the same rows as
    one JSONL file, `directory`/rows.jsonl, which is returned)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypost import schema

    directory.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // files)
    for f in range(files):
        ids = range(f * per_file, min(rows, (f + 1) * per_file))
        # every 50th prompt repeats the question of the one before it (exact dedup has work)
        question = [f"What is {i - 1 if i % 50 == 0 and i else i} plus {i - 1 if i % 50 == 0 and i else i}? "
                    "Show the steps." for i in ids]
        table = pa.table({
            schema.ID: [f"q{i}" for i in ids],
            schema.SAMPLE_INDEX: [0] * len(ids),
            schema.MESSAGES: [[{"role": "user", "content": q}] for q in question],
            schema.REFERENCE: [f"#### {2 * (i - 1 if i % 50 == 0 and i else i)}" for i in ids],
            schema.RESPONSE: [f"The sum is {2 * i + (1 if i % 10 == 3 else 0)}. #### {2 * i + (1 if i % 10 == 3 else 0)}"
                              for i in ids],
        })
        if jsonl:
            with open(directory / "rows.jsonl", "a") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in table.to_pylist())
        else:
            pq.write_table(table, directory / f"part-{f:04d}.parquet")
    return directory / "rows.jsonl" if jsonl else directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--files", type=int, default=8, help="Parquet parts per size")
    parser.add_argument("--legacy-ref", default="d5ef44f", help="git ref of the driver-side curation path")
    parser.add_argument("--no-legacy", action="store_true")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--select", action="store_true", help="add response selection (no model) and the preference set")
    parser.add_argument("--jsonl", action="store_true", help="one JSONL file through load_rows instead of Parquet parts")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="raypost-scale-curate-"))
    legacy_path = None if args.no_legacy else legacy_tree(args.legacy_ref, Path(tempfile.mkdtemp(prefix="raypost-legacy-")))
    steps = ["dedup(exact)", "verify(math)", "select(reference,input; scorer none)", "write(sft,kto,preference)"] \
        if args.select else ["dedup(exact)", "verify(math)", "write(sft,kto)"]
    result: dict = {"steps": steps, "input": "one JSONL file (load_rows)" if args.jsonl else "Parquet parts",
                    "parts_per_size": args.files, "sizes": args.sizes}
    label = {10_000: "10k", 100_000: "100k", 200_000: "200k", 300_000: "300k", 1_000_000: "1m", 3_000_000: "3m"}
    counts: dict[str, dict] = {}
    for size in args.sizes:
        name = label.get(size, str(size))
        parts = write_generations(work / f"generations-{size}", size, args.files, jsonl=args.jsonl)
        for prefix, pythonpath in (("", str(REPO)), ("legacy_", legacy_path)):
            if pythonpath is None:
                continue
            measured = measure(result, CHILD, pythonpath, parts, work / f"out-{prefix or 'new_'}{size}", prefix, name, size,
                               extra_args=[*(["--select"] if args.select else []), *(["--jsonl"] if args.jsonl else [])])
            if measured is not None:
                counts.setdefault(name, {})[prefix or "streaming"] = {
                    k: measured.get(k) for k in ("rows_out", "rows_rejected", "rejected_by_step", "sft", "kto", "preference")}
        subprocess.run(["rm", "-rf", str(work / f"generations-{size}")], check=True)
    ratios(result, [label.get(s, str(s)) for s in args.sizes])
    result["counts"] = counts
    result["same_counts"] = all(len({json.dumps(v, sort_keys=True) for v in by_path.values()}) == 1
                                for by_path in counts.values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
