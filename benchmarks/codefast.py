"""Baseline vs stop words vs GenGuard vs GenGuard + stop words, side by side in one run.

For each language of the MBXP test split (last 500 records per file) and each method: generated
tokens, wall time, throughput and pass@1 (sandboxed execution), plus speedups vs the baseline (a)
and vs the stop-word heuristic (b). Writes `report.md`, `chart.png` and per-problem jsonl.

    python -m benchmarks.codefast --model default --limit 100 --out reports/codefast

Each (language, method) cell is saved as soon as it is done; a rerun with the same --out reuses
finished cells.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.report import write_report
from engine import Engine, EngineConfig
from evals.mbxp import load_problems, split_problems
from evals.methods import method_params
from evals.pass_at_k import evaluate, pass_at_1
from evals.stop_words import finish_completion
from guard.syntax import LANGUAGES

METHODS = ("baseline", "stop_words", "guard", "guard+stop_words")
METHOD_LABELS = {"baseline": "(a) baseline: EOS / max tokens", "stop_words": "(b) stop words",
                 "guard": "(c) GenGuard", "guard+stop_words": "(d) GenGuard + stop words"}


def run_cell(engine: Engine, language: str, method: str, problems, max_new_tokens: int,
             num_workers: int) -> dict:
    params = method_params(method, language, max_new_tokens)
    start = time.perf_counter()
    results = engine.generate([p.prompt for p in problems], params, use_tqdm=True)
    wall = time.perf_counter() - start
    completions = {p.task_id: finish_completion(language, r.text, r.finish_reason == "stop")
                   for p, r in zip(problems, results)}
    executed = evaluate(completions, language, num_workers=num_workers)
    passed = {e.task_id: e.passed for e in executed}
    return {
        "language": language, "method": method, "num_problems": len(problems), "wall_s": wall,
        "num_generated_tokens": sum(r.num_generated_tokens for r in results),
        "pass_at_1": pass_at_1(executed),
        "finish_reasons": {reason: sum(r.finish_reason == reason for r in results)
                           for reason in {r.finish_reason for r in results}},
        "problems": [{"task_id": p.task_id, "completion": completions[p.task_id],
                      "finish_reason": r.finish_reason, "num_generated_tokens": r.num_generated_tokens,
                      "passed": passed.get(p.task_id, False)} for p, r in zip(problems, results)],
    }


def render_report(cells: dict, args) -> str:
    lines = [f"model `{args.model}`, {args.limit} test problems per language, max_new_tokens"
             f" {args.max_new_tokens}, batch slots {args.max_num_seqs}\n",
             "| language | method | tokens | wall s | tok/s | pass@1 | time speedup vs (a) | vs (b) | tokens vs (a) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for language in args.languages:
        row = {m: cells.get((language, m)) for m in METHODS}
        base, words = row["baseline"], row["stop_words"]
        for method, cell in row.items():
            if cell is None:
                continue
            vs_a = f"{base['wall_s'] / cell['wall_s']:.2f}x" if base else "-"
            vs_b = f"{words['wall_s'] / cell['wall_s']:.2f}x" if words else "-"
            tokens_vs_a = (f"{cell['num_generated_tokens'] / base['num_generated_tokens']:.0%}"
                           if base else "-")
            lines.append(f"| {language} | {METHOD_LABELS[method]} | {cell['num_generated_tokens']}"
                         f" | {cell['wall_s']:.0f} | {cell['num_generated_tokens'] / cell['wall_s']:.1f}"
                         f" | {cell['pass_at_1'] * 100:.1f} | {vs_a} | {vs_b} | {tokens_vs_a} |")
    return "\n".join(lines) + "\n"


def plot(cells: dict, languages, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        xs = [j + i * width for j in range(len(languages))]
        tokens = [cells.get((lang, method), {}).get("num_generated_tokens", 0) for lang in languages]
        walls = [cells.get((lang, method), {}).get("wall_s", 0) for lang in languages]
        axes[0].bar(xs, tokens, width, label=METHOD_LABELS[method])
        axes[1].bar(xs, walls, width, label=METHOD_LABELS[method])
    for ax, title in zip(axes, ("generated tokens", "wall time (s)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(languages))], languages)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--guard", default="default")
    parser.add_argument("--limit", type=int, default=100, help="test problems per language")
    parser.add_argument("--languages", default=",".join(LANGUAGES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2, help="sandbox workers")
    parser.add_argument("--out", default="reports/codefast")
    args = parser.parse_args()
    args.languages = [s for s in args.languages.split(",") if s]
    methods = [s for s in args.methods.split(",") if s]
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    engine = Engine.from_pretrained(args.model, guard=args.guard,
                                    config=EngineConfig(max_num_seqs=args.max_num_seqs))
    if engine.guard is None and any(m.startswith("guard") for m in methods):
        raise SystemExit(f"no GenGuard for {engine.model_name}: pass --guard DIR or build one")
    cells = {}
    for language in args.languages:
        problems = split_problems(load_problems(language), "test")[:args.limit]
        for method in methods:
            path = out / "cells" / f"{language}.{method}.json"
            if path.exists():
                cell = json.loads(path.read_text())
            else:
                print(f"== {language} / {method}", flush=True)
                cell = run_cell(engine, language, method, problems, args.max_new_tokens, args.num_workers)
                path.write_text(json.dumps(cell))
            cells[(language, method)] = cell
    report = render_report(cells, args)
    write_report("codefast", report, folder=out)
    plot(cells, args.languages, out / "chart.png")
    print(report)
    print(f"wrote {out / 'report.md'} and {out / 'chart.png'}")


if __name__ == "__main__":
    main()
