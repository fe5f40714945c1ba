"""The Ray Data batch job, measured: every figure is a ratio of two runs made side by side here.

    # Ray overhead vs the direct engine, with and without the guard (target <= 10%, >= 500 prompts)
    python -m benchmarks.batch_job overhead --model default --limit 500 --max-new-tokens 128
    # rows/s with 1 and with 2 actors at the same total slots and CPUs
    python -m benchmarks.batch_job scaling --model default --limit 128 --max-new-tokens 128 --total-slots 16
    # peak driver memory, 10k vs 100k short prompts on the tiny model (target: flat)
    python -m benchmarks.batch_job memory --rows 10000 100000
    # time to resume after the driver is killed midway, vs a fresh run's start
    python -m benchmarks.batch_job resume --rows 2000
    python -m benchmarks.batch_job overhead --model codefast/tiny-random --limit 20   # smoke run

Same MBXP test prompts (the four languages interleaved) and settings on both sides of a
comparison, greedy. The direct run builds the engine in this process and queues every prompt at
once; job runs use `jobs.generate.run_job` on a Ray that is already up (its start-up is not
counted; an actor's engine construction is, as it is in the direct run).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import write_report
from guard.syntax import LANGUAGES

OVERHEAD_TARGET = 0.10
MEMORY_GROWTH_TARGET = 0.10  # "flat": the bigger corpus may cost at most 10% more driver memory
REPO_ROOT = Path(__file__).resolve().parent.parent


def mbxp_prompts(limit: int) -> list[tuple[str, str]]:
    """(task_id, prompt) pairs, the languages interleaved so any limit mixes all four."""
    from evals.mbxp import load_problems, split_problems

    per_language = [split_problems(load_problems(lang), "test") for lang in LANGUAGES]
    mixed = [p for group in zip(*per_language) for p in group][:limit]
    if len(mixed) < limit:
        raise ValueError(f"only {len(mixed)} MBXP test prompts available, asked for {limit}")
    return [(p.task_id, p.prompt) for p in mixed]


def write_corpus(path: Path, records) -> Path:
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def measure(wall_s: float, num_tokens: list, num_guard_stops: int) -> dict:
    """Counts served rows only (an error row has no token count)."""
    num_tokens = [n for n in num_tokens if n is not None]
    return {"rows": len(num_tokens), "wall_s": round(wall_s, 2),
            "rows_per_s": round(len(num_tokens) / wall_s, 3),
            "gen_tokens": sum(num_tokens), "gen_tokens_per_s": round(sum(num_tokens) / wall_s, 1),
            "guard_stops": num_guard_stops}


def table(rows: list[dict]) -> list[str]:
    lines = ["| run | rows | wall s | rows/s | gen tokens | gen tok/s | guard stops |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['rows']} | {r['wall_s']} | {r['rows_per_s']} | {r['gen_tokens']}"
                     f" | {r['gen_tokens_per_s']} | {r['guard_stops']} |")
    return lines


def finish(lines: list[str], rows: list[dict], checks: list[str]) -> dict:
    """Prints a figure's table and checks; its result, the report's body with them."""
    report = "\n".join(lines + [""] + checks)
    print("\n" + report)
    return {"runs": rows, "checks": checks, "report": report}


def start_ray(num_cpus: int) -> str:
    from jobs.generate import JobConfig, connect_ray

    connect_ray(JobConfig(input="unused", output="unused", ray_num_cpus=num_cpus), address=None)
    import ray

    return ray.get_runtime_context().gcs_address


def run_ray_job(args, guard: str | None, corpus: Path, output: Path, **overrides) -> tuple[dict, dict]:
    from jobs.generate import JobConfig, run_job
    from jobs.output import read_output

    settings = dict(input=str(corpus), output=str(output), model=args.model, guard=guard,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    max_num_seqs=args.max_num_seqs, dtype=args.dtype, num_cpus_per_actor=args.threads,
                    num_gpus_per_actor=args.num_gpus_per_actor, min_rows_per_file=10**9,
                    progress_interval_s=30.0)
    summary = run_job(JobConfig.from_args({**settings, **overrides}), log=lambda line: print(line, flush=True))
    table = read_output(output, ["id", "completion", "num_generated_tokens"])
    texts = dict(zip(table.column("id").to_pylist(), table.column("completion").to_pylist()))
    return measure(summary["wall_s"], table.column("num_generated_tokens").to_pylist(),
                   summary["num_guard_stops"]), texts


# ---- overhead: the job vs the engine called directly -------------------------------------------
def run_direct(args, guard: str | None, prompts: list[str]) -> tuple[dict, list]:
    """The whole corpus queued on one engine at once: the best a single engine can do, so the
    job's overhead also counts any slot left idle between its batches."""
    from engine import Engine, EngineConfig, PromptError, SamplingParams

    start = time.perf_counter()
    engine = Engine.from_pretrained(args.model, guard=guard, config=EngineConfig(
        max_num_seqs=args.max_num_seqs, dtype=args.dtype, device=args.device))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, use_guard=guard is not None)

    def is_servable(prompt: str) -> bool:  # as the actors do: refused prompts are error rows
        try:
            engine.encode_prompt(prompt, params)
            return True
        except PromptError:
            return False

    servable = [p for p in prompts if is_servable(p)]
    request_ids = [engine.add_request(p, params).request_id for p in servable]
    results = {}
    while engine.has_unfinished():
        for event in engine.step():
            if event.is_finished:
                results[event.request_id] = event.result
    wall_s = time.perf_counter() - start
    engine = None  # free this model before the job's actor loads its own
    gc.collect()
    texts = {p: results[rid].text for p, rid in zip(servable, request_ids)}
    return measure(wall_s, [r.num_generated_tokens for r in results.values()],
                   sum(r.finish_reason == "guard" for r in results.values())), [texts.get(p) for p in prompts]


def overhead(args) -> dict:
    pairs = mbxp_prompts(args.limit)
    corpus = write_corpus(args.work_dir / "mbxp.jsonl", ({"id": tid, "prompt": p} for tid, p in pairs))
    start_ray(max(4, int(args.threads) + 1))
    rows, checks = [], []
    for guard in [args.guard if mode == "guard" else None for mode in args.modes.split(",")]:
        label = "with guard" if guard else "no guard"
        direct, direct_texts = run_direct(args, guard, [p for _, p in pairs])
        job, job_texts = run_ray_job(args, guard, corpus, args.work_dir / f"out-{label.replace(' ', '-')}")
        served = [(tid, text) for (tid, _), text in zip(pairs, direct_texts) if text is not None]
        same = sum(job_texts.get(tid) == text for tid, text in served)
        ratio = job["wall_s"] / direct["wall_s"] - 1
        rows += [{"run": f"direct engine, {label}", **direct},
                 {"run": f"Ray Data job, {label}", **job, "overhead_vs_direct": round(ratio, 4)}]
        print(f"[done] {json.dumps(rows[-2:])}", flush=True)  # a long run keeps its halves if cut off
        checks.append(f"{label}: Ray overhead {ratio:+.1%} (target <= {OVERHEAD_TARGET:.0%}:"
                      f" {'ok' if ratio <= OVERHEAD_TARGET else 'MISSED'});"
                      f" identical completions {same}/{len(served)} served prompts")
    lines = [f"model={args.model} guard={args.guard} prompts={len(pairs)} max_new_tokens={args.max_new_tokens}"
             f" batch_size={args.batch_size} max_num_seqs={args.max_num_seqs} threads={args.threads}", "", *table(rows)]
    by_run = {r["run"]: r for r in rows}
    for path in ("direct engine", "Ray Data job"):
        with_guard, without = by_run.get(f"{path}, with guard"), by_run.get(f"{path}, no guard")
        if with_guard and without:
            checks.append(f"{path}: with guard {with_guard['rows_per_s'] / without['rows_per_s']:.2f}x"
                          f" the rows/s, {with_guard['gen_tokens'] / without['gen_tokens']:.2f}x the"
                          " generated tokens of no guard")
    return finish(lines, rows, checks)


# ---- scaling: 1 actor vs 2 actors at the same total slots --------------------------------------
def scaling(args) -> dict:
    """Same corpus, same total batch slots and CPUs: one actor with all the slots and threads, or
    two actors with half each. On 2 cores the second actor can only split the same compute; a
    node with more cores (or GPUs) is where it adds throughput."""
    pairs = mbxp_prompts(args.limit)
    corpus = write_corpus(args.work_dir / "mbxp.jsonl", ({"id": tid, "prompt": p} for tid, p in pairs))
    start_ray(max(4, int(args.threads) + 2))
    guard = None if args.guard == "none" else args.guard
    rows = []
    for num_actors in (1, 2):
        slots = args.total_slots // num_actors
        job, _ = run_ray_job(args, guard, corpus, args.work_dir / f"out-{num_actors}", min_actors=num_actors,
                             max_actors=num_actors, max_num_seqs=slots,
                             batch_size=max(1, args.batch_size // num_actors),
                             num_cpus_per_actor=args.threads / num_actors)
        rows.append({"run": f"{num_actors} actor(s) x {slots} slots, {args.threads / num_actors:g} CPUs each", **job})
        print(f"[done] {json.dumps(rows[-1])}", flush=True)
    lines = [f"model={args.model} guard={guard} prompts={len(pairs)} max_new_tokens={args.max_new_tokens}"
             f" total slots={args.total_slots} total CPUs={args.threads} (this machine: {os.cpu_count()} cores)",
             "", *table(rows)]
    ratio = rows[1]["rows_per_s"] / rows[0]["rows_per_s"]
    return finish(lines, rows, [f"2 actors vs 1 at the same total slots: {ratio:.2f}x the rows/s"])


# ---- memory: the driver's peak RSS is flat in the corpus size ----------------------------------
def job_command(corpus: Path, output: Path, args, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.generate", "--input", str(corpus), "--output", str(output),
            "--model", args.model, "--guard", "none", "--dtype", "float32",
            "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
            "--max-num-seqs", str(args.max_num_seqs), "--progress-interval", "30", *extra]


def run_job_process(command: list[str], env: dict) -> tuple[dict, str]:
    """A job in its own driver process; returns its SUMMARY and its log."""
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"job failed ({done.returncode}):\n{log[-3000:]}")
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("SUMMARY "))[8:])
    return summary, log


def driver_env(address: str) -> dict:
    from scripts.ray_local import RAY_LOCAL_ENV

    return {**os.environ, **RAY_LOCAL_ENV, "PYTHONPATH": str(REPO_ROOT), "RAY_ADDRESS": address}


def memory(args) -> dict:
    """Each corpus size in its own driver process joined to one Ray started here, so the figure
    is the driver's own peak RSS (its `ru_maxrss`, reported in the job's summary), not Ray's."""
    address = start_ray(4)
    rows = []
    for num_rows in args.rows:
        corpus = write_corpus(args.work_dir / f"short-{num_rows}.jsonl",
                              ({"id": i, "prompt": f"x = {i}\n"} for i in range(num_rows)))
        summary, _ = run_job_process(job_command(corpus, args.work_dir / f"out-{num_rows}", args,
                                                 "--min-rows-per-file", "10000"), driver_env(address))
        rows.append({"rows": num_rows, "driver_peak_rss_mib": summary["driver_peak_rss_mib"],
                     "wall_s": summary["wall_s"], "rows_per_s": summary["rows_per_s"],
                     "rows_written": summary["num_rows"]})
        print(f"[done] {json.dumps(rows[-1])}", flush=True)
    lines = [f"model={args.model} max_new_tokens={args.max_new_tokens} batch_size={args.batch_size}", "",
             "| corpus rows | rows written | driver peak RSS MiB | wall s | rows/s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rows']} | {r['rows_written']} | {r['driver_peak_rss_mib']} | {r['wall_s']}"
                     f" | {r['rows_per_s']} |")
    growth = rows[-1]["driver_peak_rss_mib"] / rows[0]["driver_peak_rss_mib"] - 1
    check = (f"driver peak RSS, {rows[-1]['rows']} vs {rows[0]['rows']} rows: {growth:+.1%}"
             f" (target flat, <= {MEMORY_GROWTH_TARGET:.0%}: {'ok' if growth <= MEMORY_GROWTH_TARGET else 'MISSED'})")
    return finish(lines, rows, [check])


# ---- resume: a killed driver, then the same command again --------------------------------------
def wait_for_files(output: Path, process: subprocess.Popen, min_files: int, timeout_s: float) -> float:
    start = time.perf_counter()
    while len(list(output.glob("*.parquet"))) < min_files:
        if process.poll() is not None or time.perf_counter() - start > timeout_s:
            raise RuntimeError(f"the job ended or stalled before writing {min_files} file(s)")
        time.sleep(0.05)
    return time.perf_counter() - start


def resume(args) -> dict:
    """A fresh run's time to its first committed file, against the same for the rerun after the
    driver was SIGKILLed midway (checkpoint load and filtering included), and the total times."""
    from jobs.output import read_output

    address = start_ray(4)
    env = driver_env(address)
    corpus = write_corpus(args.work_dir / "corpus.jsonl",
                          ({"id": i, "prompt": f"def f_{i}(x):\n    return x + {i}\n"} for i in range(args.rows)))
    output = args.work_dir / "out"
    command = job_command(corpus, output, args, "--min-rows-per-file", str(args.rows_per_file))
    start = time.perf_counter()
    job = subprocess.Popen(command, cwd=REPO_ROOT, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fresh_first_file_s = wait_for_files(output, job, 1, 600)
    wait_for_files(output, job, args.kill_after_files, 600)
    os.killpg(job.pid, signal.SIGKILL)  # the driver dies; Ray cancels its tasks and actors
    job.wait()
    killed_at_s = time.perf_counter() - start
    num_committed = read_output(output, ["id"]).num_rows
    num_files = len(list(output.glob("*.parquet")))
    rerun = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    rerun_start = time.perf_counter()
    rerun_first_file_s = wait_for_files(output, rerun, num_files + 1, 600)
    log = rerun.communicate()[0]
    rerun_total_s = time.perf_counter() - rerun_start
    if rerun.returncode != 0:
        raise RuntimeError(f"the rerun failed:\n{log[-3000:]}")
    summary = json.loads(next(line for line in log.splitlines() if line.startswith("SUMMARY "))[8:])
    loaded = re.search(r"Checkpoint loaded for \w+ in ([\d.]+) seconds", log)
    ids = read_output(output, ["id"]).column("id").to_pylist()
    result = {"rows": args.rows, "killed_after_s": round(killed_at_s, 1), "rows_committed_before_kill": num_committed,
              "fresh_first_file_s": round(fresh_first_file_s, 1), "rerun_first_new_file_s": round(rerun_first_file_s, 1),
              "rerun_checkpoint_load_s": float(loaded.group(1)) if loaded else None,
              "rerun_total_s": round(rerun_total_s, 1), "rerun_rows_written": summary["num_rows"],
              "is_exactly_once": len(ids) == len(set(ids)) == args.rows}
    print(f"\n{json.dumps(result)}")
    lines = ["| run | time to its first committed file s | total s | rows written |", "|---|---|---|---|",
             f"| fresh run (killed at {result['killed_after_s']} s) | {result['fresh_first_file_s']} | - |"
             f" {num_committed} |",
             f"| rerun after the kill | {result['rerun_first_new_file_s']} | {result['rerun_total_s']} |"
             f" {summary['num_rows']} |"]
    check = (f"resume: the rerun wrote its first new file {rerun_first_file_s - fresh_first_file_s:+.1f} s"
             f" later than a fresh run does ({rerun_first_file_s / fresh_first_file_s:.2f}x; checkpoint load"
             f" {result['rerun_checkpoint_load_s']} s); every id exactly once: {result['is_exactly_once']}")
    return finish(lines, [result], [check])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="figure", required=True)

    def add(name: str, help: str, *, model: str, max_new_tokens: int, batch_size: int, max_num_seqs: int):
        p = sub.add_parser(name, help=help)
        p.add_argument("--model", default=model)
        p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
        p.add_argument("--batch-size", type=int, default=batch_size)
        p.add_argument("--max-num-seqs", type=int, default=max_num_seqs)
        p.add_argument("--output-json", default=None)
        return p

    for name, help in (("overhead", "Ray Data job vs the direct engine"),
                       ("scaling", "1 vs 2 actors at the same total slots")):
        p = add(name, help, model="default", max_new_tokens=128, batch_size=16, max_num_seqs=8)
        p.add_argument("--guard", default="default", help="the guard of the 'with guard' runs ('none': off)")
        p.add_argument("--limit", type=int, default=500, help="number of MBXP prompts")
        p.add_argument("--dtype", default="auto")
        p.add_argument("--threads", type=float, default=float(os.cpu_count() or 2),
                       help="torch threads of the direct run = CPUs reserved per actor (split in scaling)")
        p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
        if name == "overhead":
            p.add_argument("--modes", default="guard,none", choices=["guard", "none", "guard,none"])
        else:
            p.add_argument("--total-slots", type=int, default=16)
    # Short prompts, one new token, big batches: what is measured is the job's own machinery.
    p = add("memory", "driver peak RSS vs corpus size (tiny model)", model="codefast/tiny-random",
            max_new_tokens=1, batch_size=512, max_num_seqs=64)
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    p = add("resume", "time to resume after the driver is killed", model="codefast/tiny-random",
            max_new_tokens=32, batch_size=16, max_num_seqs=8)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--rows-per-file", type=int, default=100)
    p.add_argument("--kill-after-files", type=int, default=3)
    args = parser.parse_args(argv)
    if args.figure in ("overhead", "scaling"):
        import torch

        args.device = "cuda" if args.num_gpus_per_actor > 0 else "cpu"
        torch.set_num_threads(max(1, int(args.threads)))
    args.work_dir = Path(tempfile.mkdtemp(prefix=f"batch_job_{args.figure}_"))
    try:
        result = {"overhead": overhead, "scaling": scaling, "memory": memory, "resume": resume}[args.figure](args)
    finally:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    write_report(f"batch_job_{args.figure}", result.pop("report"))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                      **result}, indent=2))


if __name__ == "__main__":
    main()
