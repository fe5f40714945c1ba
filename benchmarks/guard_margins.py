"""How much room the guard's policy thresholds leave, on labeled greedy completions.

For each committed `benchmarks.policy_sweep` cache named (`SPLIT.OFFSET.LIMIT`), the labeler cuts
every completion into expected code and excess, the guard scores every token, and this prints:
- done line ends (the expected code's last line end): how many also open a blank line, the
  share `StopPolicy.done_needs_blank_line` relies on;
- line starts: the mean p_stop over a line's first 1, 2 and 3 code tokens (what the line-start
  rule compares with its threshold), counted at thresholds for expected and for excess lines,
  and the highest means of expected lines (the ones a lower threshold would cut).

    python -m benchmarks.guard_margins --caches train.0.40,train.280.40,train.320.80
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from benchmarks.report import write_report
from engine import Engine, EngineConfig
from evals.line_starts import MAX_WINDOW, line_start_means
from evals.mbxp import load_problems, split_problems
from evals.scored_samples import add_replay_args, full_text, make_sample
from guard.syntax import LANGUAGES
from guard_training.features import done_ends_opening_blank_line, done_labels
from evals.labeler import find_cut, label_tokens

THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_replay_args(parser)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    engine = Engine.from_pretrained(args.model, guard=args.guard, config=EngineConfig(max_num_seqs=1))
    labeled, starts, num_skipped = [], [], 0
    for cache in args.caches.split(","):
        split, offset, limit = cache.split(".")
        for language in LANGUAGES:
            path = Path(args.cache_dir) / f"{cache}.{language}.json"
            ids = {row["task_id"]: row["ids"] for row in json.loads(path.read_text())}
            problems = split_problems(load_problems(language), split)[int(offset):int(offset) + int(limit)]
            for problem in tqdm(problems, desc=f"{cache} {language}"):
                sample = make_sample(engine, problem, ids[problem.task_id])
                completion = full_text(sample)
                cut = find_cut(language, problem.prompt, completion, problem.entry_point,
                               ends_at_eos=len(sample["ids"]) < args.max_new_tokens)
                if not cut.is_parseable:
                    num_skipped += 1
                    continue
                char_ends = [len(text) for text in sample["texts"]]
                labels = label_tokens(char_ends, cut.cut_char)
                labeled.append({"completion": completion, "char_ends": char_ends,
                                "done_labels": done_labels(completion, char_ends, labels, cut.cut_char)})
                starts += [(*row, language, problem.task_id) for row in line_start_means(sample, labels)]
    num_opening, num_done = done_ends_opening_blank_line(labeled)
    lines = [f"{len(labeled)} labeled completions ({num_skipped} unparseable skipped)",
             f"done line ends that open a blank line: {num_opening}/{num_done}",
             "\nline starts: lines whose mean p_stop over the first n code tokens is >= threshold",
             "lines     n  count  " + "  ".join(f">={t}" for t in THRESHOLDS)]
    for is_expected, name in ((True, "expected"), (False, "excess")):
        for n in range(1, MAX_WINDOW + 1):
            means = [row[0] for row in starts if row[1] == n and row[2] == is_expected]
            lines.append(f"{name:8s} {n:2d} {len(means):6d}  " + "  ".join(
                f"{sum(m >= t for m in means):{len(str(t)) + 2}d}" for t in THRESHOLDS))
    lines.append("\nhighest line-start means of expected lines:")
    for mean, n, _, text, language, task_id in sorted((r for r in starts if r[2]), reverse=True)[:args.top]:
        lines.append(f"  {mean:.3f}  n={n}  {language:10s} {task_id:10s} {text!r}")
    report = "\n".join(lines)
    print("\n" + report)
    # fixed-width columns: kept as printed, in a code block
    write_report("guard_margins", "```\n" + report + "\n```")

if __name__ == "__main__":
    main()
