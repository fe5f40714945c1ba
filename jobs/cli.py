"""`codefast` command line.

    codefast demo [...]          # the product: a local Ray, a Ray Data job with and without
                                 # GenGuard, a table (jobs/demo.py; what `make demo` runs)
    python -m jobs.cli engine-demo [--model default] [--per-language 2] [--max-new-tokens 300]
                                 # the engine library alone, no Ray: per-task finish reasons
"""
from __future__ import annotations

import argparse
import sys
import time

from engine.config import EngineConfig
from engine.engine import Engine
from engine.params import SamplingParams
from evals.mbxp import load_problems, split_problems
from guard.syntax import LANGUAGES
from jobs.demo import main as job_demo


def demo(args: argparse.Namespace) -> None:
    problems = [p for lang in LANGUAGES
                for p in split_problems(load_problems(lang), "test")[:args.per_language]]
    print(f"loading {args.model} ...", flush=True)
    engine = Engine.from_pretrained(args.model, guard=args.guard,
                                    config=EngineConfig(max_num_seqs=args.max_num_seqs))
    guard_name = "none" if engine.guard is None else (engine.guard.model_name or "custom")
    print(f"model={engine.model_name} guard={guard_name} prompts={len(problems)}", flush=True)
    start = time.perf_counter()
    results = engine.generate([p.prompt for p in problems],
                              SamplingParams(max_new_tokens=args.max_new_tokens), use_tqdm=True)
    wall = time.perf_counter() - start
    print("\n| task | finish | generated | dropped | first line of completion |")
    print("|---|---|---|---|---|")
    for problem, result in zip(problems, results):
        first_line = next((ln.strip() for ln in result.text.splitlines() if ln.strip()), "")
        print(f"| {problem.task_id} | {result.finish_reason} | {result.num_generated_tokens}"
              f" | {result.num_dropped_tokens} | `{first_line[:50]}` |")
    num_generated = sum(r.num_generated_tokens for r in results)
    guard_stopped = [r for r in results if r.finish_reason == "guard"]
    # Tokens the guard saved are bounded above by what the length limit would have allowed.
    saved_bound = sum(args.max_new_tokens - r.num_generated_tokens for r in guard_stopped)
    print(f"\nprompts: {len(results)}  tokens generated: {num_generated}"
          f"  guard stops: {len(guard_stopped)}"
          f"  tokens cut by the guard (dropped excess line): {sum(r.num_dropped_tokens for r in results)}"
          f"  tokens not generated thanks to the guard (upper bound): {saved_bound}"
          f"  time: {wall:.1f}s  ({num_generated / wall:.1f} tok/s)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # its flags are jobs.demo's own
        raise SystemExit(job_demo(argv[1:]))
    parser = argparse.ArgumentParser(prog="codefast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the product demo: a local Ray and a Ray Data job (jobs/demo.py)")
    p_demo = sub.add_parser("engine-demo", help="the engine alone on a sample of MBXP prompts")
    p_demo.add_argument("--model", default="default")
    p_demo.add_argument("--guard", default="default", help="'default', 'none' or a guard folder")
    p_demo.add_argument("--per-language", type=int, default=2)
    p_demo.add_argument("--max-new-tokens", type=int, default=300)
    p_demo.add_argument("--max-num-seqs", type=int, default=8)
    args = parser.parse_args(argv)
    if getattr(args, "guard", None) == "none":
        args.guard = None
    {"engine-demo": demo}[args.command](args)


if __name__ == "__main__":
    main()
