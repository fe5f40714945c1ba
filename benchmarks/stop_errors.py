"""Where GenGuard stopped on the test split, against the labeler's cut of the same greedy output.

The baseline (a) and GenGuard (c) cells of `benchmarks.codefast` decode the same prompts greedily,
so a guard completion is a prefix of the baseline one, and the labeler's cut of the baseline
completion is where a perfect stop would have ended it. Per language, how many guard stops were
early, exact, late, diverged or unparseable (`evals.stop_errors`).

    python -m benchmarks.stop_errors --cells reports/codefast/cells
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from benchmarks.report import write_report
from evals.stop_errors import OUTCOMES, stop_errors


def render(counts_by_language: dict[str, Counter]) -> str:
    lines = ["| language | " + " | ".join(OUTCOMES) + " |", "|---|" + "---|" * len(OUTCOMES)]
    for language, counts in counts_by_language.items():
        lines.append(f"| {language} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="reports/codefast/cells")
    args = parser.parse_args(argv)
    cells = Path(args.cells)
    counts_by_language = {}
    for baseline_path in sorted(cells.glob("*.baseline.json")):
        language = baseline_path.name.split(".")[0]
        guard_path = cells / f"{language}.guard.json"
        if guard_path.exists():
            counts_by_language[language] = stop_errors(language, json.loads(baseline_path.read_text()),
                                                       json.loads(guard_path.read_text()))
    report = render(counts_by_language)
    write_report("stop_errors", report)
    print(report)


if __name__ == "__main__":
    main()
