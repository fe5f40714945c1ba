"""Where a stop ended a completion, against the labeler's cut of the same greedy output.

The labeler's cut of an unstopped completion is where a perfect stop would have ended it:
- early: the kept text ends before the expected code does (it cut code the task needed);
- exact: it ends at the expected code (whitespace aside);
- late: it keeps some excess (a few extra lines: harmless for execution, costs tokens);
- diverged: the two runs' greedy texts differ (bf16 numerics of other batch layouts), not compared;
- unparseable: the labeler found no closed function in the unstopped completion.
"""
from __future__ import annotations

from collections import Counter

from evals.mbxp import load_problems
from evals.labeler import find_cut, truncate

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


def classify_stop(language: str, problem, full: str, kept: str, ends_at_eos: bool) -> str:
    """`against_cut` for a replayed stop, whose completion has no label when it has no cut."""
    outcome = against_cut(language, problem.prompt, problem.entry_point, full, kept, ends_at_eos)
    return "unlabeled" if outcome == "unparseable" else outcome


def stop_errors(language: str, baseline_cell: dict, guard_cell: dict) -> Counter:
    """Outcome counts of a `benchmarks.codefast` guard cell against its baseline cell."""
    problems = {p.task_id: p for p in load_problems(language)}
    guarded = {row["task_id"]: row for row in guard_cell["problems"]}
    counts = Counter()
    for row in baseline_cell["problems"]:
        if row["task_id"] in guarded:
            problem = problems[row["task_id"]]
            counts[classify(language, problem.prompt, problem.entry_point, row, guarded[row["task_id"]])] += 1
    return counts
