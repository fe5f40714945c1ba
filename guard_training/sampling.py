"""Step 1 of building a guard: sample completions of the training prompts with the target LLM.

Greedy plus a few sampled variants per prompt (temperature 0.2-0.8), so the probe sees diverse
excess. One jsonl file per language, written atomically: a rerun skips finished languages.
Sampling goes through the engine protocol, so it runs on whichever backend is fastest for the
model (vLLM where it runs the model, else our engine) without a line here knowing which.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from backends.protocol import GenerationBackend, PromptError
from engine.params import SamplingParams
from evals.mbxp import load_problems, split_problems


@dataclass(frozen=True)
class SamplingPlan:
    per_language: int = 60  # training prompts per language (from the train split)
    offset: int = 0  # skip this many train-split prompts first
    temperatures: tuple[float, ...] = (0.0, 0.6)  # 0.0 = greedy; others seeded sampling
    max_new_tokens: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        if self.per_language < 1 or self.max_new_tokens < 1 or not self.temperatures or self.offset < 0:
            raise ValueError("per_language, max_new_tokens and temperatures must be positive/non-empty,"
                             " offset >= 0")
        if any(not 0 <= t <= 1.5 for t in self.temperatures):
            raise ValueError("temperatures must lie in [0, 1.5]")


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def training_problems(language: str, offset: int, per_language: int) -> list:
    """The train-split prompts a guard is built from: `per_language` of them from `offset`."""
    return split_problems(load_problems(language), "train")[offset:offset + per_language]


def sample_language(backend: GenerationBackend, language: str, plan: SamplingPlan, out_dir: Path,
                    log=print) -> Path:
    out_path = out_dir / f"{language}.jsonl"
    if out_path.exists():
        return out_path  # finished earlier: resumable by whole language shards
    problems = training_problems(language, plan.offset, plan.per_language)
    prompts, params, keys = [], [], []
    for t_index, temperature in enumerate(plan.temperatures):
        for p_index, problem in enumerate(problems):
            prompts.append(problem.prompt)
            keys.append((problem, temperature))
            params.append(SamplingParams(max_new_tokens=plan.max_new_tokens, temperature=temperature,
                                         seed=plan.seed + 1000 * t_index + p_index,
                                         use_guard=False, top_p=0.95 if temperature else 1.0))
    futures, num_refused = [], 0
    for prompt, sampling, key in zip(prompts, params, keys):
        try:
            futures.append((key, backend.submit(prompt, sampling)))
        except PromptError as exc:  # e.g. longer than the model's context: no sample, say so
            num_refused += 1
            log(f"[{language}] {key[0].task_id} not sampled: {exc}")
    rows = []
    for index, ((problem, temperature), future) in enumerate(futures, start=1):
        result = future.result()
        rows.append({"task_id": problem.task_id, "language": language, "entry_point": problem.entry_point,
                     "temperature": temperature, "prompt": problem.prompt,
                     "completion": result.text, "completion_ids": list(result.token_ids),
                     "finish_reason": result.finish_reason})
        if index % max(1, len(futures) // 10) == 0 or index == len(futures):
            log(f"[{language}] sampled {index}/{len(futures)}")
    if num_refused:
        log(f"[{language}] {num_refused} prompts refused by the backend")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out_path, rows)
    return out_path
