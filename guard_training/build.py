"""`python -m guard_training build`: sample -> label -> features -> train -> ship, resumable.

    python -m guard_training build --model default --languages python,javascript,go,cpp \
        --per-language 60 --out runs/guard-qwen [--ship]

Every stage writes its output atomically under --out and is skipped when that output exists, so
re-running after a crash continues where it stopped.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np

from guard_training.features import done_ends_opening_blank_line, extract_features, label_samples, load_shard, save_shard
from guard.policy import StopPolicy
from guard.probe import SHIPPED_DIR, model_slug
from guard.syntax import LANGUAGES
from guard_training.sampling import SamplingPlan, read_jsonl, sample_language, write_jsonl_atomic
from guard_training.train import TrainConfig, line_stop_errors, split_by_sample, train_guard

# `--done-needs-blank-line auto` turns the requirement on when at least this share of the training
# done line ends open a blank line: the model's own habit, not a few lucky samples.
MIN_BLANK_LINE_DONE_SHARE = 0.95


def sampling_backend(requested: str, model: str) -> str:
    """The backend that samples: `auto` picks vLLM (faster even on CPU) when it is installed,
    except for the tiny test model, where vLLM's start outweighs the few tokens sampled."""
    from models.tiny import TINY_MODEL_NAME

    if requested != "auto":
        return requested
    return "vllm" if importlib.util.find_spec("vllm") is not None and model != TINY_MODEL_NAME else "codefast"


def sample_all(args: argparse.Namespace, languages: list[str], plan: SamplingPlan, samples_dir: Path) -> None:
    """Step 1 for every language without a samples file, on one backend started once. The
    backend is shut down before the features step loads the model for its hidden states."""
    from backends.spec import BackendSpec, build_backend

    todo = [lang for lang in languages if not (samples_dir / f"{lang}.jsonl").exists()]
    if not todo:
        return
    backend_name = sampling_backend(args.backend, args.model)
    print(f"[sampling] {', '.join(todo)} on the {backend_name} backend", flush=True)
    backend = build_backend(BackendSpec(backend=backend_name, model=args.model, guard=None,
                                        max_num_seqs=args.max_num_seqs, dtype=args.dtype))
    try:
        for language in todo:
            print(f"[{language}] 1/3 sampling", flush=True)
            sample_language(backend, language, plan, samples_dir, log=lambda line: print(line, flush=True))
    finally:
        backend.shutdown()


def build(args: argparse.Namespace) -> Path:
    from engine.model_loading import load_model

    out = Path(args.out)
    languages = [lang.strip() for lang in args.languages.split(",") if lang.strip()]
    unknown = set(languages) - set(LANGUAGES)
    if unknown:
        raise SystemExit(f"unknown languages {sorted(unknown)}; choose from {LANGUAGES}")
    plan = SamplingPlan(per_language=args.per_language, offset=args.offset,
                        temperatures=tuple(args.temperatures), max_new_tokens=args.max_new_tokens)
    sample_all(args, languages, plan, out / "samples")
    loaded = load_model(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    all_samples, shards, label_counts = [], [], {}
    for language in languages:
        samples_path = out / "samples" / f"{language}.jsonl"
        labeled_path = out / "labeled" / f"{language}.jsonl"
        if not labeled_path.exists():
            print(f"[{language}] 2/3 labeling", flush=True)
            labeled, counts = label_samples(tokenizer, read_jsonl(samples_path))
            labeled_path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl_atomic(labeled_path, labeled)
            (out / "labeled" / f"{language}.counts.json").write_text(json.dumps(counts, indent=2))
        labeled = read_jsonl(labeled_path)
        label_counts[language] = json.loads((out / "labeled" / f"{language}.counts.json").read_text())
        shard_path = out / "features" / f"{language}.npz"
        if not shard_path.exists():
            print(f"[{language}] 3/3 features ({len(labeled)} samples)", flush=True)
            shard_path.parent.mkdir(parents=True, exist_ok=True)
            save_shard(shard_path, extract_features(model, tokenizer, labeled))
        shard = load_shard(shard_path)
        shard["sample_index"] = shard["sample_index"] + len(all_samples)
        shards.append((language, shard))
        all_samples += labeled

    features = np.concatenate([s["features"] for _, s in shards])
    labels = np.concatenate([s["labels"] for _, s in shards])
    done_labels = np.concatenate([s["done_labels"] for _, s in shards])
    sample_index = np.concatenate([s["sample_index"] for _, s in shards])
    is_val = split_by_sample(sample_index, TrainConfig().val_fraction, seed=0)
    done_threshold = args.done_threshold if args.done_threshold >= 0 else None
    num_opening, num_done = done_ends_opening_blank_line(all_samples)
    needs_blank_line = args.done_needs_blank_line == "on" or (
        args.done_needs_blank_line == "auto" and num_done > 0
        and num_opening >= MIN_BLANK_LINE_DONE_SHARE * num_done)
    policy = StopPolicy(stop_threshold=args.threshold, done_threshold=done_threshold,
                        min_code_lines=args.min_code_lines, done_needs_blank_line=needs_blank_line)
    guard, report = train_guard(features, labels, is_val, features.shape[1],
                                model_name=loaded.model_name, policy=policy,
                                done_labels=None if done_threshold is None else done_labels)
    report["labeling"] = label_counts
    report["done_line_ends_opening_blank_line"] = f"{num_opening}/{num_done}"
    report["per_language"] = {}
    for language, shard in shards:
        val_rows = is_val[np.isin(sample_index, shard["sample_index"])]
        by_sample = {}
        for i in np.unique(shard["sample_index"][val_rows]):
            by_sample[int(i)] = features[sample_index == i]
        report["per_language"][language] = line_stop_errors(guard, all_samples, by_sample, policy)
    guard.metadata = {"training": report, "languages": languages,
                      "sampling": {"per_language": plan.per_language, "offset": plan.offset, "temperatures": list(plan.temperatures),
                                   "max_new_tokens": plan.max_new_tokens, "split": "train (all but last 500)"}}
    guard_dir = guard.save(out / "guard")
    print(json.dumps(report, indent=2))
    if args.ship:
        target = SHIPPED_DIR / model_slug(loaded.model_name)
        shutil.copytree(guard_dir, target, dirs_exist_ok=True)
        print(f"shipped to {target}")
    return guard_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m guard_training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="sample, label, extract features, train and save a guard")
    p.add_argument("--model", default="default")
    p.add_argument("--languages", default=",".join(LANGUAGES))
    p.add_argument("--out", required=True)
    p.add_argument("--per-language", type=int, default=60)
    p.add_argument("--offset", type=int, default=0, help="first train-split prompt to sample")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.6])
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--done-threshold", type=float, default=0.9,
                   help="train the done head and use this threshold (set policies later with"
                        " benchmarks.policy_sweep); pass a negative value for no done head")
    p.add_argument("--min-code-lines", type=int, default=1,
                   help="the guard never stops before this many lines of code are kept")
    p.add_argument("--done-needs-blank-line", choices=("auto", "on", "off"), default="auto",
                   help="the done rule fires only on a line end that opens a blank line; auto: when"
                        f" {MIN_BLANK_LINE_DONE_SHARE:.0%} of the training done line ends do")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backend", default="auto", choices=("auto", "codefast", "vllm"),
                   help="what samples (step 1): auto = vLLM where installed (faster), else our engine;"
                        " features always come from the HF model")
    p.add_argument("--ship", action="store_true", help="copy the guard into guard/weights/")
    args = parser.parse_args(argv)
    build(args)


if __name__ == "__main__":
    main()
