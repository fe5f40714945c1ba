"""Replay GenGuard stop policies and the stop-word heuristic over the same greedy completions.

Greedy decoding is deterministic and a stop only ends a sequence, so a guarded run's output is a
prefix of the unguarded one. This tool generates each prompt once without any stop rule, scores
every generated token with the guard (one teacher-forced forward), then replays each policy on
those scores to find where it would have stopped: tokens generated and pass@1 (sandbox) per
policy, without regenerating. Use the train split to choose a policy, the test split to report.

    python -m benchmarks.policy_sweep --model default --split train --offset 40 --limit 30
    python -m benchmarks.policy_sweep --model default --from-cells reports/codefast/cells

The caches under `--out` (default `reports/policy_sweep/`, committed) keep token ids only.
`--from-cells` replays over the baseline (a) completions of a `benchmarks.codefast` run instead
of generating: the methods are then compared on identical text, free of the few greedy
completions that differ between separate runs (bf16 numerics of other batch layouts).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from benchmarks.report import write_report
from engine import Engine, EngineConfig
from evals.pass_at_k import evaluate, pass_at_1
from evals.replay import replay_methods
from evals.scored_samples import SWEEP_DIR, generated_samples, samples_from_cells
from guard.syntax import LANGUAGES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--guard", default="default")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--offset", type=int, default=40, help="skip the guard's own training prompts")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    # Committed: the caches are small (token ids) and slow to generate, so a later run replays at once.
    parser.add_argument("--out", default=SWEEP_DIR)
    parser.add_argument("--policies", default="", help="JSON list of StopPolicy overrides to replay")
    parser.add_argument("--from-cells", default=None,
                        help="replay over the baseline completions of a benchmarks.codefast run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine.from_pretrained(args.model, guard=args.guard,
                                    config=EngineConfig(max_num_seqs=args.max_num_seqs))
    base_policy = engine.guard.policy
    overrides = json.loads(args.policies) if args.policies else [{}]
    policies = {json.dumps(o, sort_keys=True): replace(base_policy, **o) for o in overrides}
    summary = {}
    for language in LANGUAGES:
        if args.from_cells:
            samples = samples_from_cells(engine, Path(args.from_cells), language)
        else:
            samples = generated_samples(engine, language, args, out)
        methods = replay_methods(samples, language, policies)
        for method, rows in methods.items():
            completions = {s["task_id"]: text for s, (_, text) in zip(samples, rows)}
            score = pass_at_1(evaluate(completions, language))
            tokens = sum(n for n, _ in rows)
            summary.setdefault(method, {})[language] = (tokens, score)
            print(f"{language:10s} {method:60s} tokens {tokens:6d}  pass@1 {score * 100:5.1f}", flush=True)
    lines = ["| method | tokens, all languages | mean pass@1 |", "|---|---|---|"]
    for method, per_language in summary.items():
        tokens = sum(t for t, _ in per_language.values())
        score = sum(s for _, s in per_language.values()) / len(per_language)
        lines.append(f"| {method} | {tokens} | {score * 100:.1f} |")
    print("\nall languages:\n" + "\n".join(lines))
    write_report("policy_sweep", "\n".join(lines), folder=out)


if __name__ == "__main__":
    main()
