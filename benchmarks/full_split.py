"""A whole MBXP split per language on the vLLM backend, resumable, every method replayed on one run.

    python -m benchmarks.full_split --split test --limit 500 --out reports/full_split

1. Generate (vLLM, greedy, max 300 new tokens, no stop rule): each prompt once, with the guard
   observing (the logits processor counts and traces its votes, never stops). Prompts go in
   chunks of `--chunk`; each finished chunk is saved (gzipped JSON, small enough to commit) with
   its token ids and the guard's p_stop / p_done at every position, so a killed run resumes at
   the first missing chunk, and the replay never needs the model.
2. Replay, over those same completions: the stop words, GenGuard, GenGuard + the syntax gate, and
   each with stop words, exactly as the engines apply them (`evals.split_replay`; vLLM +
   GenGuard stops where this replay says: `benchmarks.vllm_codefast`'s exactness check).
   pass@1 runs in the sandbox once per distinct text of a problem (cached in `--out`, resumable
   too); stops are classed against the labeler's cut of the same completion, and every early
   stop is listed with the line it cut.

Generating once and replaying makes the methods differ only by their stops (no greedy text that
changed between two runs) and costs one generation instead of five. No choice is made here: the
policy is the shipped guard's, chosen on held-out train prompts.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.report import write_report
from evals.mbxp import load_problems, split_problems
from evals.methods import method_params
from evals.split_replay import METHODS, chunk_path, replay
from guard.syntax import LANGUAGES


# ---- 1. generation -------------------------------------------------------------------------------
def generate(args, out: Path, problems: dict) -> None:
    todo = [(language, start) for language in args.languages
            for start in range(0, len(problems[language]), args.chunk)
            if not chunk_path(out, language, args.offset + start,
                              args.offset + min(start + args.chunk, len(problems[language]))).exists()]
    if not todo:
        return
    trace_dir = out / "trace"
    trace_dir.mkdir(parents=True, exist_ok=True)
    for stale in trace_dir.glob("trace-*.jsonl"):  # a killed run's records: its chunk is redone
        stale.unlink()
    os.environ["CODEFAST_GUARD_TRACE_DIR"] = str(trace_dir.resolve())  # before vLLM starts
    from transformers import AutoTokenizer

    from backends import BackendSpec, build_backend
    from backends.protocol import PromptError
    from evals.vllm_trace import trace_key
    from guard.export import export_folder_for
    from guard.vllm_processor import read_trace

    tokenizer = AutoTokenizer.from_pretrained(export_folder_for(args.model, args.guard))
    backend = build_backend(BackendSpec(backend="vllm", model=args.model, guard=args.guard,
                                        max_num_seqs=args.max_num_seqs))
    try:
        for language, start in todo:
            chunk = problems[language][start:start + args.chunk]
            path = chunk_path(out, language, args.offset + start, args.offset + start + len(chunk))
            params = method_params("baseline", language, args.max_new_tokens)
            began = time.perf_counter()
            futures = []
            for problem in chunk:
                try:
                    futures.append(backend.submit(problem.prompt, params, observe_guard=True))
                except PromptError as error:  # e.g. longer than the model's context: not served
                    futures.append(error)
            results = [f if isinstance(f, PromptError) else f.result() for f in futures]
            wall_s = time.perf_counter() - began
            traces = read_trace(trace_dir)
            rows = []
            for problem, result in zip(chunk, results):
                if isinstance(result, PromptError) or result.finish_reason == "error":
                    rows.append({"task_id": problem.task_id, "error": str(result) if isinstance(
                        result, PromptError) else result.error})
                    continue
                p_stops, p_dones, _ = traces[trace_key(tokenizer, problem.prompt)]
                n = len(result.token_ids)
                rows.append({"task_id": problem.task_id, "token_ids": list(result.token_ids),
                             "finish_reason": result.finish_reason,
                             # the guard's observing asks vLLM for one step past the cap
                             # (backends/vllm.py); the baseline is the capped run
                             "num_generated_tokens": min(result.num_generated_tokens, args.max_new_tokens),
                             "p_stop": [round(p, 6) for p in p_stops[:n]],
                             "p_done": [round(p, 6) for p in p_dones[:n]]})
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(gzip.compress(json.dumps({"wall_s": wall_s, "rows": rows}).encode()))
            tmp.replace(path)  # whole or absent: a kill mid-write leaves no half chunk
            for trace in trace_dir.glob("trace-*.jsonl"):  # done with: the processor appends anew
                os.truncate(trace, 0)
            num_tokens = sum(r.get("num_generated_tokens", 0) for r in rows)
            print(f"[generate] {path.name}: {num_tokens} tokens in {wall_s:.0f} s", flush=True)
    finally:
        backend.shutdown()


# ---- 2. replay (evals.split_replay): the report -----------------------------------------------------
def render(report: dict, args) -> str:
    summary = report["summary"]
    languages = [lang for lang in args.languages if lang in summary.get("baseline", {})]
    lines = [f"# MBXP {args.split} problems {args.offset}-{args.offset + args.limit - 1} per language, "
             "one vLLM greedy run, methods replayed", "",
             f"`python -m benchmarks.full_split {' '.join(sys.argv[1:])}`"
             + (f"; prompts the model could not serve (left out): {summary['num_unserved']}"
                if summary.get("num_unserved") else ""), "",
             "| method | " + " | ".join(f"{lang} tokens | {lang} pass@1" for lang in languages)
             + " | all tokens | mean pass@1 |",
             "|---|" + "---|---|" * len(languages) + "---|---|"]
    for method in METHODS:
        cells = summary[method]
        row = [f"{cells[lang]['num_tokens']:,} | {cells[lang]['pass_at_1'] * 100:.1f}" for lang in languages]
        total = sum(cells[lang]["num_tokens"] for lang in languages)
        mean = sum(cells[lang]["pass_at_1"] for lang in languages) / len(languages)
        label = f"**{method}** (the shipped policy)" if method == report.get("shipped") else method
        lines.append(f"| {label} | " + " | ".join(row) + f" | {total:,} | {mean * 100:.2f} |")
    lines += ["", "Stops against the labeler's cut (early / of which the kept code does not parse / exact / late /"
              " no stop label):", "", "| method | language | problems | early | early, unparseable | exact | late | unlabeled |",
              "|---|---|---|---|---|---|---|---|"]
    for method in METHODS[1:]:
        for lang in languages:
            c = summary[method][lang]
            lines.append(f"| {method} | {lang} | {c['num_problems']} | {c.get('early', 0)} | "
                         f"{c.get('early_unparseable', 0)} | {c.get('exact', 0)} | {c.get('late', 0)} | "
                         f"{c.get('unlabeled', 0)} |")
    cost = report["gate_cost"]
    lines += ["", f"Syntax gate (both variants): {cost['num_parses']} parses, {cost['parse_ms_median']:.3f} ms median, "
              f"{cost['parse_ms_p95']:.3f} ms p95 per parse.", "", "Early stops (GenGuard, with and without the gate):", ""]
    for stop in report["early_stops"]:
        lines.append(f"- {stop['method']} {stop['language']} {stop['task_id']}: after `{stop['last_kept_line'][:60]}`"
                     f" cut `{stop['cut_line'][:60]}`" + ("" if stop["kept_parses"] else " (kept code does not parse)"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--languages", nargs="+", default=list(LANGUAGES))
    parser.add_argument("--chunk", type=int, default=50, help="prompts per saved chunk (the resume unit)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--guard", default="default")
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2, help="sandbox processes")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--replay-only", action="store_true", help="replay what is generated so far")
    parser.add_argument("--out", default="reports/full_split")
    args = parser.parse_args(argv)
    out = Path(args.out)
    problems = {lang: split_problems(load_problems(lang), args.split)[args.offset:args.offset + args.limit]
                for lang in args.languages}
    if not args.replay_only:
        generate(args, out, problems)
    if args.generate_only:
        return
    report = replay(args, out, problems)
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    write_report("full_split", render(report, args), folder=out)
    print(render(report, args))


if __name__ == "__main__":
    main()
