"""Where GenGuard stopped on the test split, against the labeler's cut of the same greedy output.

The baseline (a) and GenGuard (c) cells of `benchmarks.codefast` decode the same prompts greedily,
so a guard completion is a prefix of the baseline one, and the labeler's cut of the baseline
completion is where a perfect stop would have ended it. Per language:
- early: the guard's text ends before the expected code does (it cut code the task needed);
- exact: it ends at the expected code (whitespace aside);
- late: it keeps some excess (a few extra lines: harmless for execution, costs tokens);
- diverged: the two runs' greedy texts differ (bf16 numerics of other batch layouts), not compared;
- unparseable: the labeler found no closed function in the baseline completion.

    python -m benchmarks.stop_errors --cells reports/codefast/cells
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from evals.mbxp import load_problems
from guard_training.labeler import find_cut, truncate

OUTCOMES = ("early", "exact", "late", "diverged", "unparseable")


def classify(language: str, prompt: str, entry_point: str, baseline: dict, guarded: dict) -> str:
    full, kept = baseline["completion"], guarded["completion"]
    if not full.startswith(kept.rstrip()):
        return "diverged"
    return against_cut(language, prompt, entry_point, full, kept, baseline["finish_reason"] == "eos")


def against_cut(language: str, prompt: str, entry_point: str, full: str, kept: str, ends_at_eos: bool) -> str:
    """early / exact / late: `kept` (a prefix of `full`) against the labeler's cut of `full`;
    "unparseable" when the labeler finds no cut."""
    cut = find_cut(language, prompt, full, entry_point, ends_at_eos=ends_at_eos)
    if not cut.is_parseable:
        return "unparseable"
    expected, kept = truncate(full, cut).rstrip(), kept.rstrip()
    if len(kept) < len(expected):
        return "early"
    return "exact" if len(kept) == len(expected) else "late"


def stop_errors(language: str, baseline_cell: dict, guard_cell: dict) -> Counter:
    problems = {p.task_id: p for p in load_problems(language)}
    guarded = {row["task_id"]: row for row in guard_cell["problems"]}
    counts = Counter()
    for row in baseline_cell["problems"]:
        if row["task_id"] in guarded:
            problem = problems[row["task_id"]]
            counts[classify(language, problem.prompt, problem.entry_point, row, guarded[row["task_id"]])] += 1
    return counts


def render(counts_by_language: dict[str, Counter]) -> str:
    lines = ["| language | " + " | ".join(OUTCOMES) + " |", "|---|" + "---|" * len(OUTCOMES)]
    for language, counts in counts_by_language.items():
        lines.append(f"| {language} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="reports/codefast/cells")
    args = parser.parse_args()
    cells = Path(args.cells)
    counts_by_language = {}
    for baseline_path in sorted(cells.glob("*.baseline.json")):
        language = baseline_path.name.split(".")[0]
        guard_path = cells / f"{language}.guard.json"
        if guard_path.exists():
            counts_by_language[language] = stop_errors(language, json.loads(baseline_path.read_text()),
                                                       json.loads(guard_path.read_text()))
    print(render(counts_by_language))


if __name__ == "__main__":
    main()
