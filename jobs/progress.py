"""The periodic progress line and the final summary, from the totals the workers report to the
run's JobLedger actor (the driver never sees the rows themselves).

A plain line every few seconds, not a terminal bar: job logs (`ray job logs`) are files, where a
redrawn bar turns into thousands of lines.
"""
from __future__ import annotations

import threading
import time

HEARTBEAT_S = 30.0
SUMMARY_COUNTERS = ("num_rows", "num_errors", "num_guard_stops", "num_prompt_tokens",
                    "num_generated_tokens", "num_rows_read", "num_missing_ids", "num_duplicate_ids",
                    "num_worker_starts", "num_actor_restarts", "num_batch_retries")


def progress_line(totals: dict, elapsed_s: float, num_expected_rows: int | None,
                  starting: str = "starting engine") -> str:
    elapsed_s = max(elapsed_s, 1e-9)
    num_rows = totals.get("num_rows", 0)
    if not num_rows and not totals.get("num_worker_starts"):
        # No worker is up yet (an engine loads for a minute or more): say so, not "0 rows".
        of = f" for {num_expected_rows} rows" if num_expected_rows else ""
        return f"{starting}{of} | {elapsed_s:.0f}s"
    done = f"{num_rows} rows"
    if num_expected_rows:
        done += f" of ~{num_expected_rows} ({100.0 * num_rows / num_expected_rows:.0f}%)"
    line = (f"{done} | {num_rows / elapsed_s:.2f} rows/s | "
            f"{totals.get('num_generated_tokens', 0) / elapsed_s:.1f} gen tok/s | "
            f"guard stops {totals.get('num_guard_stops', 0)} | errors {totals.get('num_errors', 0)}")
    if totals.get("num_actor_restarts") or totals.get("num_batch_retries"):
        line += (f" | actor restarts {totals.get('num_actor_restarts', 0)},"
                 f" batch retries {totals.get('num_batch_retries', 0)}")
    return line + f" | {elapsed_s:.0f}s"


class ProgressReporter:
    """A daemon thread that logs the ledger's totals every `interval_s` while the job runs."""

    def __init__(self, ledger, interval_s: float, log, num_expected_rows: int | None = None,
                 starting: str = "starting engine"):
        self.ledger = ledger
        self.starting = starting
        self.interval_s = interval_s
        self.log = log
        self.num_expected_rows = num_expected_rows
        self.start = time.perf_counter()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-progress", daemon=True)

    def __enter__(self) -> ProgressReporter:
        self.log("[generate] " + progress_line({}, 0.0, self.num_expected_rows, self.starting))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import ray

        last_totals, last_log = None, self.start  # the "starting" line is logged on entry
        while not self._stopped.wait(self.interval_s):
            try:
                totals = ray.get(self.ledger.snapshot.remote(), timeout=self.interval_s)
            except Exception:  # a slow ledger answer only delays a progress line
                continue
            now = time.perf_counter()
            # Unchanged totals (actors still loading their model) get a line now and then only.
            totals.pop("num_batches_in_flight", None)
            # Until a worker is up, rows being read change nothing the line says.
            state = totals if totals.get("num_rows") or totals.get("num_worker_starts") else None
            if state == last_totals and now - last_log < HEARTBEAT_S:
                continue
            last_totals, last_log = state, now
            self.log("[generate] " + progress_line(totals, now - self.start, self.num_expected_rows, self.starting))


def summarize(totals: dict, wall_s: float) -> dict:
    wall_s = max(wall_s, 1e-9)
    summary = {name: int(totals.get(name, 0)) for name in SUMMARY_COUNTERS}
    summary.update(wall_s=round(wall_s, 3), rows_per_s=round(summary["num_rows"] / wall_s, 3),
                   generated_tokens_per_s=round(summary["num_generated_tokens"] / wall_s, 2),
                   example_duplicate_ids=totals.get("example_duplicate_ids", []))
    return summary


def summary_line(summary: dict) -> str:
    line = (f"{summary['num_rows']} rows ({summary['num_errors']} errors,"
            f" {summary['num_guard_stops']} guard stops),"
            f" {summary['num_generated_tokens']} generated tokens"
            f" + {summary['num_prompt_tokens']} prompt tokens,"
            f" {summary['wall_s']:.1f}s wall, {summary['rows_per_s']:.2f} rows/s,"
            f" {summary['generated_tokens_per_s']:.1f} gen tok/s;"
            f" {summary['num_already_done']} rows done by earlier runs;"
            f" workers started {summary['num_worker_starts']}"
            f" (actor restarts {summary['num_actor_restarts']}, batch retries {summary['num_batch_retries']})")
    if summary["num_duplicate_ids"]:
        line += (f"; {summary['num_duplicate_ids']} repeated ids skipped"
                 f" (e.g. {', '.join(summary['example_duplicate_ids'])})")
    if summary["num_missing_ids"]:
        line += f"; {summary['num_missing_ids']} rows without id skipped"
    if summary.get("num_damaged_files"):
        line += (f"; {summary['num_damaged_files']} damaged committed files removed,"
                 f" their {summary['num_damaged_rows']} rows generated again")
    return line
