"""Running totals of a generation job and the periodic progress line printed from them.

A plain line every few seconds, not a terminal bar: job logs (`ray job logs`) are files, where a
redrawn bar turns into thousands of lines.
"""
from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc


class Progress:
    def __init__(self, num_total: int, interval_s: float = 10.0, log=print):
        self.num_total = num_total
        self.interval_s = interval_s
        self.log = log
        self.start = time.perf_counter()
        self.last_log = self.start
        self.num_rows = 0
        self.num_errors = 0
        self.num_guard_stops = 0
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0

    def update(self, block: pa.Table) -> None:
        self.num_rows += block.num_rows
        self.num_errors += block.num_rows - pc.count(block.column("error"), mode="only_null").as_py()
        self.num_guard_stops += pc.sum(block.column("is_guard_stop")).as_py() or 0
        self.num_prompt_tokens += pc.sum(block.column("num_prompt_tokens")).as_py() or 0
        self.num_generated_tokens += pc.sum(block.column("num_generated_tokens")).as_py() or 0
        now = time.perf_counter()
        if now - self.last_log >= self.interval_s:
            self.last_log = now
            self.log("[generate] " + self.line(now - self.start))

    def line(self, elapsed_s: float) -> str:
        elapsed_s = max(elapsed_s, 1e-9)
        percent = 100.0 * self.num_rows / self.num_total if self.num_total else 100.0
        return (f"{self.num_rows}/{self.num_total} rows ({percent:.1f}%) | "
                f"{self.num_rows / elapsed_s:.2f} rows/s | "
                f"{self.num_generated_tokens / elapsed_s:.1f} gen tok/s | "
                f"guard stops {self.num_guard_stops} | errors {self.num_errors} | {elapsed_s:.0f}s")

    def log_shard(self, path, num_rows: int) -> None:
        self.log(f"[generate] wrote {path.name} ({num_rows} rows); {self.num_rows}/{self.num_total} done")

    def summary(self, wall_s: float) -> dict:
        wall_s = max(wall_s, 1e-9)
        return {"num_rows": self.num_rows, "num_to_generate": self.num_total,
                "num_errors": self.num_errors, "num_guard_stops": self.num_guard_stops,
                "num_prompt_tokens": self.num_prompt_tokens,
                "num_generated_tokens": self.num_generated_tokens, "wall_s": round(wall_s, 3),
                "rows_per_s": round(self.num_rows / wall_s, 3),
                "generated_tokens_per_s": round(self.num_generated_tokens / wall_s, 2)}

    @staticmethod
    def summary_line(summary: dict) -> str:
        return (f"{summary['num_rows']} rows ({summary['num_errors']} errors,"
                f" {summary['num_guard_stops']} guard stops),"
                f" {summary['num_generated_tokens']} generated tokens"
                f" + {summary['num_prompt_tokens']} prompt tokens,"
                f" {summary['wall_s']:.1f}s wall, {summary['rows_per_s']:.2f} rows/s,"
                f" {summary['generated_tokens_per_s']:.1f} gen tok/s;"
                f" {summary['num_already_done']} already done before this run,"
                f" {summary['num_shards_written']} shards written")
