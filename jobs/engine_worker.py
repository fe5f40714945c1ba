"""The Ray Data callable class that hosts one Engine per actor and generates for a batch of rows.

The engine is stepped by one background thread (AsyncEngine) and each batch call only queues its
prompts and waits for their results. Ray Data runs `CONCURRENT_BATCHES` calls per actor at once, so
while one batch's last, longest sequences finish, the next batch's prompts already fill the slots
that guard stops (or EOS) free. Without that overlap every batch would end with a tail of
near-empty decode steps, and a guard stop would save no time at all. A prompt the engine refuses
(not text, empty, too long: `PromptError`) becomes an error row and the batch goes on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from engine import Engine, EngineConfig, PromptError, SamplingParams
from engine.async_engine import AsyncEngine
from jobs.shards import error_row, rows_to_table

CONCURRENT_BATCHES = 2  # batch calls in flight per actor: one generating, one queued behind it


@dataclass(frozen=True)
class EngineSpec:
    """What each actor needs to build its engine; small and picklable (sent to every actor)."""

    model: str = "default"
    guard: str | None = "default"  # "default" (shipped guard, if any), None, or a guard folder
    config: EngineConfig = EngineConfig()
    num_threads: int = 1  # torch CPU threads; match the CPUs reserved per actor

    def __post_init__(self) -> None:
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.guard not in (None, "default") and not Path(self.guard).is_dir():
            raise ValueError(f"guard must be 'default', None or a guard folder, got {self.guard!r}")


def build_engine(spec: EngineSpec) -> Engine:
    return Engine.from_pretrained(spec.model, guard=spec.guard, config=spec.config)


class EngineWorker:
    """map_batches(EngineWorker, compute=worker_pool(n)): one engine per actor, thread-safe calls."""

    def __init__(self, spec: EngineSpec, params: SamplingParams):
        import torch

        torch.set_num_threads(spec.num_threads)
        self.engine = AsyncEngine(build_engine(spec))
        self.params = params

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        prompts = batch.column("prompt").to_pylist()
        prompt_types = batch.column("prompt_type").to_pylist()
        rows: list[dict | None] = [None] * len(ids)
        futures = {}
        for i, (prompt, prompt_type) in enumerate(zip(prompts, prompt_types)):
            try:
                if prompt_type != "str":
                    raise PromptError(f"prompt must be a string, got {prompt_type}")
                futures[i] = self.engine.submit(prompt, self.params)
            except PromptError as e:
                rows[i] = error_row(ids[i], prompt, str(e))
        for i, future in futures.items():
            result = future.result()
            rows[i] = {"id": ids[i], "prompt": prompts[i], "completion": result.text,
                       "completion_ids": list(result.token_ids),
                       "finish_reason": result.finish_reason,
                       "num_prompt_tokens": result.num_prompt_tokens,
                       "num_generated_tokens": result.num_generated_tokens,
                       "is_guard_stop": result.finish_reason == "guard",
                       "latency_s": result.latency_s, "error": None}
        return rows_to_table(rows)


def worker_pool(num_actors: int):
    """A fixed actor pool whose actors each take CONCURRENT_BATCHES batch calls at once (threads;
    the engine itself is stepped by a single thread, so one model runs at a time)."""
    import ray

    return ray.data.ActorPoolStrategy(size=num_actors,
                                      max_concurrent_calls_per_actor=CONCURRENT_BATCHES,
                                      enable_true_multi_threading=True)
