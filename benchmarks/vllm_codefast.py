"""GenGuard inside vLLM vs vLLM's baseline, stop words and our own engine, side by side in one run.

    python -m benchmarks.vllm_codefast --limit 100 --max-num-seqs 16 --out reports/vllm_codefast

For each language of the MBXP test split (the first `--limit` test problems) and each method, in
one process: generated tokens, wall time, tok/s and pass@1 (sandboxed), for
  (a) vLLM baseline (EOS / max tokens), (b) vLLM + stop words, (c) vLLM + GenGuard,
  (d) vLLM + GenGuard + stop words, and (e) our engine + GenGuard;
one vLLM engine serves (a)-(d) (the guard is a per-request setting), then it is shut down and our
engine runs (e). Greedy, max 300 new tokens, the same slots for both engines.

It also checks, per problem:
- exactness: (c) stops exactly where the policy replay (`guard.policy.find_stop`) says over (a)'s
  completion, with the guard probabilities vLLM computed in (a) (run with the guard observing:
  it counts and traces its votes, never stops; what the processor costs per step:
  `benchmarks.vllm_processor_cost`), a completion whose greedy text or guard
  probabilities changed between the two runs counted apart; and over (c)'s own tokens and
  probabilities, which covers those too;
- agreement with our engine: (c)'s kept text against (e)'s, each difference classified.

Cells are saved as they finish (`--out`); a rerun reuses them.
"""
from __future__ import annotations

import argparse
import json
import time

from benchmarks.report import write_report
from evals.exactness import agreement, exactness, probabilities_changed, replay_expectations, self_replay
from evals.methods import method_params
from evals.pass_at_k import evaluate, pass_at_1
from evals.stop_words import finish_completion
from evals.vllm_trace import add_decoded_tokens, prepare_run
from guard.syntax import LANGUAGES

VLLM_METHODS = ("baseline", "stop_words", "guard", "guard+stop_words")
LABELS = {"baseline": "(a) vLLM baseline", "stop_words": "(b) vLLM + stop words",
          "guard": "(c) vLLM + GenGuard", "guard+stop_words": "(d) vLLM + GenGuard + stop words",
          "engine_guard": "(e) our engine + GenGuard"}


def run_cell(submit, language: str, method: str, problems, max_new_tokens: int, num_workers: int,
             observe: bool = False) -> dict:
    params = method_params(method.replace("engine_", ""), language, max_new_tokens)
    start = time.perf_counter()
    futures = [submit(p.prompt, params, observe) for p in problems]
    results = [future.result() for future in futures]
    wall = time.perf_counter() - start
    completions = {p.task_id: finish_completion(language, r.text, r.finish_reason == "stop")
                   for p, r in zip(problems, results)}
    executed = {e.task_id: e for e in evaluate(completions, language, num_workers=num_workers)}
    return {
        "language": language, "method": method, "num_problems": len(problems), "wall_s": wall,
        "num_generated_tokens": sum(r.num_generated_tokens for r in results),
        "pass_at_1": pass_at_1(list(executed.values())),
        "problems": [{"task_id": p.task_id, "completion": completions[p.task_id], "text": r.text,
                      "token_ids": list(r.token_ids), "finish_reason": r.finish_reason,
                      "guard_stop_index": r.guard_stop_index, "num_generated_tokens": r.num_generated_tokens,
                      "passed": executed[p.task_id].passed} for p, r in zip(problems, results)],
    }


def render(cells: dict, languages, checks: dict, args) -> str:
    """Tokens: the output's (each result's `num_generated_tokens`); decoded: what the engine
    decoded (`add_decoded_tokens`), the work the stop saved or not."""
    methods = list(VLLM_METHODS) + ["engine_guard"]
    lines = [f"default model, {args.limit} MBXP test problems per language, greedy, max_new_tokens"
             f" {args.max_new_tokens}, {args.max_num_seqs} slots\n",
             "| language | method | tokens | decoded | wall s | tok/s | pass@1 | time vs (a) | time vs (e) |",
             "|---|---|---|---|---|---|---|---|---|"]
    totals = {m: [0, 0, 0.0, 0.0] for m in methods}
    for language in languages:
        for method in methods:
            cell = cells.get((language, method))
            if cell is None:
                continue
            base, ours = cells.get((language, "baseline")), cells.get((language, "engine_guard"))
            decoded = cell.get("num_decoded_tokens")
            totals[method][0] += cell["num_generated_tokens"]
            totals[method][1] += decoded or 0
            totals[method][2] += cell["wall_s"]
            totals[method][3] += cell["pass_at_1"] * 100 / len(languages)
            ratios = (f" {base['wall_s'] / cell['wall_s']:.2f}x | {ours['wall_s'] / cell['wall_s']:.2f}x |"
                      if base and ours else " | |")
            lines.append(f"| {language} | {LABELS[method]} | {cell['num_generated_tokens']} | {decoded or '-'}"
                         f" | {cell['wall_s']:.0f} | {cell['num_generated_tokens'] / cell['wall_s']:.1f}"
                         f" | {cell['pass_at_1'] * 100:.1f} |{ratios}")
    lines.append("")
    lines.append("| all four | tokens | decoded | decoded vs (b) | wall s | mean pass@1 | time vs (a) | time vs (e) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for method in methods:
        tokens, decoded, wall, mean_pass = totals[method]
        if not wall:
            continue
        vs_stop_words = f"{decoded / totals['stop_words'][1]:.3f}x" if decoded and totals["stop_words"][1] else "-"
        lines.append(f"| {LABELS[method]} | {tokens} | {decoded or '-'} | {vs_stop_words} | {wall:.0f}"
                     f" | {mean_pass:.2f} | {totals['baseline'][2] / wall:.2f}x"
                     f" | {totals['engine_guard'][2] / wall:.2f}x |")
    lines.append("")
    for language, check in checks.items():
        exact, own = check["exactness"], check["self_replay"]
        lines.append(f"- {language}: stops as the replay over (a) says {exact['num_exact']}/{exact['num_problems']}"
                     f" ({exact['num_diverged']} whose greedy text changed between runs,"
                     f" {exact.get('num_probs_changed', 0)} whose guard probabilities changed, same tokens;"
                     f" {len(exact['mismatches'])} other); as the replay over"
                     f" its own tokens says {own['num_exact']}/{own['num_problems']};"
                     f" vs our engine: {check['agreement']['counts']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--languages", nargs="+", default=list(LANGUAGES))
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2, help="sandbox processes")
    parser.add_argument("--out", default="reports/vllm_codefast")
    args = parser.parse_args(argv)

    out, trace_dir, problems = prepare_run(args)

    def cell_path(language, method):
        return out / "cells" / f"{language}.{method}.json"

    def load(language, method):
        path = cell_path(language, method)
        return json.loads(path.read_text()) if path.is_file() else None

    cells = {(lang, m): load(lang, m) for lang in args.languages for m in list(VLLM_METHODS) + ["engine_guard"]}
    cells = {k: v for k, v in cells.items() if v is not None}
    todo_vllm = [(lang, m) for lang in args.languages for m in VLLM_METHODS if (lang, m) not in cells]
    if todo_vllm:
        from backends import BackendSpec, build_backend

        backend = build_backend(BackendSpec(backend="vllm", max_num_seqs=args.max_num_seqs))
        try:
            for language, method in todo_vllm:
                print(f"[vllm] {language} {method}", flush=True)
                cell = run_cell(lambda p, sp, obs: backend.submit(p, sp, observe_guard=obs), language, method,
                                problems[language], args.max_new_tokens, args.num_workers,
                                observe=method == "baseline")
                add_decoded_tokens(backend, cell, problems[language], trace_dir, args.max_new_tokens)
                cell_path(language, method).write_text(json.dumps(cell))
                cells[(language, method)] = cell
        finally:
            backend.shutdown()
    todo_engine = [lang for lang in args.languages if (lang, "engine_guard") not in cells]
    if todo_engine:
        from backends import BackendSpec, build_backend

        backend = build_backend(BackendSpec(backend="codefast", max_num_seqs=args.max_num_seqs))
        try:
            for language in todo_engine:
                print(f"[engine] {language} guard", flush=True)
                cell = run_cell(lambda p, sp, obs: backend.submit(p, sp), language, "engine_guard",
                                problems[language], args.max_new_tokens, args.num_workers)
                # Our engine counts every decode step, the one whose token the guard stopped on too.
                cell["num_decoded_tokens"] = cell["num_generated_tokens"]
                cell_path(language, "engine_guard").write_text(json.dumps(cell))
                cells[(language, "engine_guard")] = cell
        finally:
            backend.shutdown()

    from transformers import AutoTokenizer

    from guard.export import GuardExport, export_folder_for
    from guard.vllm_processor import read_trace

    folder = export_folder_for("default", "default")
    export, tokenizer = GuardExport.load(folder), AutoTokenizer.from_pretrained(folder)
    traces, guard_traces = read_trace(trace_dir), read_trace(trace_dir, mode="on")
    checks = {}
    for language in args.languages:
        expectations = replay_expectations(cells[(language, "baseline")], problems[language], tokenizer, export, traces)
        checks[language] = {
            "exactness": exactness(expectations, cells[(language, "guard")], cells[(language, "baseline")],
                                   probabilities_changed(problems[language], tokenizer, traces, guard_traces,
                                                         cells[(language, "guard")])),
            "self_replay": self_replay(cells[(language, "guard")], problems[language], tokenizer, export,
                                       guard_traces, args.max_new_tokens),
            "agreement": agreement(cells[(language, "guard")], cells[(language, "engine_guard")]),
        }
    (out / "checks.json").write_text(json.dumps(checks, indent=2))
    report = render(cells, args.languages, checks, args)
    write_report("vllm_codefast", report, folder=out)
    print(report)


if __name__ == "__main__":
    main()
