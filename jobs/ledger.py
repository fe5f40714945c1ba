"""Small Ray actors that a job's workers report to, so that the driver never sees the rows.

- `JobLedger`: running totals (rows, errors, guard stops, tokens), worker starts and restarts,
  batch retries. The driver reads it for the progress line and the summary; it is a named actor
  (`LEDGER_NAME_PREFIX` + run id), so another process on the cluster can read a running job's
  totals too: `ray.get(ray.get_actor(name).snapshot.remote())`.
- `IdRegistry`: which task claimed each id in this run, so a repeated input id is generated once
  (the ledger is the first shard).
  Checkpointing skips the ids of earlier runs, but within one run the rows stream through
  without a global view; finding repeats with a Ray Data groupby costs a full shuffle and, on
  this 2-core machine, 6-10 s even for 1,000 rows. The registry answers per block instead and
  holds the ids in actors (sharded by id hash at scale), not on the driver.

`prepare_rows` is the Ray Data map that runs right after the read: it gives rows without an id
column their prompt-hash id, drops rows whose id is null, and keeps one row per id.
"""
from __future__ import annotations

import collections
import zlib

import pyarrow as pa

from jobs.corpus import with_row_ids

MAX_EXAMPLE_IDS = 5
LEDGER_NAME_PREFIX = "codefast-job-ledger-"


class IdRegistry:
    def __init__(self):
        self.claimant_by_id: dict = {}

    def claim(self, ids: list, claimant: str) -> list[bool]:
        """True for each id this claimant may generate: first claim, or a retry of the same
        claim (a re-executed task keeps its claimant, so it must not lose its own ids)."""
        return [self.claimant_by_id.setdefault(row_id, claimant) == claimant for row_id in ids]


class JobLedger(IdRegistry):
    """Also the first (often only) id registry shard: one actor process fewer to start."""

    def __init__(self):
        super().__init__()
        self.totals = collections.Counter()
        self.example_duplicate_ids: list[str] = []
        self.in_flight_batches: set[str] = set()

    def worker_started(self, is_restart: bool) -> None:  # a restarted actor runs __init__ again
        self.totals["num_worker_starts"] += 1
        self.totals["num_actor_restarts"] += int(is_restart)

    def batch_started(self, batch_key: str) -> None:
        # A batch that starts while an earlier attempt of it never finished is a retry: its
        # actor died (or was killed) mid-batch and Ray runs it again on a restarted actor.
        if batch_key in self.in_flight_batches:
            self.totals["num_batch_retries"] += 1
        self.in_flight_batches.add(batch_key)

    def batch_finished(self, batch_key: str, counts: dict) -> None:
        self.in_flight_batches.discard(batch_key)
        self.totals.update(counts)

    def rows_read(self, num_rows: int, num_missing_ids: int, num_duplicate_ids: int,
                  example_duplicate_ids: list) -> None:
        self.totals.update(num_rows_read=num_rows, num_missing_ids=num_missing_ids,
                           num_duplicate_ids=num_duplicate_ids)
        room = MAX_EXAMPLE_IDS - len(self.example_duplicate_ids)
        self.example_duplicate_ids += [str(i) for i in example_duplicate_ids[:max(room, 0)]]

    def snapshot(self) -> dict:
        return {**self.totals, "example_duplicate_ids": list(self.example_duplicate_ids),
                "num_batches_in_flight": len(self.in_flight_batches)}


def shard_of(row_id: object, num_shards: int) -> int:
    # crc32, not hash(): Python salts str hashes per process, and every worker must agree.
    return zlib.crc32(str(row_id).encode("utf-8", "surrogatepass")) % num_shards


BLOCK_ORDINAL_KEY = "codefast_block_ordinal"


def _claimant() -> str:
    """The Ray task id (the same on every retry of a task) plus the block's ordinal within this
    execution of it: a read task streams many blocks, and a retry yields them again in the same
    order. The ordinal lives on Ray Data's TaskContext (internal API, one per execution) rather
    than in this module, which a worker process reused for the retry would still hold."""
    import ray
    from ray.data._internal.execution.interfaces.task_context import TaskContext

    task_id = ray.get_runtime_context().get_task_id() or "driver"
    context = TaskContext.get_current()
    if context is None:
        return task_id
    ordinal = context.kwargs.get(BLOCK_ORDINAL_KEY, 0)
    context.kwargs[BLOCK_ORDINAL_KEY] = ordinal + 1
    return f"{task_id}:{ordinal}"


def prepare_rows(block: pa.Table, *, id_column: str, prompt_column: str, registries: list,
                 ledger) -> pa.Table:
    import ray

    block = with_row_ids(block, id_column, prompt_column)
    num_rows = block.num_rows
    ids = block.column(id_column).to_pylist()
    first_index: dict = {}
    for index, row_id in enumerate(ids):
        if row_id is not None:
            first_index.setdefault(row_id, index)
    keep = set(first_index.values())
    duplicate_ids = [row_id for index, row_id in enumerate(ids)
                     if row_id is not None and index not in keep]
    if first_index:
        claimant = _claimant()
        unique_ids = list(first_index)
        by_shard = collections.defaultdict(list)
        for row_id in unique_ids:
            by_shard[shard_of(row_id, len(registries))].append(row_id)
        answers = ray.get([registries[shard].claim.remote(shard_ids, claimant)
                           for shard, shard_ids in by_shard.items()])
        for shard_ids, is_claimed in zip(by_shard.values(), answers):
            for row_id, is_mine in zip(shard_ids, is_claimed):
                if not is_mine:
                    keep.discard(first_index[row_id])
                    duplicate_ids.append(row_id)
    ledger.rows_read.remote(num_rows, ids.count(None), len(duplicate_ids), duplicate_ids[:MAX_EXAMPLE_IDS])
    if len(keep) == num_rows:
        return block
    return block.take(pa.array(sorted(keep), pa.int64()))
