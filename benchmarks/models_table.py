"""One table across models: each model's shipped GenGuard on the same MBXP test problems.

    python -m benchmarks.models_table --limit 25 \
        --run default reports/full_split --run qwen2.5-coder-1.5b reports/full_split_1.5b

Each `--run MODEL OUT` names a `benchmarks.full_split` folder whose generations cover the first
`--limit` test problems per language (generate them there first). This replays them (no model
runs; sandbox results come from the folders' caches) and prints, per model: guard size,
training samples, tokens against the baseline and the stop words, pass@1 of each, and the early
stops (all, and those whose kept code does not parse) of the policy shipped with each guard, and
in a last column the other syntax-gate variants (none, strict, stubs pass). Nothing is chosen
here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.report import write_report
from evals.mbxp import load_problems, split_problems
from evals.replay import GUARD_VARIANTS
from evals.split_replay import replay
from guard.syntax import LANGUAGES

METHODS = ("baseline", "stop_words", *GUARD_VARIANTS)
# How the table names each variant of the syntax gate.
VARIANT_NAMES = {"guard": "no gate", "guard+gate": "strict gate", "guard+gate_stubs": "gate, stubs pass"}

# The paper's range (arXiv 2407.20042, abstract): GenGuard sped five Code LLMs (CodeLlama,
# StarCoder and others) up by 34% to 452% on MBPP/MBJSP/MBGP/MBCPP "without compromising the
# quality of generated code". Its per-model figures are not reproduced here.
PAPER_REFERENCE = ("paper (arXiv 2407.20042): five Code LLMs incl. CodeLlama and StarCoder, speed-up 1.34x-5.52x,"
                   " pass@1 not lowered")


def guard_facts(model: str) -> dict:
    """Size and training data of the guard shipped for `model`."""
    from guard.probe import GenGuard, shipped_guard_dir
    from models.packaged import find_packaged_model

    packaged = find_packaged_model(model)
    name = packaged.model_name if packaged else model
    guard_dir = shipped_guard_dir(name)
    if guard_dir is None:
        raise SystemExit(f"no guard shipped for {name}")
    guard = GenGuard.load(guard_dir)
    training = guard.metadata.get("training", {})
    return {"model_name": name, "hidden_size": guard.hidden_size,
            "num_guard_params": sum(p.numel() for p in guard.parameters()),
            "num_training_samples": sum(c.get("labeled", 0) for c in training.get("labeling", {}).values()),
            "num_train_tokens": training.get("num_train_tokens", 0),
            "sampling": guard.metadata.get("sampling", {}),
            "syntax_gate_max_lines": guard.policy.syntax_gate_max_lines}


def model_row(model: str, out: Path, args) -> dict:
    problems = {lang: split_problems(load_problems(lang), "test")[:args.limit] for lang in args.languages}
    replay_args = argparse.Namespace(model=model, guard="default", languages=args.languages, offset=0,
                                     limit=args.limit, num_workers=args.num_workers)
    report = replay(replay_args, out, problems)
    summary = report["summary"]
    totals = {}
    for method in METHODS:
        cells = [summary[method][lang] for lang in args.languages]
        if any(c["num_problems"] != args.limit for c in cells):
            raise SystemExit(f"{out}: not every language has {args.limit} served problems generated")
        totals[method] = {"num_tokens": sum(c["num_tokens"] for c in cells),
                          "pass_at_1": sum(c["pass_at_1"] for c in cells) / len(cells),
                          "num_early": sum(c.get("early", 0) for c in cells),
                          "num_early_unparseable": sum(c.get("early_unparseable", 0) for c in cells)}
    return {**guard_facts(model), "totals": totals, "shipped": report["shipped"],
            "per_language": {lang: {m: summary[m][lang] for m in METHODS}
                             for lang in args.languages}}


def render(rows: list[dict], args) -> str:
    lines = [f"MBXP test problems 0-{args.limit - 1} per language ({', '.join(args.languages)}), greedy, max 300"
             " tokens, vLLM; `python -m benchmarks.models_table " + " ".join(sys.argv[1:]) + "`", "",
             "| model | guard (params) | training samples (tokens) | shipped policy |"
             " tokens: baseline / stop words / GenGuard | GenGuard vs baseline | GenGuard vs stop words |"
             " pass@1: baseline / stop words / GenGuard | early stops (unparseable) |"
             " other gate variants: tokens vs stop words, pass@1, early (unparseable) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        t, shipped = row["totals"], row["shipped"]
        base, words, guard = (t[m]["num_tokens"] for m in ("baseline", "stop_words", shipped))
        policy = VARIANT_NAMES[shipped]
        if shipped != "guard" and row.get("syntax_gate_max_lines") is not None:  # the bound differs per guard
            policy += f", {row['syntax_gate_max_lines']}-line bound"
        others = "; ".join(
            f"{VARIANT_NAMES[v]}: {t[v]['num_tokens'] / words:.2f}x, {t[v]['pass_at_1'] * 100:.2f},"
            f" {t[v]['num_early']} ({t[v]['num_early_unparseable']})" for v in GUARD_VARIANTS if v != shipped)
        lines.append(
            f"| {row['model_name']} | Linear({row['hidden_size']}, 2+1) ({row['num_guard_params']:,}) |"
            f" {row['num_training_samples']:,} ({row['num_train_tokens']:,}) | {policy} |"
            f" {base:,} / {words:,} / {guard:,} | {guard / base:.2f}x | {guard / words:.2f}x |"
            f" {t['baseline']['pass_at_1'] * 100:.2f} / {t['stop_words']['pass_at_1'] * 100:.2f} /"
            f" {t[shipped]['pass_at_1'] * 100:.2f} | {t[shipped]['num_early']}"
            f" ({t[shipped]['num_early_unparseable']}) | {others} |")
    lines += ["", f"Reference: {PAPER_REFERENCE}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs=2, action="append", metavar=("MODEL", "OUT"), required=True,
                        help="a model and the benchmarks.full_split folder holding its generations")
    parser.add_argument("--limit", type=int, default=25, help="first test problems per language")
    parser.add_argument("--languages", nargs="+", default=list(LANGUAGES))
    parser.add_argument("--num-workers", type=int, default=2, help="sandbox processes")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = [model_row(model, Path(out), args) for model, out in args.run]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    report = render(rows, args)
    write_report("models_table", report)
    print(report)


if __name__ == "__main__":
    main()
