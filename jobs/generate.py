"""Batch generation over a prompt corpus with Ray Data: read -> generate -> parquet, all on workers.

    python -m jobs.generate --input corpus.jsonl --output out/ --model default --guard default \
        --max-new-tokens 300 --min-actors 1 --max-actors 4 --batch-size 16 --max-num-seqs 8
    python -m jobs.generate --input s3://bucket/corpus/ --output s3://bucket/out ...
    ray job submit --working-dir . -- python -m jobs.generate ...   # same module on a cluster

The driver only plans: Ray Data reads the corpus on the workers (jsonl, parquet or a datasets
folder; a local path or any pyarrow filesystem URI), an autoscaling pool of actors generates
(each hosting a backend built from a BackendSpec, or sending rows to a Serve URL), and the
workers write the parquet output with Ray Data's checkpointing. A rerun with the same arguments
after a crash, a killed actor or Ctrl-C generates only the ids not yet committed, so the output
holds each input id (each (id, sample_index) with --num-samples) exactly once. See jobs/README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
import uuid
from dataclasses import asdict, dataclass

from backends.spec import BackendSpec, add_spec_arguments, config_from_args, spec_from_namespace
from engine.params import SamplingParams
from jobs.corpus import describe, open_corpus
from jobs.http_worker import ServeSpec, check_server
from jobs.rows import MAX_SEED, RowSettings
from jobs.storage import check_writable, checkpoint_location, redacted, resolve

DEFAULT_BATCHES_PER_ACTOR = 2  # one batch generating, one filling the slots its tail frees
IDS_SHARD_PER_ACTORS = 8  # one more id registry shard per this many actors (ids live in actors)


@dataclass(frozen=True)
class JobConfig:
    input: str  # a path or URI: .jsonl / .parquet file or folder, or a datasets folder
    output: str  # a folder path or URI
    checkpoint: str | None = None  # default: the output path + ".checkpoint" (same filesystem)
    prompt_column: str = "prompt"
    id_column: str = "id"
    split: str | None = None
    # What each actor runs (with --serve-url, only model and guard are read). Unset device and
    # num_threads follow the actor's resources: cuda with a GPU, one torch thread per CPU.
    engine: BackendSpec = BackendSpec()
    max_new_tokens: int = 300
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # sampling seed of every row (a row's `seed` column overrides it)
    stop: tuple[str, ...] = ()
    num_samples: int = 1  # completions per prompt (sample_index 0..k-1, distinct seeds)
    min_actors: int = 1  # the actor pool autoscales between these two
    max_actors: int = 1
    batches_per_actor: int = DEFAULT_BATCHES_PER_ACTOR  # batch calls in flight per actor
    batch_size: int = 16  # rows per batch call
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    min_rows_per_file: int = 256  # rows per output file (at least; the last may hold fewer)
    serve_url: str | None = None
    http_concurrency: int = 8
    progress_interval_s: float = 10.0
    ray_num_cpus: int = 4  # logical CPUs of the local Ray this CLI starts when no cluster is given
    verbose: bool = False  # workers' and engines' own logs (and Ray Data's INFO lines) on the console

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.engine, BackendSpec):
            raise ValueError(f"engine must be a BackendSpec, got {type(self.engine).__name__}")
        for name in ("num_samples", "min_actors", "max_actors", "batches_per_actor", "batch_size",
                     "min_rows_per_file", "http_concurrency", "ray_num_cpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        if self.num_cpus_per_actor < 0 or self.num_gpus_per_actor < 0:
            raise ValueError("per-actor CPU/GPU counts must be >= 0")
        if self.progress_interval_s <= 0:
            raise ValueError(f"progress_interval_s must be > 0, got {self.progress_interval_s}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        if self.serve_url:
            if self.engine.guard not in (None, "default"):
                raise ValueError("a guard folder cannot be used with --serve-url: the deployment "
                                 "owns its guard; use --guard default (on) or none (off)")
            self.serve_spec()
        else:
            actor_device = "cuda" if self.num_gpus_per_actor > 0 else "cpu"
            object.__setattr__(self, "engine", self.engine.with_overrides(
                device=actor_device if self.engine.device == "auto" else self.engine.device,
                num_threads=self.engine.num_threads or max(1, int(self.num_cpus_per_actor))))
        self.sampling_params()

    @classmethod
    def from_args(cls, args: dict) -> "JobConfig":
        """From one flat mapping of settings: the engine's BackendSpec fields and the job's own."""
        return config_from_args(cls, args, BackendSpec(), what="job settings")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, stop=self.stop,
                              use_guard=self.engine.guard is not None)

    def row_settings(self) -> RowSettings:
        # Serve mode: the deployment decides what "guard on" means, so a row may always ask.
        return RowSettings(self.sampling_params(), self.prompt_column, self.id_column, self.num_samples,
                           is_guard_available=bool(self.serve_url) or self.engine.guard is not None)

    def serve_spec(self) -> ServeSpec:
        model = None if self.engine.model == "default" else self.engine.model  # "default": what is served
        return ServeSpec(self.serve_url, model, concurrency=self.http_concurrency)


def connect_ray(config: JobConfig, address: str | None, log=print) -> bool:
    """Join a cluster (inside `ray job submit`, RAY_ADDRESS is set) or start a local one.
    Returns True when this process started Ray and so must shut it down."""
    import ray

    from scripts.ray_local import RAY_LOCAL_ENV, apply_local_env

    apply_local_env()
    quiet_ray_data_console(config.verbose)
    if ray.is_initialized():
        return False
    # Without --verbose the workers' output (an engine's dozens of load lines) stays in Ray's
    # log files; the driver prints the job's own lines, and a worker's error still reaches it.
    logging_level = logging.INFO if config.verbose else logging.WARNING
    if address or os.environ.get("RAY_ADDRESS"):  # "auto" resolves RAY_ADDRESS (set inside jobs)
        ray.init(address=address or "auto", log_to_driver=config.verbose, logging_level=logging_level)
        is_owner = False
    else:
        ray.init(num_cpus=config.ray_num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": RAY_LOCAL_ENV}, log_to_driver=config.verbose,
                 logging_level=logging_level)
        is_owner = True
    if not config.verbose:
        log(f"[generate] worker and engine logs: {ray_logs_folder()} (--verbose prints them here)")
    return is_owner


def quiet_ray_data_console(verbose: bool) -> None:
    """Ray Data's INFO lines (execution plans, checkpoint loading) still go to its log file."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger and its handlers)
    from ray.util.debug import log_once

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # the job turns Ray Data's bars off for its own line: no need to warn of it
        log_once("ray_data_progress_manager_disabled")


def ray_logs_folder() -> str:
    try:
        from ray._private.worker import global_worker

        return global_worker.node.get_logs_dir_path()
    except Exception:  # a private API: the folder is only a hint
        return "the Ray session's logs folder (/tmp/ray/session_latest/logs on the head node)"


def actor_pool(config: JobConfig):
    """Ray's autoscaling actor pool, min_actors..max_actors, `batches_per_actor` calls running in
    each actor at once (threads: the calls only queue requests on the backend and wait)."""
    import ray

    # max_tasks_in_flight_per_actor stays Ray's default, twice the concurrent calls: the batches
    # queued behind the running ones are the demand Ray's autoscaler reads (it adds an actor at a
    # utilization of 1.75 tasks per slot), and they are fetched while the running ones generate.
    return ray.data.ActorPoolStrategy(
        min_size=config.min_actors, max_size=config.max_actors,
        max_concurrent_calls_per_actor=config.batches_per_actor, enable_true_multi_threading=True)


def build_dataset(corpus, config: JobConfig, ledger, registries, checkpoint):
    """read -> [Ray's checkpoint filter, on a rerun] -> prepare_rows -> batch-sized blocks ->
    workers; the caller writes it. Nothing runs yet: Ray Data executes the plan when written."""
    from jobs.engine_worker import BackendWorker
    from jobs.http_worker import HttpWorker
    from jobs.ledger import prepare_rows
    from jobs.output import make_checkpoint_config

    dataset = corpus.read().map_batches(
        prepare_rows, batch_format="pyarrow", batch_size=None,
        fn_kwargs=dict(id_column=config.id_column, prompt_column=config.prompt_column,
                       registries=registries, ledger=ledger))
    # One block per batch call: an actor task takes whole blocks and calls the worker on their
    # batches one after the other, so a 1,024-row block read from a file would be one task, its
    # batches never overlapping and the pool unable to spread it. Streaming, no shuffle.
    dataset = dataset.repartition(target_num_rows_per_block=config.batch_size, strict=True)
    compute = actor_pool(config)
    if config.serve_url:
        worker, args, num_gpus = HttpWorker, (config.serve_spec(), config.row_settings(), ledger), 0
    else:
        worker, args = BackendWorker, (config.engine, config.row_settings(), ledger)
        num_gpus = config.num_gpus_per_actor
    dataset = dataset.map_batches(worker, fn_constructor_args=args, batch_size=config.batch_size,
                                  batch_format="pyarrow", compute=compute,
                                  num_cpus=config.num_cpus_per_actor, num_gpus=num_gpus)
    dataset.context.checkpoint_config = make_checkpoint_config(checkpoint, config.id_column,
                                                               config.prompt_column)
    dataset.context.enable_progress_bars = False  # our own progress line instead (see progress.py)
    return dataset


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_job(config: JobConfig, address: str | None = None, log=print) -> dict:
    """Generate for every input id not yet committed to the output; returns the run's summary."""
    from jobs.output import check_output_folder, clear_complete_marker, is_known_complete, write_complete_marker

    start = time.perf_counter()
    corpus = open_corpus(config.input, config.prompt_column, config.id_column, config.split)
    output = resolve(config.output)
    checkpoint = resolve(config.checkpoint) if config.checkpoint else checkpoint_location(output)
    check_output_folder(output, checkpoint)
    committed = trusted_committed_output(output, checkpoint, log)
    num_already_done = committed.num_rows
    run_id = new_run_id()
    key = job_key(corpus, config)
    if is_known_complete(checkpoint, key, committed):
        # No Ray, no checkpoint load, no engine: a finished job's rerun is a few file reads.
        log(f"[generate] nothing to do: a finished run committed every id of {redacted(config.input)} "
            f"({num_already_done} rows, each file checked); no engine started")
        return _finish({}, start, config, run_id, committed, output, checkpoint, log)
    check_writable(output, "--output")
    check_writable(checkpoint, "--checkpoint" if config.checkpoint else "--output (its checkpoint folder)")
    if config.serve_url:
        check_server(config.serve_url)
    if config.num_samples > 1 and config.temperature == 0:
        log(f"[generate] note: --num-samples {config.num_samples} with temperature 0 (greedy) gives "
            "identical samples unless rows set their own temperature")
    log(f"[generate] run {run_id}: input {redacted(config.input)} ({describe(corpus)}); "
        f"output {redacted(config.output)}; "
        f"{num_already_done} rows committed by earlier runs")
    clear_complete_marker(checkpoint)
    is_ray_owner = connect_ray(config, address, log)
    try:
        totals = _run(corpus, config, output, checkpoint, run_id, log, num_already_done)
    finally:
        if is_ray_owner:
            import ray
            ray.shutdown()
    write_complete_marker(checkpoint, key, num_already_done + int(totals.get("num_rows", 0)))
    return _finish(totals, start, config, run_id, committed, output, checkpoint, log)


def job_key(corpus, config: JobConfig) -> dict:
    """What decides which (id, sample) rows a job owes: its input files and id settings."""
    return {"input": corpus.fingerprint(), "id_column": config.id_column,
            "prompt_column": config.prompt_column, "split": config.split, "num_samples": config.num_samples}


def _finish(totals: dict, start: float, config: JobConfig, run_id: str, committed, output, checkpoint, log) -> dict:
    from jobs.progress import summary_line

    summary = _summary(totals, time.perf_counter() - start, config, run_id, committed.num_rows, output, checkpoint)
    summary.update(num_damaged_files=len(committed.damaged), num_damaged_rows=committed.num_damaged_rows)
    log("[generate] done: " + summary_line(summary))
    log("SUMMARY " + json.dumps(summary, sort_keys=True))
    return summary


def trusted_committed_output(output, checkpoint, log):
    """The earlier runs' committed output, checked file by file: a committed write whose file is
    missing, unreadable or short is removed (files and checkpoint) so its ids are generated again."""
    from jobs.output import remove_damaged_writes, verify_committed_output

    committed = verify_committed_output(output, checkpoint)
    for write in committed.damaged:
        rows = "its rows" if write.num_rows is None else f"its {write.num_rows} rows"
        log(f"[generate] committed write {write.name}: {write.reason}; "
            f"removing it, {rows} will be generated again")
    remove_damaged_writes(output, checkpoint, committed.damaged)
    return committed


def _run(corpus, config: JobConfig, output, checkpoint, run_id: str, log, num_already_done: int) -> dict:
    import ray
    from ray.data.datasource import FilenameProvider

    from jobs.ledger import LEDGER_NAME_PREFIX, IdRegistry, JobLedger
    from jobs.progress import ProgressReporter

    num_expected_rows = corpus.num_rows * config.num_samples - num_already_done if corpus.num_rows else None

    # num_cpus=0: bookkeeping actors must never wait for (or hold) a CPU the engines need.
    ledger = ray.remote(num_cpus=0)(JobLedger).options(name=LEDGER_NAME_PREFIX + run_id).remote()
    registries = [ledger] + [ray.remote(num_cpus=0)(IdRegistry).remote()
                             for _ in range(config.max_actors // IDS_SHARD_PER_ACTORS)]
    context = ray.data.DataContext.get_current()
    # Ray Data's own progress (and that of the checkpoint load it runs) would repeat ours.
    were_progress_bars_enabled, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        dataset = build_dataset(corpus, config, ledger, registries, checkpoint)
        with ProgressReporter(ledger, config.progress_interval_s, log, num_expected_rows,
                              _starting_what(config, num_already_done)):
            dataset.write_parquet(output.path, filesystem=output.filesystem,
                                  filename_provider=FilenameProvider(dataset_uuid=run_id, file_format="parquet"),
                                  min_rows_per_file=config.min_rows_per_file)
        return ray.get(ledger.snapshot.remote())
    finally:
        context.enable_progress_bars = were_progress_bars_enabled
        for actor in registries:
            ray.kill(actor)


def _starting_what(config: JobConfig, num_already_done: int) -> str:
    """What the progress line names until the first worker is up (an engine loads for minutes)."""
    what = (f"starting workers (Serve at {config.serve_url})" if config.serve_url
            else f"starting engine ({config.engine.backend}, {config.engine.model})")
    return what + ("; Ray loads the checkpoint's ids meanwhile" if num_already_done else "")


def _summary(totals: dict, wall_s: float, config: JobConfig, run_id: str, num_already_done: int,
             output, checkpoint) -> dict:
    from jobs.progress import summarize

    summary = summarize(totals, wall_s)
    summary.update(run_id=run_id, num_already_done=num_already_done, output=redacted(output.uri),
                   checkpoint=redacted(checkpoint.uri), mode="serve" if config.serve_url else "actors",
                   backend=None if config.serve_url else config.engine.backend,
                   # ru_maxrss is in KiB on Linux: the driver's own peak, not the workers'.
                   driver_peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return summary


def parse_args(argv: list[str] | None = None) -> tuple[JobConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help=".jsonl / .parquet file or folder, or a datasets "
                   "folder; a local path or a URI (s3://, gs://, file://, hdfs://)")
    p.add_argument("--output", required=True, help="output folder (path or URI) of parquet files")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: OUTPUT.checkpoint)")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--id-column", default="id", help="if absent, ids are prompt hashes")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible sampled runs)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--num-actors", type=int, default=None, help="a fixed pool (= --min-actors = --max-actors)")
    p.add_argument("--min-actors", type=int, default=1)
    p.add_argument("--max-actors", type=int, default=None, help="default: --min-actors")
    p.add_argument("--batches-per-actor", type=int, default=DEFAULT_BATCHES_PER_ACTOR,
                   help="batch calls in flight per actor")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--min-rows-per-file", type=int, default=256)
    p.add_argument("--serve-url", default=None, help="send prompts to a running Serve deployment")
    p.add_argument("--http-concurrency", type=int, default=8, help="requests in flight per actor")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--ray-num-cpus", type=int, default=4, help="CPUs of the local Ray (no cluster given)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--verbose", action="store_true",
                   help="print the workers' and engines' own logs here (default: in Ray's log files)")
    add_spec_arguments(p, BackendSpec())  # --backend, --model, --guard, --max-num-seqs...
    args = p.parse_args(argv)
    min_actors = args.num_actors or args.min_actors
    max_actors = args.num_actors or args.max_actors or min_actors
    config = JobConfig(
        input=args.input, output=args.output, checkpoint=args.checkpoint,
        prompt_column=args.prompt_column, id_column=args.id_column, split=args.split,
        engine=spec_from_namespace(args, BackendSpec()),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, stop=tuple(args.stop), num_samples=args.num_samples,
        min_actors=min_actors, max_actors=max_actors, batches_per_actor=args.batches_per_actor,
        batch_size=args.batch_size,
        num_cpus_per_actor=args.num_cpus_per_actor, num_gpus_per_actor=args.num_gpus_per_actor,
        min_rows_per_file=args.min_rows_per_file, serve_url=args.serve_url,
        http_concurrency=args.http_concurrency, progress_interval_s=args.progress_interval,
        ray_num_cpus=args.ray_num_cpus, verbose=args.verbose)
    return config, args


def main(argv: list[str] | None = None) -> int:
    try:
        config, args = parse_args(argv)
    except ValueError as e:  # a bad setting: one line, before anything starts
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    shown = asdict(config) | {name: redacted(getattr(config, name)) for name in ("input", "output")}
    print("[generate] config " + json.dumps(shown, sort_keys=True), flush=True)
    try:
        run_job(config, address=args.address, log=lambda line: print(line, flush=True))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("[generate] interrupted; committed rows are saved — rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
