"""Check the labeler: truncating a completion at its cut must not lower pass@1.

Runs the sandboxed executor on the sampled (greedy) completions, full vs truncated at the cut,
per language, and counts the completions the labeler skipped.

    python -m guard_training.validate_labels --samples runs/guard-qwen/samples
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from evals.pass_at_k import evaluate, pass_at_1
from evals.labeler import find_cut, truncate
from guard_training.sampling import read_jsonl


def validate_language(samples: list[dict], language: str, num_workers: int) -> dict:
    greedy = [s for s in samples if s["temperature"] == 0.0]
    full, cut_only, skipped = {}, {}, 0
    for s in greedy:
        cut = find_cut(language, s["prompt"], s["completion"], s["entry_point"],
                       ends_at_eos=s["finish_reason"] == "eos")
        if not cut.is_parseable:
            skipped += 1
            continue
        full[s["task_id"]] = s["completion"]
        cut_only[s["task_id"]] = truncate(s["completion"], cut)
    full_results = evaluate(full, language, num_workers=num_workers)
    cut_results = evaluate(cut_only, language, num_workers=num_workers)
    return {"language": language, "num_completions": len(greedy), "num_skipped_unparseable": skipped,
            "pass_at_1_full": pass_at_1(full_results), "pass_at_1_truncated": pass_at_1(cut_results),
            "mean_chars_full": sum(map(len, full.values())) / max(len(full), 1),
            "mean_chars_truncated": sum(map(len, cut_only.values())) / max(len(cut_only), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="runs/guard-qwen/samples")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for path in sorted(Path(args.samples).glob("*.jsonl")):
        rows.append(validate_language(read_jsonl(path), path.stem, args.num_workers))
    print("| language | completions | skipped (unparseable) | pass@1 full | pass@1 truncated at cut | chars full → cut |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['language']} | {r['num_completions']} | {r['num_skipped_unparseable']}"
              f" | {r['pass_at_1_full'] * 100:.1f} | {r['pass_at_1_truncated'] * 100:.1f}"
              f" | {r['mean_chars_full']:.0f} → {r['mean_chars_truncated']:.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
