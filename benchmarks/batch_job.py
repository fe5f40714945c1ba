"""Ray Data batch job vs calling the engine directly, with the guard and without, in one run.

Same MBXP prompts (test split, the four languages in turn), same engine settings, greedy. The
direct run builds the engine in this process and queues every prompt on it at once; the job run
is `jobs.generate.run_job` on a Ray that is already up (its start-up is not counted, an actor's
engine construction is, as it is in the direct run).
Ray overhead = job wall time / direct wall time - 1 (target <= 15%, meaningful with one actor).

    python -m benchmarks.batch_job --model default --limit 256 --max-new-tokens 300
    python -m benchmarks.batch_job --model codefast/tiny-random --limit 20   # smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from engine import Engine, EngineConfig, PromptError, SamplingParams
from evals.mbxp import load_problems, split_problems
from jobs.generate import JobConfig, connect_ray, run_job
from jobs.shards import read_output

LANGUAGES = ("python", "javascript", "go", "cpp")
OVERHEAD_TARGET = 0.15


def mbxp_prompts(limit: int) -> list[tuple[str, str]]:
    """(task_id, prompt) pairs, the languages interleaved so any limit mixes all four."""
    per_language = [split_problems(load_problems(lang), "test") for lang in LANGUAGES]
    mixed = [p for group in zip(*per_language) for p in group][:limit]
    if len(mixed) < limit:
        raise ValueError(f"only {len(mixed)} MBXP test prompts available, asked for {limit}")
    return [(p.task_id, p.prompt) for p in mixed]


def run_direct(args, guard: str | None, prompts: list[str]) -> tuple[dict, list[str]]:
    """The whole corpus queued on one engine at once: the best a single engine can do, so the
    job's overhead also counts any slot left idle between its batches."""
    start = time.perf_counter()
    engine = Engine.from_pretrained(args.model, guard=guard, config=EngineConfig(
        max_num_seqs=args.max_num_seqs, dtype=args.dtype, device=args.device))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, use_guard=guard is not None)
    # As the actors do: prompts the engine refuses (too long for its context) are skipped.
    servable = [p for p in prompts if is_servable(engine, p, params)]
    request_ids = [engine.add_request(p, params).request_id for p in servable]
    results = {}
    while engine.has_unfinished():
        for event in engine.step():
            if event.is_finished:
                results[event.request_id] = event.result
                if len(results) % args.batch_size == 0:
                    print(f"[direct] {len(results)}/{len(servable)} prompts,"
                          f" {time.perf_counter() - start:.0f} s", flush=True)
    wall_s = time.perf_counter() - start
    del engine
    gc.collect()
    texts = {p: results[rid].text for p, rid in zip(servable, request_ids)}
    return measure(wall_s, [r.num_generated_tokens for r in results.values()],
                   sum(r.finish_reason == "guard" for r in results.values())), [texts.get(p) for p in prompts]


def is_servable(engine: Engine, prompt: str, params: SamplingParams) -> bool:
    try:
        engine.encode_prompt(prompt, params)
        return True
    except PromptError:
        return False


def run_ray_job(args, guard: str | None, corpus: Path, work_dir: Path) -> tuple[dict, dict[str, str]]:
    output = work_dir / f"out-{'guard' if guard else 'noguard'}"
    config = JobConfig(input=str(corpus), output=str(output), model=args.model, guard=guard,
                       max_new_tokens=args.max_new_tokens, num_actors=args.num_actors,
                       batch_size=args.batch_size, max_num_seqs=args.max_num_seqs, dtype=args.dtype,
                       num_cpus_per_actor=args.threads, num_gpus_per_actor=args.num_gpus_per_actor,
                       shard_size=10**9, progress_interval_s=30.0)
    summary = run_job(config, log=lambda line: print(line, flush=True))
    table = read_output(output)
    texts = dict(zip(table.column("id").to_pylist(), table.column("completion").to_pylist()))
    return measure(summary["wall_s"], table.column("num_generated_tokens").to_pylist(),
                   summary["num_guard_stops"]), texts


def measure(wall_s: float, num_tokens: list[int | None], num_guard_stops: int) -> dict:
    """Counts served rows only (an error row has no token count)."""
    num_tokens = [n for n in num_tokens if n is not None]
    return {"rows": len(num_tokens), "wall_s": round(wall_s, 2),
            "rows_per_s": round(len(num_tokens) / wall_s, 3),
            "gen_tokens": sum(num_tokens), "gen_tokens_per_s": round(sum(num_tokens) / wall_s, 1),
            "guard_stops": num_guard_stops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--guard", default="default", help="the guard of the 'with guard' runs")
    parser.add_argument("--limit", type=int, default=256, help="number of MBXP prompts (>= 200 for the real run)")
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads of the direct run = CPUs reserved per actor")
    parser.add_argument("--modes", default="guard,none",
                        help="which halves to run: 'guard' (with --guard), 'none' (no guard), or both")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not modes or set(modes) - {"guard", "none"}:
        parser.error("--modes takes guard, none or guard,none")
    args.device = "cuda" if args.num_gpus_per_actor > 0 else "cpu"
    torch.set_num_threads(args.threads)

    pairs = mbxp_prompts(args.limit)
    work_dir = Path(tempfile.mkdtemp(prefix="batch_job_bench_"))
    corpus = work_dir / "mbxp.jsonl"
    corpus.write_text("".join(json.dumps({"id": tid, "prompt": p}) + "\n" for tid, p in pairs))
    # The job's Ray: up before timing starts (a cluster is normally already running).
    connect_ray(JobConfig(input=str(corpus), output=str(work_dir), ray_num_cpus=max(4, args.threads + 1)),
                address=None)

    rows, checks = [], []
    for guard in [args.guard if mode == "guard" else None for mode in modes]:
        label = "with guard" if guard else "no guard"
        direct, direct_texts = run_direct(args, guard, [p for _, p in pairs])
        job, job_texts = run_ray_job(args, guard, corpus, work_dir)
        served = [(tid, text) for (tid, _), text in zip(pairs, direct_texts) if text is not None]
        same = sum(job_texts.get(tid) == text for tid, text in served)
        overhead = job["wall_s"] / direct["wall_s"] - 1
        rows += [{"run": f"direct engine, {label}", **direct},
                 {"run": f"Ray Data job, {label}", **job, "overhead_vs_direct": round(overhead, 4)}]
        print(f"[done] {json.dumps(rows[-2:])}", flush=True)  # a long run keeps its halves if cut off
        checks.append(f"{label}: Ray overhead {overhead:+.1%} (target <= {OVERHEAD_TARGET:.0%}:"
                      f" {'ok' if overhead <= OVERHEAD_TARGET else 'MISSED'});"
                      f" identical completions {same}/{len(served)} served prompts")

    print(f"\nmodel={args.model} guard={args.guard} prompts={len(pairs)} max_new_tokens={args.max_new_tokens}"
          f" batch_size={args.batch_size} max_num_seqs={args.max_num_seqs} actors={args.num_actors}"
          f" threads={args.threads} device={args.device}")
    print("| run | rows | wall s | rows/s | gen tokens | gen tok/s | guard stops |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['rows']} | {r['wall_s']} | {r['rows_per_s']} | {r['gen_tokens']}"
              f" | {r['gen_tokens_per_s']} | {r['guard_stops']} |")
    by_run = {r["run"]: r for r in rows}
    for path in ("direct engine", "Ray Data job"):
        with_guard, without = by_run.get(f"{path}, with guard"), by_run.get(f"{path}, no guard")
        if with_guard and without:
            checks.append(f"{path}: with guard {with_guard['rows_per_s'] / without['rows_per_s']:.2f}x"
                          f" the rows/s, {with_guard['gen_tokens'] / without['gen_tokens']:.2f}x the"
                          " generated tokens of no guard")
    print("\n".join(checks))
    if args.num_actors > 1:
        print("note: with several actors the job runs in parallel; the overhead line is then a speed-up")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"args": vars(args), "runs": rows, "checks": checks}, indent=2))


if __name__ == "__main__":
    main()
