"""The syntax gate, replayed: the shipped policy with and without it over the same greedy completions.

For each committed `benchmarks.policy_sweep` cache named (`SPLIT.OFFSET.LIMIT`), the guard scores
every token once (teacher-forced), and the guard's policy is replayed three ways
(`evals.replay.GUARD_VARIANTS`: no gate, the strict gate, the gate that lets a closed stub
through; `StopPolicy.syntax_gate`, the parser bound to the prompt and language as the engines
bind it). Per language it prints, for each: tokens generated, pass@1 (sandbox; the gated completions run
only where they differ), and the stops against the labeler's cut of the same completion (early /
exact / late, plus early stops whose kept code does not parse), then every early stop with the
line it cut at, and the gate's cost: parses and milliseconds per proposed stop.

Choose on held-out train prompts (the default caches: train prompts 0-39 and 280-399, none of
them trained on); `--caches test.0.100` reports on the test split and must not choose anything.

    python -m benchmarks.syntax_gate --caches train.0.40,train.280.40,train.320.80
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from benchmarks.report import write_report
from engine import Engine, EngineConfig
from evals.mbxp import load_problems
from evals.pass_at_k import evaluate
from evals.replay import GUARD_VARIANTS, guard_variants, replay_policy, replay_stop_words_method
from evals.scored_samples import add_replay_args, full_text, generated_samples
from evals.stop_errors import classify_stop
from guard.policy import StopPolicy
from guard.syntax import LANGUAGES, is_complete


def replay(sample: dict, prompt: str, language: str, policy: StopPolicy, parse_ms: list[float]):
    """(tokens generated, kept text, is_stopped) of one completion under `policy`."""
    texts = sample["texts"]

    def check(num_kept: int) -> bool:
        start = time.perf_counter()
        answer = is_complete(language, prompt, texts[num_kept - 1] if num_kept else "", policy.syntax_gate_allows_stub)
        parse_ms.append((time.perf_counter() - start) * 1e3)
        return answer

    stop = replay_policy(texts, sample["p_stop"], policy, sample.get("p_done"),
                         is_complete=check if policy.syntax_gate else None)
    if stop is None:
        return len(sample["ids"]), full_text(sample), False
    return stop[0], texts[stop[1] - 1] if stop[1] else "", True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_replay_args(parser)
    parser.add_argument("--max-lines", type=int, default=None, help="syntax_gate_max_lines (default: the policy's)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    engine = Engine.from_pretrained(args.model, guard=args.guard, config=EngineConfig(max_num_seqs=1))
    # The same three variants as benchmarks.full_split and models_table (no gate, strict, stubs pass), from the
    # guard's own policy, whatever gate it ships with.
    policies = guard_variants(engine.guard.policy)
    if args.max_lines is not None:
        policies = {name: replace(policy, syntax_gate_max_lines=args.max_lines) for name, policy in policies.items()}
    gated = policies["guard+gate"]
    summary, early_stops, parse_ms, num_gate_stops = {}, [], [], 0
    for language in LANGUAGES:
        problems = {p.task_id: p for p in load_problems(language)}
        rows = {variant: {} for variant in GUARD_VARIANTS}  # task_id -> (tokens, kept, is_stopped)
        samples = {}
        for cache in args.caches.split(","):
            split, offset, limit = cache.split(".")
            cache_args = argparse.Namespace(split=split, offset=int(offset), limit=int(limit),
                                            max_new_tokens=args.max_new_tokens)
            for sample in generated_samples(engine, language, cache_args, Path(args.cache_dir)):
                samples[sample["task_id"]] = sample
        for task_id, sample in samples.items():
            prompt = problems[task_id].prompt
            for variant, policy in policies.items():
                timings = parse_ms if variant == "guard+gate" else []
                rows[variant][task_id] = replay(sample, prompt, language, policy, timings)
            num_gate_stops += rows["guard+gate"][task_id][2] or rows["guard"][task_id][2]
        ungated = {t: kept for t, (_, kept, _) in rows["guard"].items()}
        passed = {"guard": {r.task_id: r.passed for r in evaluate(ungated, language)}}
        differing = {}
        for variant in GUARD_VARIANTS[1:]:
            differing[variant] = {t: kept for t, (_, kept, _) in rows[variant].items() if kept != ungated[t]}
            passed[variant] = {**passed["guard"], **{r.task_id: r.passed for r in (
                evaluate(differing[variant], language) if differing[variant] else [])}}
        # the stop words on the same completions, for reference (not a variant of the guard)
        words = {task_id: replay_stop_words_method(language, sample["texts"], len(sample["ids"]))
                 for task_id, sample in samples.items()}
        word_passed = {r.task_id: r.passed for r in evaluate({t: w[2] for t, w in words.items()}, language)}
        summary.setdefault("stop_words", {})[language] = {
            "num_prompts": len(words), "num_tokens": sum(w[0] for w in words.values()),
            "pass_at_1": sum(bool(word_passed.get(t)) for t in words) / len(words)}
        for variant in GUARD_VARIANTS:
            outcomes = Counter()
            for task_id, (num_tokens, kept, is_stopped) in rows[variant].items():
                sample, problem = samples[task_id], problems[task_id]
                full = full_text(sample)
                outcome = classify_stop(language, problem, full, kept,
                                        ends_at_eos=len(sample["ids"]) < args.max_new_tokens)
                outcomes[outcome] += 1
                if outcome == "early":
                    is_parseable = is_complete(language, problem.prompt, kept, allows_stub=True)  # a closed stub parses
                    outcomes["early, kept code does not parse"] += not is_parseable
                    cut_line = full[len(kept):].split("\n", 1)[0]
                    early_stops.append({"variant": variant, "language": language, "task_id": task_id,
                                        "kept_parses": is_parseable, "cut_line": cut_line,
                                        "last_kept_line": kept.rstrip("\n").rsplit("\n", 1)[-1]})
            summary.setdefault(variant, {})[language] = {
                "num_prompts": len(rows[variant]),
                "num_tokens": sum(n for n, _, _ in rows[variant].values()),
                "pass_at_1": sum(bool(passed[variant].get(t)) for t in rows[variant]) / len(rows[variant]),
                "num_changed_by_gate": len(differing.get(variant, ())),
                **outcomes}
    lines = [f"held-out caches {args.caches}; gate: syntax_gate_max_lines={gated.syntax_gate_max_lines}", ""]
    columns = ("num_prompts", "num_tokens", "pass_at_1", "early", "early, kept code does not parse", "exact",
               "late", "unlabeled", "num_changed_by_gate")
    lines.append("| variant | language | " + " | ".join(columns) + " |")
    lines.append("|---|---|" + "---|" * len(columns))
    for variant in ("stop_words", *GUARD_VARIANTS):
        for language, row in summary[variant].items():
            cells = [f"{row.get(c, 0):.3f}" if c == "pass_at_1" else str(row.get(c, 0)) for c in columns]
            lines.append(f"| {variant} | {language} | " + " | ".join(cells) + " |")
    lines.append("\nearly stops (the line the stop cut at):")
    for stop in early_stops:
        lines.append(f"- {stop['variant']:10s} {stop['language']:10s} {stop['task_id']:14s}"
                     f" parses={stop['kept_parses']!s:5s} after {stop['last_kept_line'].strip()[:50]!r}"
                     f" cut {stop['cut_line'].strip()[:60]!r}")
    costs = {"num_parses": len(parse_ms), "num_stops": num_gate_stops,
             "parses_per_stop": len(parse_ms) / max(1, num_gate_stops),
             "parse_ms_median": statistics.median(parse_ms) if parse_ms else 0.0,
             "parse_ms_p95": sorted(parse_ms)[int(0.95 * (len(parse_ms) - 1))] if parse_ms else 0.0}
    lines.append(f"\ngate cost: {costs['num_parses']} parses for {costs['num_stops']} stopped completions "
                 f"({costs['parses_per_stop']:.2f} per stop), {costs['parse_ms_median']:.3f} ms median, "
                 f"{costs['parse_ms_p95']:.3f} ms p95 per parse")
    report = "\n".join(lines)
    print("\n" + report)
    write_report("syntax_gate", report)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"summary": summary, "early_stops": early_stops,
                                                      "cost": costs}, indent=2))


if __name__ == "__main__":
    main()
