"""Execute MBXP completions in the sandbox and compute pass@1 (one completion per problem).

    python -m evals.pass_at_k --completions completions.jsonl --out results.jsonl

Input rows: {"task_id", "language", "completion"}; a file may mix languages. Output: one row per
problem (status, passed, duration, stderr tail) and pass@1 per language printed as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from evals.mbxp import build_program, load_problems
from evals.sandbox import Job, Limits, run_many

STDERR_TAIL_CHARS = 2000  # enough to see the failing assert, small enough for big result files


@dataclass(frozen=True)
class ProblemResult:
    task_id: str
    language: str
    status: str
    passed: bool
    returncode: int | None
    duration_s: float
    stderr_tail: str


def evaluate(completions: dict[str, str], language: str, num_workers: int = 2,
             limits: Limits = Limits()) -> list[ProblemResult]:
    """Run each completion against its problem's tests; results follow the dataset order."""
    problems = {p.task_id: p for p in load_problems(language)}
    unknown = sorted(set(completions) - set(problems))
    if unknown:
        raise ValueError(f"{len(unknown)} task ids not in MBXP {language}: {unknown[:5]}")
    chosen = [p for p in problems.values() if p.task_id in completions]
    jobs = [Job(language, build_program(p, completions[p.task_id]), limits) for p in chosen]
    executed = run_many(jobs, num_workers)
    return [ProblemResult(p.task_id, language, r.status, r.passed, r.returncode, round(r.duration_s, 4),
                          r.stderr[-STDERR_TAIL_CHARS:]) for p, r in zip(chosen, executed)]


def pass_at_1(results: list[ProblemResult]) -> float:
    """With one completion per problem the unbiased pass@k estimator reduces to the pass rate."""
    if not results:
        raise ValueError("pass@1 of no results is undefined")
    task_ids = [r.task_id for r in results]
    if len(set(task_ids)) != len(task_ids):
        raise ValueError("pass@1 expects one result per problem")
    return sum(r.passed for r in results) / len(results)


def save_results(results: list[ProblemResult], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for result in results:
            f.write(json.dumps(asdict(result)) + "\n")


def load_results(path: str | Path) -> list[ProblemResult]:
    with Path(path).open() as f:
        return [ProblemResult(**json.loads(line)) for line in f if line.strip()]


def read_completions(path: str | Path) -> dict[str, dict[str, str]]:
    """language -> task_id -> completion; a task id twice is an error (pass@1 wants one sample)."""
    by_language: dict[str, dict[str, str]] = defaultdict(dict)
    with Path(path).open() as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            completions = by_language[row["language"]]
            if row["task_id"] in completions:
                raise ValueError(f"line {line_number}: duplicate task_id {row['task_id']}")
            completions[row["task_id"]] = row["completion"]
    return dict(by_language)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--completions", required=True, help="jsonl rows: task_id, language, completion")
    parser.add_argument("--out", required=True, help="per-problem results jsonl")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=Limits().timeout_s)
    args = parser.parse_args(argv)
    limits = Limits(timeout_s=args.timeout_s, cpu_s=max(1, int(args.timeout_s)))
    results, scores = [], {}
    for language, completions in sorted(read_completions(args.completions).items()):
        language_results = evaluate(completions, language, args.num_workers, limits)
        scores[language] = pass_at_1(language_results)
        results += language_results
    save_results(results, args.out)
    print(json.dumps({"pass@1": scores, "num_problems": len(results), "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
