"""Exactness with the batch layout held fixed: vLLM + GenGuard against the policy replay.

    python -m benchmarks.vllm_exactness --limit 100 --out reports/vllm_exactness

`benchmarks.vllm_codefast` checks, at 16 slots, that the guarded run (c) stops where the policy
replay (`guard.policy.find_stop`) says over the unguarded run (a), with the guard probabilities
vLLM computed in (a). There some completions cannot be compared: vLLM's CPU kernels sum bf16 in
an order that depends on the batch's shape, so (c)'s greedy text or probabilities differ from
(a)'s before the stop, and the replay's input is not what (c) saw.

Here the layout cannot move: every request runs alone (`max_num_seqs` 1), in the same order in
both runs, and vLLM's prefix cache is emptied before each run (a cached prompt is prefilled in
other shapes), so (a) computes each completion as (c) did, and every difference is the
processor's:
1. (c) vLLM + GenGuard, greedy, max `--max-new-tokens` new tokens;
2. (a) the same prompts with the guard observing (it traces its probabilities, never stops), each
   capped at the tokens (c) decoded: through the step that sampled the guard's stop marker where
   the guard stopped (the policy decides from the tokens up to there, so the replay needs no
   more; a stop the replay over (a) would make later shows as no stop within the cap, a mismatch
   all the same), else as many as (c) ran. Each request then takes the same steps in both runs.
Per problem: replay over (a) == (c)'s (stop index, kept tokens), and whether (a)'s tokens and
probabilities equal (c)'s up to the stop (they must, or the layout still moved).

    python -m benchmarks.vllm_exactness --limit 5 --device-path --same-as reports/vllm_exactness \
        --out reports/vllm_exactness_device_path

`--device-path` runs the processor's GPU code path (logits as torch tensors) inside vLLM's CPU
engine; `--no-syntax-gate` runs the shipped guard with its syntax gate off (on a GPU, the path
whose votes live on the device); `--same-as DIR` also counts the problems whose guarded run (tokens, finish reason, stop
index) is identical to the same problem's in DIR, an earlier run of this benchmark (above, one
on the NumPy path: `--limit 25`, the default `--out`).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.report import write_report
from evals.exactness import exactness, probabilities_changed, replay_expectations, self_replay
from evals.fixed_layout import observe_cap, run, same_guarded_runs
from evals.methods import ungated_shipped_guard
from evals.vllm_trace import prepare_run
from guard.syntax import LANGUAGES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--offset", type=int, default=0, help="first test problem per language")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--languages", nargs="+", default=list(LANGUAGES))
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--out", default="reports/vllm_exactness")
    parser.add_argument("--device-path", action="store_true", help="the processor's GPU code path, on this CPU")
    parser.add_argument("--same-as", help="a run of the same problems to compare the guarded runs with")
    parser.add_argument("--no-syntax-gate", action="store_true", help="the shipped guard with its syntax gate off")
    args = parser.parse_args(argv)

    out, trace_dir, problems = prepare_run(args, args.offset)
    if args.device_path:
        from guard.vllm_processor import DEVICE_PATH_ENV

        os.environ[DEVICE_PATH_ENV] = "1"  # read by the processor in vLLM's engine-core process

    from backends import BackendSpec, build_backend
    from guard.export import GuardExport
    from guard.vllm_processor import read_trace

    guard = "default"
    if args.no_syntax_gate:
        from models.packaged import DEFAULT_MODEL_NAME

        guard = str(ungated_shipped_guard(DEFAULT_MODEL_NAME).save(out / "guard"))
    backend = build_backend(BackendSpec(backend="vllm", max_num_seqs=1, guard=guard))
    try:
        export, tokenizer = GuardExport.load(backend.folder), backend.tokenizer
        cells = {}
        for language in args.languages:
            path = out / "cells" / f"{language}.json"
            if path.is_file():  # a rerun reuses finished languages
                cells[language] = json.loads(path.read_text())
                continue
            print(f"[vllm, 1 slot] {language} guard", flush=True)
            guard = run(backend, problems[language], args.max_new_tokens)
            caps = [observe_cap(row) for row in guard["problems"]]
            print(f"[vllm, 1 slot] {language} observed, capped", flush=True)
            cells[language] = {"guard": guard, "observed": run(backend, problems[language], args.max_new_tokens, caps)}
            path.write_text(json.dumps(cells[language]))
    finally:
        backend.shutdown()
    traces, guard_traces = read_trace(trace_dir), read_trace(trace_dir, mode="on")
    checks = {}
    for language, runs in cells.items():
        language_problems = problems[language]
        expectations = replay_expectations(runs["observed"], language_problems, tokenizer, export, traces)
        changed = probabilities_changed(language_problems, tokenizer, traces, guard_traces, runs["guard"])
        checks[language] = {
            "exactness": exactness(expectations, runs["guard"], runs["observed"], changed),
            "self_replay": self_replay(runs["guard"], language_problems, tokenizer, export, guard_traces,
                                       args.max_new_tokens),
            "num_guard_stops": sum(r["finish_reason"] == "guard" for r in runs["guard"]["problems"]),
            "wall_s": {"guard": runs["guard"]["wall_s"], "observed": runs["observed"]["wall_s"]},
        }
    (out / "checks.json").write_text(json.dumps(checks, indent=2))
    lines = [f"vLLM + GenGuard vs the policy replay over vLLM's unguarded run, one slot, greedy, max"
             f" {args.max_new_tokens} new tokens, MBXP test problems"
             f" {args.offset}-{args.offset + args.limit - 1}", "",
             "| language | problems | guard stops | same tokens and probabilities in both runs | exact |"
             " greedy text changed | probabilities changed | mismatches | self-replay exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for language, check in checks.items():
        e, s = check["exactness"], check["self_replay"]
        lines.append(f"| {language} | {e['num_problems']} | {check['num_guard_stops']} |"
                     f" {e['num_same_input']} | {e['num_exact']} |"
                     f" {e['num_diverged']} | {e['num_probs_changed']} | {len(e['mismatches'])} | {s['num_exact']} |")
    total = {k: sum(c["exactness"][k] for c in checks.values()) for k in ("num_problems", "num_exact")}
    lines += ["", f"all: {total['num_exact']} of {total['num_problems']} exact"
                  + (" (the processor's GPU code path)" if args.device_path else "")]
    if args.same_as:
        num_same, num_compared = same_guarded_runs(cells, Path(args.same_as))
        lines.append(f"guarded runs identical to {args.same_as}'s: {num_same} of {num_compared}")
    write_report("vllm_exactness", "\n".join(lines), folder=out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
