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

import torch
from tqdm import tqdm

from benchmarks.stop_words import STOP_WORDS, finish_completion
from engine import Engine, EngineConfig, SamplingParams
from evals.mbxp import load_problems, split_problems
from evals.pass_at_k import evaluate, pass_at_1
from guard.policy import StopPolicy, find_stop
from guard.syntax import LANGUAGES

# The committed caches of train prompts no guard was trained on (0-39, 280-319, 320-399).
HELD_OUT_CACHES = "train.0.40,train.280.40,train.320.80"
SWEEP_DIR = "reports/policy_sweep"  # the committed caches of token ids


def add_replay_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of a replay over this sweep's cached held-out completions
    (benchmarks.guard_margins, benchmarks.syntax_gate)."""
    parser.add_argument("--model", default="default")
    parser.add_argument("--guard", default="default")
    parser.add_argument("--caches", default=HELD_OUT_CACHES)
    parser.add_argument("--cache-dir", default=SWEEP_DIR)
    parser.add_argument("--max-new-tokens", type=int, default=300, help="what the caches were made with")


# The guard's policy three ways: no syntax gate, the strict gate, the gate that lets a closed stub
# through (benchmarks.full_split, models_table and syntax_gate replay all three).
GUARD_VARIANTS = ("guard", "guard+gate", "guard+gate_stubs")


def guard_variants(policy) -> dict:
    """GUARD_VARIANTS' policies, from a guard's own policy."""
    base = replace(policy, syntax_gate=False, syntax_gate_allows_stub=False)
    return {"guard": base, "guard+gate": replace(base, syntax_gate=True),
            "guard+gate_stubs": replace(base, syntax_gate=True, syntax_gate_allows_stub=True)}


def shipped_variant(policy) -> str:
    """Which of GUARD_VARIANTS the guard's shipped policy is."""
    if not policy.syntax_gate:
        return "guard"
    return "guard+gate_stubs" if policy.syntax_gate_allows_stub else "guard+gate"


@torch.inference_mode()
def score_tokens(engine: Engine, prompt: str, completion_ids: list[int]) -> tuple[list[float], list[float] | None]:
    """p_stop and p_done (None without a done head) of every generated token, from the hidden
    state that produced it."""
    prompt_ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([prompt_ids + completion_ids])
    hidden = engine.runner.backbone(input_ids=input_ids, use_cache=False).last_hidden_state
    first = len(prompt_ids) - 1
    produced = hidden[0, first:first + len(completion_ids)]
    p_dones = engine.guard.done_probs(produced)
    return engine.guard.stop_probs(produced).tolist(), None if p_dones is None else p_dones.tolist()


def replay_policy(texts: list[str], p_stops: list[float], policy: StopPolicy,
                  p_dones: list[float] | None = None, is_complete=None) -> tuple[int, int] | None:
    """(tokens generated, tokens kept) when `policy` stops the sequence, None when it never does.

    `texts[i]` is the decoded text of tokens [0, i] (prefix decoding keeps multi-byte characters
    whole), so token i's own text is what it adds to texts[i - 1].
    """
    token_texts = [text[len(texts[i - 1]) if i else 0:] for i, text in enumerate(texts)]
    stop = find_stop(p_stops, token_texts, policy, p_dones, is_complete=is_complete)
    return None if stop is None else (stop[0] + 1, stop[1])


def replay_stop_words(text: str, char_ends: list[int], stop: tuple[str, ...]) -> tuple[int, str] | None:
    """(tokens generated, truncated text) when a stop word fires, else None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not hits:
        return None
    first = min(hits)
    end = first + next(len(s) for s in stop if text.find(s) == first)
    num_tokens = next(i + 1 for i, e in enumerate(char_ends) if e >= end)
    return num_tokens, text[:first]


def make_sample(engine: Engine, problem, completion_ids: list[int]) -> dict:
    """A completion, its prefix decodes, and the guard's p_stop / p_done for every token."""
    texts = [engine.tokenizer.decode(completion_ids[:i + 1], skip_special_tokens=True)
             for i in range(len(completion_ids))]
    p_stops, p_dones = score_tokens(engine, problem.prompt, completion_ids)
    return {"task_id": problem.task_id, "ids": completion_ids, "texts": texts,
            "p_stop": p_stops, "p_done": p_dones}


def generated_samples(engine: Engine, language: str, args, out: Path) -> list[dict]:
    """Greedy completions with no stop rule, generated once and cached in `out` (token ids
    only: the guard's scores are recomputed on every run, so another guard can be replayed)."""
    cache = out / f"{args.split}.{args.offset}.{args.limit}.{language}.json"
    problems = split_problems(load_problems(language), args.split)[args.offset:args.offset + args.limit]
    if cache.exists():
        ids = {row["task_id"]: row["ids"] for row in json.loads(cache.read_text())}
    else:
        results = engine.generate([p.prompt for p in problems],
                                  SamplingParams(max_new_tokens=args.max_new_tokens, use_guard=False),
                                  use_tqdm=True)
        ids = {p.task_id: r.token_ids for p, r in zip(problems, results)}
        cache.write_text(json.dumps([{"task_id": p.task_id, "ids": ids[p.task_id]} for p in problems]))
    return [make_sample(engine, p, ids[p.task_id]) for p in tqdm(problems, desc=f"score {language}")]


def samples_from_cells(engine: Engine, cells: Path, language: str) -> list[dict]:
    """The baseline cell's completions, re-tokenized (the cell keeps text, not ids)."""
    problems = {p.task_id: p for p in load_problems(language)}
    rows = json.loads((cells / f"{language}.baseline.json").read_text())["problems"]
    return [make_sample(engine, problems[row["task_id"]],
                        engine.tokenizer(row["completion"], add_special_tokens=False)["input_ids"])
            for row in tqdm(rows, desc=f"score {language}")]


def full_text(sample: dict) -> str:
    return sample["texts"][-1] if sample["texts"] else ""


def replay_stop_words_method(language: str, texts: list[str], num_baseline_tokens: int) -> tuple[int, str, str]:
    """(tokens generated, text kept, text to execute) of the stop-word heuristic over one
    completion (`texts[i]`: the decoded text of tokens [0, i]); its stop puts back the brace it cut."""
    full = texts[-1] if texts else ""
    hit = replay_stop_words(full, [len(text) for text in texts], STOP_WORDS[language])
    if hit is None:
        return num_baseline_tokens, full, full
    return hit[0], hit[1], finish_completion(language, hit[1], True)


def replay_completion(language: str, texts: list[str], token_texts: list[str], p_stops: list[float],
                      p_dones: list[float] | None, num_baseline_tokens: int, policies: dict[str, StopPolicy],
                      is_complete_at=None) -> dict[str, tuple[int, str, str]]:
    """method -> (tokens generated, text the method keeps, text to execute) for one completion,
    each method stopping as the engines apply it: the baseline, the stop words, every policy and
    every policy + stop words. `texts[i]` is the decoded text of tokens [0, i]; `is_complete_at`
    (num kept tokens, the policy's syntax_gate_allows_stub -> bool) is the syntax gate's check
    for the policies that turn it on."""
    full = texts[-1] if texts else ""
    methods = {"baseline": (num_baseline_tokens, full, full),
               "stop_words": replay_stop_words_method(language, texts, num_baseline_tokens)}
    for name, policy in policies.items():
        check = None
        if policy.syntax_gate:
            check = lambda n, allows_stub=policy.syntax_gate_allows_stub: is_complete_at(n, allows_stub)  # noqa: E731
        stop = find_stop(p_stops, token_texts, policy, p_dones or None, is_complete=check)
        if stop is None:
            methods[name] = methods["baseline"]
        else:
            kept = texts[stop[1] - 1] if stop[1] else ""
            methods[name] = (stop[0] + 1, kept, kept)
        # + stop words: whichever fires first; on the same token the engines check the guard first
        guard, words = methods[name], methods["stop_words"]
        methods[f"{name}+stop_words"] = guard if guard[0] <= words[0] else words
    return methods


def replay_methods(samples: list[dict], language: str, policies: dict[str, StopPolicy]) -> dict:
    """method -> one (tokens generated, text to execute) per sample."""
    labels = {**{name: f"guard {name}" for name in policies},
              **{f"{name}+stop_words": f"guard+stop_words {name}" for name in policies}}
    methods = {}
    for s in samples:
        token_texts = [text[len(s["texts"][i - 1]) if i else 0:] for i, text in enumerate(s["texts"])]
        replayed = replay_completion(language, s["texts"], token_texts, s["p_stop"], s.get("p_done"),
                                     len(s["ids"]), policies)
        for method, (num_generated, _, executed) in replayed.items():
            methods.setdefault(labels.get(method, method), []).append((num_generated, executed))
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--guard", default="default")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--offset", type=int, default=40, help="skip the guard's own training prompts")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    # Committed: the caches are small (token ids) and cost ~5 minutes of generation per 100
    # prompts of a language on 2 CPU cores, so a later run replays at once.
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
    print("\nall languages:")
    for method, per_language in summary.items():
        tokens = sum(t for t, _ in per_language.values())
        score = sum(s for _, s in per_language.values()) / len(per_language)
        print(f"{method:60s} tokens {tokens:6d}  mean pass@1 {score * 100:5.1f}")


if __name__ == "__main__":
    main()
