"""Runs with vLLM's batch layout held fixed: one request at a time, in problem order, the prefix
cache emptied first, so an unguarded run computes each completion as the guarded run did."""
from __future__ import annotations

import json
import time
from pathlib import Path

from evals.methods import method_params


def observe_cap(row: dict) -> int:
    """New tokens for (a)'s request: as many as (c)'s engine decoded, the step that sampled the
    guard's stop marker included (the policy may have voted past its stop index to get there)."""
    return row["num_generated_tokens"]


def run(backend, problems, max_new_tokens: int, caps: list[int] | None = None) -> dict:
    """One request at a time (the backend has one slot) in problem order; (a) when `caps` is given."""
    if not backend.reset_prefix_cache():
        raise RuntimeError("vLLM refused to empty its prefix cache")
    start = time.perf_counter()
    futures = []
    for index, problem in enumerate(problems):
        if caps is None:
            futures.append(backend.submit(problem.prompt, method_params("guard", problem.language, max_new_tokens)))
        else:
            futures.append(backend.submit(problem.prompt, method_params("baseline", problem.language, caps[index]),
                                          observe_guard=True))
    results = [future.result(timeout=1800) for future in futures]
    return {"wall_s": time.perf_counter() - start,
            "problems": [{"task_id": p.task_id, "text": r.text, "token_ids": list(r.token_ids),
                          "finish_reason": r.finish_reason,
                          "guard_stop_index": r.guard_stop_index, "num_generated_tokens": r.num_generated_tokens}
                         for p, r in zip(problems, results)]}


def same_guarded_runs(cells: dict, other_dir: Path) -> tuple[int, int]:
    """(identical, compared): this run's guarded problems whose tokens, finish reason and stop index
    equal those of the same problem (by task id) in the run at `other_dir`."""
    num_same = num_compared = 0
    for language, runs in cells.items():
        path = other_dir / "cells" / f"{language}.json"
        if not path.is_file():
            continue
        other = {row["task_id"]: row for row in json.loads(path.read_text())["guard"]["problems"]}
        for row in runs["guard"]["problems"]:
            if row["task_id"] in other:
                num_compared += 1
                num_same += all(row[key] == other[row["task_id"]][key]
                                for key in ("token_ids", "finish_reason", "guard_stop_index"))
    return num_same, num_compared

