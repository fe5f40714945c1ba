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
  it counts and traces its votes, never stops; the processor's cost is a fraction of a percent
  of a step, `benchmarks.vllm_processor_cost`), a completion whose greedy text or guard
  probabilities changed between the two runs counted apart; and over (c)'s own tokens and
  probabilities, which covers those too;
- agreement with our engine: (c)'s kept text against (e)'s, each difference classified.

Cells are saved as they finish (`--out`); a rerun reuses them.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.codefast import LANGUAGES, method_params
from benchmarks.stop_words import finish_completion
from engine import SamplingParams
from evals.mbxp import load_problems, split_problems
from evals.pass_at_k import evaluate, pass_at_1

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


def trace_key(tokenizer, prompt: str, stop=()) -> str | None:
    """The key of a prompt's records in the processor's trace (`guard.vllm_processor.prompt_key`)."""
    from guard.vllm_processor import prompt_key

    return prompt_key(tokenizer(prompt, add_special_tokens=False)["input_ids"], stop)


# The guard mode each vLLM method's requests run in, as the processor's decode records name it.
TRACE_MODES = {"baseline": "observe", "stop_words": "off", "guard": "on", "guard+stop_words": "on"}


def add_decoded_tokens(backend, cell: dict, problems, trace_dir: Path, max_new_tokens: int) -> None:
    """Adds to a vLLM cell the tokens vLLM's engine decoded, per problem and in all, from the
    processor's decode records. They differ from the output's tokens where a stop string ended the
    request: vLLM matches stop strings in its front end, and the engine decodes on until the
    front end's abort reaches it. A guard stop is an EOS the engine's own scheduler sees in the
    step that samples it. One tiny request runs first, because vLLM hands the processor the
    batch's removals (the records) at the engine's next step."""
    from guard.vllm_processor import read_decoded

    backend.submit("#", SamplingParams(max_new_tokens=1, use_guard=False)).result(timeout=600)
    decoded = read_decoded(trace_dir)
    method = cell["method"]
    stop = method_params(method, cell["language"], max_new_tokens).stop
    for problem, row in zip(problems, cell["problems"]):
        key = (trace_key(backend.tokenizer, problem.prompt, stop), TRACE_MODES[method])
        if key not in decoded:
            raise RuntimeError(f"no decode record for {problem.task_id} ({method}) in {trace_dir}")
        row["num_decoded_tokens"] = decoded[key]
    cell["num_decoded_tokens"] = sum(row["num_decoded_tokens"] for row in cell["problems"])


def replay_expectations(baseline_cell: dict, problems, tokenizer, export, traces) -> list:
    """Per problem: what the policy replay says over (a)'s completion, with vLLM's probabilities:
    (stop index, kept tokens), or None for no stop."""
    from guard.policy import find_stop
    from guard.syntax import gate_check

    expectations = []
    for problem, row in zip(problems, baseline_cell["problems"]):
        p_stops, p_dones, _ = traces[trace_key(tokenizer, problem.prompt)]
        token_ids = row["token_ids"]
        texts = [tokenizer.decode([t]) for t in token_ids]
        n = len(token_ids)
        if len(p_stops) < n:
            raise RuntimeError(f"{problem.task_id}: the trace has {len(p_stops)} positions for {n} tokens")
        check = gate_check(export.policy, problem.language, problem.prompt,
                           lambda k, ids=token_ids: tokenizer.decode(ids[:k], skip_special_tokens=True))
        expectations.append(find_stop(p_stops[:n], texts, export.policy, p_dones[:n] if export.done_row else None,
                                      is_complete=check))
    return expectations


def probabilities_changed(problems, tokenizer, traces, guard_traces, guard_cell: dict) -> list[bool]:
    """Per problem: did the guard probabilities vLLM computed for (c)'s tokens differ from those it
    computed for the same positions in (a)? (Same logits give the same float64 probabilities;
    another batch layout's bf16 sums give others, here as for the greedy text.)"""
    changed = []
    for problem, row in zip(problems, guard_cell["problems"]):
        key = trace_key(tokenizer, problem.prompt)
        (a_stop, a_done, _), (c_stop, c_done, _) = traces[key], guard_traces[key]
        last = row["guard_stop_index"] if row.get("guard_stop_index") is not None else len(row["token_ids"])
        n = min(len(a_stop), len(c_stop), last + 1)
        changed.append(a_stop[:n] != c_stop[:n] or a_done[:n] != c_done[:n])
    return changed


def exactness(expectations: list, guard_cell: dict, baseline_cell: dict, changed: list[bool] | None = None) -> dict:
    """(c) against the replay: a match is the same stop index and the same number of kept tokens
    (or no stop in both). The replay's input is (a)'s run, so two cases are counted apart, as
    vLLM's own nondeterminism between the two runs (other batches, other bf16 roundings): a (c)
    completion that is not a prefix of (a)'s (the greedy text changed), and, with `changed`
    (`probabilities_changed`), one whose guard probabilities changed though its tokens did not.
    Anything else is a mismatch: the processor did not do what the policy says. Also counted: the
    completions whose replay input was (c)'s own, same tokens and (with `changed`) probabilities."""
    matches, mismatches, diverged, probs_changed, same_input = 0, [], 0, 0, 0
    changed = changed or [False] * len(expectations)
    for expected, row, base, is_changed in zip(expectations, guard_cell["problems"], baseline_cell["problems"],
                                               changed):
        is_prefix = base["token_ids"][:len(row["token_ids"])] == row["token_ids"]
        same_input += is_prefix and not is_changed
        got = ((row["guard_stop_index"], len(row["token_ids"])) if row["finish_reason"] == "guard" else None)
        if got == expected:
            matches += 1
        elif not is_prefix:
            diverged += 1
        elif is_changed:
            probs_changed += 1
        else:
            mismatches.append({"task_id": row["task_id"], "expected": expected, "got": got,
                               "finish_reason": row["finish_reason"]})
    return {"num_problems": len(expectations), "num_exact": matches, "num_diverged": diverged,
            "num_probs_changed": probs_changed, "num_same_input": same_input, "mismatches": mismatches}


def self_replay(guard_cell: dict, problems, tokenizer, export, guard_traces, max_new_tokens: int) -> dict:
    """(c) against the replay over its own emitted tokens and its own probabilities (the guarded
    requests' trace): identical input by construction, so every stop must match. A stop decided
    before its token was emitted has no token there; any code token decides alike ("x")."""
    from guard.policy import find_stop
    from guard.syntax import gate_check

    matches, mismatches = 0, []
    for problem, row in zip(problems, guard_cell["problems"]):
        p_stops, p_dones, emitted = guard_traces[trace_key(tokenizer, problem.prompt)]
        texts = [tokenizer.decode([t]) for t in emitted]
        if row["finish_reason"] == "guard":
            stop = row["guard_stop_index"]
            texts = (texts + ["x"])[:stop + 1]  # "x": the code token a pre-decided stop replaced
            got = (stop, len(row["token_ids"]))
        else:
            texts, got = texts[:max_new_tokens], None
        check = gate_check(export.policy, problem.language, problem.prompt,
                           lambda k, ids=emitted: tokenizer.decode(ids[:k], skip_special_tokens=True))
        expected = find_stop(p_stops[:len(texts)], texts, export.policy,
                             p_dones[:len(texts)] if export.done_row is not None else None, is_complete=check)
        if expected == got:
            matches += 1
        else:
            mismatches.append({"task_id": row["task_id"], "expected": expected, "got": got})
    return {"num_problems": len(guard_cell["problems"]), "num_exact": matches, "mismatches": mismatches}


def agreement(vllm_cell: dict, engine_cell: dict) -> dict:
    """(c)'s kept text against (e)'s: equal, or one of
    - `diverged`: neither is a prefix of the other (the engines' greedy text differs before the stop),
    - `vllm_stopped_earlier` / `engine_stopped_earlier`: the same text up to the earlier stop."""
    counts = {"equal": 0, "diverged": 0, "vllm_stopped_earlier": 0, "engine_stopped_earlier": 0}
    examples = []
    for ours, theirs in zip(vllm_cell["problems"], engine_cell["problems"]):
        v, e = ours["text"], theirs["text"]
        if v == e:
            kind = "equal"
        elif e.startswith(v):
            kind = "vllm_stopped_earlier"
        elif v.startswith(e):
            kind = "engine_stopped_earlier"
        else:
            kind = "diverged"
        counts[kind] += 1
        if kind != "equal" and len(examples) < 20:
            examples.append({"task_id": ours["task_id"], "kind": kind, "vllm": v[-160:], "engine": e[-160:]})
    return {"counts": counts, "examples": examples}


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


def prepare_run(args, offset: int = 0) -> tuple[Path, Path, dict]:
    """The run's folder (`cells/` made), the processor's trace folder (set for the engine to
    read: call before vLLM starts) and `--limit` test problems per language from `offset`."""
    from guard.vllm_processor import TRACE_DIR_ENV

    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    trace_dir = out / "trace"
    os.environ[TRACE_DIR_ENV] = str(trace_dir.resolve())
    problems = {lang: split_problems(load_problems(lang), "test")[offset:offset + args.limit]
                for lang in args.languages}
    return out, trace_dir, problems


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
    (out / "report.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
