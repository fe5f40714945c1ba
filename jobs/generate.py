"""Batch generation over a prompt corpus with Ray Data: engine actors (or a Serve URL) -> parquet.

    python -m jobs.generate --input corpus.jsonl --output out/ --model default --guard default \
        --max-new-tokens 300 --num-actors 1 --batch-size 16 --max-num-seqs 8
    ray job submit --working-dir . -- python -m jobs.generate ...   # same module on a cluster

Resumable: finished rows land in `part-XXXXX.parquet` shards (atomic rename); a rerun with the same
arguments skips every id already written, so after a crash or Ctrl-C it finishes the rest and the
output holds each input id exactly once. See jobs/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine import EngineConfig, SamplingParams
from engine.dtypes import DTYPE_NAMES
from jobs.corpus import PromptRow, load_corpus
from jobs.engine_worker import EngineSpec, EngineWorker, worker_pool
from jobs.http_worker import HttpWorker, ServeSpec, check_server
from jobs.progress import Progress
from jobs.shards import ShardWriter, read_done_ids, remove_stale_tmp_files

MAX_INPUT_BLOCKS = 2000  # one block per batch, capped: Ray Data overhead grows with the block count


@dataclass(frozen=True)
class JobConfig:
    input: str
    output: str
    prompt_column: str = "prompt"
    id_column: str = "id"
    split: str | None = None
    model: str = "default"
    guard: str | None = "default"  # "default", None (no guard) or a guard folder
    max_new_tokens: int = 300
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # sampling seed of every row (temperature > 0); None: unseeded
    stop: tuple[str, ...] = ()
    num_actors: int = 1
    batch_size: int = 16  # rows per batch call; an actor runs two calls at once (engine_worker)
    max_num_seqs: int = 8
    dtype: str = "auto"
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    shard_size: int = 256  # rows per output shard: what a crash can cost at most, per shard
    serve_url: str | None = None
    http_concurrency: int = 8
    progress_interval_s: float = 10.0
    ray_num_cpus: int = 4  # logical CPUs of the local Ray this CLI starts when no cluster is given

    def __post_init__(self) -> None:
        for name in ("num_actors", "batch_size", "max_num_seqs", "shard_size", "http_concurrency",
                     "ray_num_cpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_cpus_per_actor < 0 or self.num_gpus_per_actor < 0:
            raise ValueError("per-actor CPU/GPU counts must be >= 0")
        if self.serve_url and self.guard not in (None, "default"):
            raise ValueError("a guard folder cannot be used with --serve-url: the deployment "
                             "owns its guard; use --guard default (on) or none (off)")
        object.__setattr__(self, "stop", tuple(self.stop))

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, stop=self.stop, use_guard=self.guard is not None)

    def engine_spec(self) -> EngineSpec:
        device = "cuda" if self.num_gpus_per_actor > 0 else "cpu"
        config = EngineConfig(max_num_seqs=self.max_num_seqs, dtype=self.dtype, device=device)
        return EngineSpec(self.model, self.guard, config,
                          num_threads=max(1, int(self.num_cpus_per_actor)))

    def serve_spec(self) -> ServeSpec:
        model = None if self.model == "default" else self.model  # "default": what is served
        return ServeSpec(self.serve_url, model, self.max_new_tokens, self.temperature,
                         self.stop, use_guard=self.guard is not None,
                         concurrency=self.http_concurrency)


def build_dataset(rows: list[PromptRow], config: JobConfig):
    """Rows -> Ray Data -> generated rows. The prompt travels as text plus its Python type name,
    so a non-text value reaches the worker (and becomes an error row) without breaking Arrow."""
    import ray

    items = [{"id": r.id, "prompt": r.prompt if isinstance(r.prompt, str) else None,
              "prompt_type": type(r.prompt).__name__} for r in rows]
    num_blocks = min(MAX_INPUT_BLOCKS, math.ceil(len(items) / config.batch_size))
    dataset = ray.data.from_items(items, override_num_blocks=num_blocks)
    if config.serve_url:
        return dataset.map_batches(HttpWorker, fn_constructor_args=(config.serve_spec(),),
                                   batch_size=config.batch_size, batch_format="pyarrow",
                                   compute=ray.data.ActorPoolStrategy(size=config.num_actors),
                                   num_cpus=config.num_cpus_per_actor)
    return dataset.map_batches(EngineWorker,
                               fn_constructor_args=(config.engine_spec(), config.sampling_params()),
                               batch_size=config.batch_size, batch_format="pyarrow",
                               compute=worker_pool(config.num_actors),
                               num_cpus=config.num_cpus_per_actor, num_gpus=config.num_gpus_per_actor)


def connect_ray(config: JobConfig, address: str | None) -> bool:
    """Join a cluster (inside `ray job submit`, RAY_ADDRESS is set) or start a local one.
    Returns True when this process started Ray and so must shut it down."""
    import ray

    from scripts.ray_local import RAY_LOCAL_ENV, apply_local_env

    apply_local_env()
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):  # "auto" resolves RAY_ADDRESS (set inside jobs)
        ray.init(address=address or "auto")
        return False
    ray.init(num_cpus=config.ray_num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": RAY_LOCAL_ENV}, log_to_driver=True)
    return True


def run_job(config: JobConfig, address: str | None = None, log=print) -> dict:
    """Generate for every input id not yet in the output folder; returns the run's summary."""
    start = time.perf_counter()
    corpus = load_corpus(config.input, config.prompt_column, config.id_column, config.split)
    output_dir = Path(config.output)
    remove_stale_tmp_files(output_dir)
    written_ids = read_done_ids(output_dir)
    todo = [row for row in corpus.rows if row.id not in written_ids]
    log(describe_input(config, corpus, num_done=len(corpus.rows) - len(todo)))
    writer = ShardWriter(output_dir)
    progress = Progress(len(todo), config.progress_interval_s, log)
    if todo and config.serve_url:
        check_server(config.serve_url)
    if todo:
        is_ray_owner = connect_ray(config, address)
        try:
            _stream_to_shards(build_dataset(todo, config), config, writer, written_ids, progress)
        finally:
            if is_ray_owner:
                import ray
                ray.shutdown()
    summary = progress.summary(wall_s=time.perf_counter() - start)
    summary.update(num_input_rows=corpus.num_input_rows, num_duplicate_ids=corpus.num_duplicates,
                   num_missing_ids=corpus.num_missing_ids, num_already_done=len(corpus.rows) - len(todo),
                   num_shards_written=writer.num_shards_written, output=str(output_dir),
                   mode="serve" if config.serve_url else "actors")
    log("[generate] done: " + progress.summary_line(summary))
    log("SUMMARY " + json.dumps(summary, sort_keys=True))
    return summary


def describe_input(config: JobConfig, corpus, num_done: int) -> str:
    parts = [f"{corpus.num_input_rows} rows", f"{len(corpus.rows)} unique ids"]
    if corpus.is_id_derived:
        parts.append(f"ids are prompt hashes (no {config.id_column!r} column)")
    if corpus.duplicate_ids:
        parts.append(f"{corpus.num_duplicates} duplicate ids skipped (first: "
                     f"{', '.join(corpus.duplicate_ids[:5])})")
    if corpus.num_missing_ids:
        parts.append(f"{corpus.num_missing_ids} rows without id skipped")
    parts.append(f"{num_done} already in {config.output}")
    parts.append(f"{len(corpus.rows) - num_done} to generate")
    return f"[generate] input {config.input}: " + ", ".join(parts)


def _stream_to_shards(dataset, config, writer, written_ids, progress) -> None:
    """Collect generated blocks as they stream out and write a shard every `shard_size` rows.
    On any interruption the rows already generated are written before the error propagates."""
    import pyarrow as pa

    pending: list[pa.Table] = []

    def flush() -> None:
        if pending:
            table = pa.concat_tables(pending)
            pending.clear()
            path = writer.write(table)
            progress.log_shard(path, table.num_rows)

    try:
        for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            # Defensive: a retried task must never put an id into the output twice.
            ids = block.column("id").to_pylist()
            is_new = [row_id not in written_ids for row_id in ids]
            if not all(is_new):
                block = block.filter(pa.array(is_new))
            written_ids.update(ids)
            pending.append(block)
            progress.update(block)
            if sum(t.num_rows for t in pending) >= config.shard_size:
                flush()
    finally:
        flush()


def parse_args(argv: list[str] | None = None) -> tuple[JobConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help=".jsonl, .parquet (file/folder) or a datasets folder")
    p.add_argument("--output", required=True, help="output folder of part-XXXXX.parquet shards")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--id-column", default="id", help="if absent, ids are prompt hashes")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict")
    p.add_argument("--model", default="default")
    p.add_argument("--guard", default="default", help="'default', 'none' or a guard folder")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible sampled runs)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_NAMES))
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--serve-url", default=None, help="send prompts to a running Serve deployment")
    p.add_argument("--http-concurrency", type=int, default=8, help="requests in flight per actor")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--ray-num-cpus", type=int, default=4, help="CPUs of the local Ray (no cluster given)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    args = p.parse_args(argv)
    config = JobConfig(
        input=args.input, output=args.output, prompt_column=args.prompt_column,
        id_column=args.id_column, split=args.split, model=args.model,
        guard=None if args.guard == "none" else args.guard, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop),
        num_actors=args.num_actors, batch_size=args.batch_size, max_num_seqs=args.max_num_seqs,
        dtype=args.dtype, num_cpus_per_actor=args.num_cpus_per_actor,
        num_gpus_per_actor=args.num_gpus_per_actor, shard_size=args.shard_size,
        serve_url=args.serve_url, http_concurrency=args.http_concurrency,
        progress_interval_s=args.progress_interval, ray_num_cpus=args.ray_num_cpus)
    return config, args


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    config.sampling_params()  # validate sampling settings before any Ray start-up
    print("[generate] config " + json.dumps(asdict(config), sort_keys=True), flush=True)
    try:
        run_job(config, address=args.address, log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("[generate] interrupted; finished rows are saved — rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
