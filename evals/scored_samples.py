"""Greedy completions scored by the guard token by token: the input of every policy replay.

Each prompt is generated once without any stop rule and cached as token ids (the committed
caches under `reports/policy_sweep/`); the guard's p_stop / p_done are recomputed on every run
(one teacher-forced forward), so another guard can be replayed over the same completions.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from engine import Engine, SamplingParams
from evals.mbxp import load_problems, split_problems

# The committed caches of train prompts no guard was trained on (0-39, 280-319, 320-399).
HELD_OUT_CACHES = "train.0.40,train.280.40,train.320.80"
SWEEP_DIR = "reports/policy_sweep"  # the committed caches of token ids


def add_replay_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of a replay over the sweep's cached held-out completions
    (benchmarks.guard_margins, benchmarks.syntax_gate)."""
    parser.add_argument("--model", default="default")
    parser.add_argument("--guard", default="default")
    parser.add_argument("--caches", default=HELD_OUT_CACHES)
    parser.add_argument("--cache-dir", default=SWEEP_DIR)
    parser.add_argument("--max-new-tokens", type=int, default=300, help="what the caches were made with")


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
