"""`make demo`: the product end to end on this machine, in three to five minutes.

Starts a local Ray (loopback only), writes a sample corpus (MBXP test prompts, the four languages
interleaved, with their task id, language and entry point), runs the Ray Data batch job over it
twice with the default model, once with its GenGuard and once without, prints the job's
progress while it runs and then a short table, and stops the Ray it started.

    python -m jobs.demo [--per-language 8] [--max-new-tokens 128] [--out runs/demo]

The token cap (128 by default) keeps the run without the guard within about three minutes on a
2-core CPU; the guard usually stops well before it, and the table shows what it saved.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from backends.protocol import BACKEND_NAMES
from guard.syntax import LANGUAGES
from jobs.generate import JobConfig, connect_ray, new_run_id, run_job

# Why the wall time falls far less than the tokens on a CPU: told with the table.
CPU_WALL_TIME_NOTE = ("On a CPU, wall time falls much less than tokens: loading the model and reading"
                      " each prompt (prefill, hundreds of tokens per row) cost the same with and without"
                      " the guard, and only decoding shrinks. On a GPU, decoding dominates.")


def write_corpus(path: Path, per_language: int) -> int:
    from evals.mbxp import load_problems, split_problems

    groups = [split_problems(load_problems(lang), "test")[:per_language] for lang in LANGUAGES]
    rows = [{"id": p.task_id, "language": p.language, "entry_point": p.entry_point, "prompt": p.prompt}
            for group in zip(*groups) for p in group]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def print_table(runs: list[tuple[str, dict]], max_new_tokens: int) -> None:
    print("\n| run | rows | errors | generated tokens | wall s | rows/s | guard stops | output |")
    print("|---|---|---|---|---|---|---|---|")
    for label, s in runs:
        print(f"| {label} | {s['num_rows']} | {s['num_errors']} | {s['num_generated_tokens']} | {s['wall_s']:.1f}"
              f" | {s['rows_per_s']:.2f} | {s['num_guard_stops']} | {s['output']} |")
    by_label = dict(runs)
    if "GenGuard" in by_label and "no guard" in by_label:
        with_guard, without = by_label["GenGuard"], by_label["no guard"]
        saved = without["num_generated_tokens"] - with_guard["num_generated_tokens"]
        share = saved / max(without["num_generated_tokens"], 1)
        print(f"\nTokens saved by GenGuard: {saved} of {without['num_generated_tokens']} ({share:.0%});"
              f" wall time {with_guard['wall_s']:.1f}s vs {without['wall_s']:.1f}s"
              f" (both capped at {max_new_tokens} new tokens per prompt).")
        print(CPU_WALL_TIME_NOTE)
    print("Each output folder holds parquet files: every corpus column plus completion, finish_reason,"
          " token counts and is_guard_stop (read them with pyarrow.parquet.read_table(FOLDER)).")


def show(line: str) -> None:
    if not line.startswith("SUMMARY "):  # the machine-readable line; the table below says it all
        print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--backend", default="codefast", choices=list(BACKEND_NAMES))
    p.add_argument("--per-language", type=int, default=8, help="MBXP test prompts per language")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default="runs/demo", help="the corpus and both outputs go in a new folder here")
    p.add_argument("--num-cpus-per-actor", type=float, default=2.0, help="= torch threads of the engine actor")
    args = p.parse_args(argv)
    work_dir = Path(args.out).resolve() / new_run_id()
    corpus = work_dir / "mbxp.jsonl"
    num_rows = write_corpus(corpus, args.per_language)
    print(f"[demo] corpus: {num_rows} MBXP test prompts ({', '.join(LANGUAGES)}) in {corpus}", flush=True)
    print(f"[demo] backend: {args.backend}, model: {args.model}", flush=True)
    settings = dict(input=str(corpus), backend=args.backend, model=args.model, max_new_tokens=args.max_new_tokens,
                    num_cpus_per_actor=args.num_cpus_per_actor, max_num_seqs=16, batch_size=8,
                    min_rows_per_file=num_rows, progress_interval_s=5.0)
    start = time.perf_counter()
    print("[demo] starting a local Ray (127.0.0.1) ...", flush=True)
    is_ray_owner = connect_ray(JobConfig.from_args({"output": str(work_dir), **settings}), address=None)
    runs = []
    try:
        for label, guard in (("GenGuard", "default"), ("no guard", None)):
            print(f"\n[demo] job {len(runs) + 1}/2: {label}", flush=True)
            config = JobConfig.from_args({"output": str(work_dir / ("out-guard" if guard else "out-noguard")),
                                          "guard": guard, **settings})
            runs.append((label, run_job(config, log=show)))
    finally:
        if is_ray_owner:
            import ray

            ray.shutdown()
            print("[demo] stopped the local Ray it started", flush=True)
    print_table(runs, args.max_new_tokens)
    print(f"Total demo time {time.perf_counter() - start:.0f}s (model loading included).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
