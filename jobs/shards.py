"""The job's output folder: parquet shards written atomically, read back to resume.

A shard appears under its final name `part-XXXXX.parquet` only once it is complete (written to a
hidden temp file, then renamed in the same folder — atomic on POSIX), so a crash or Ctrl-C can lose
rows still in flight, never leave a torn file. A rerun reads the ids of the shards present and
skips them: no duplicates, nothing lost.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),  # null when the input prompt was not text
    ("completion", pa.string()),  # null on error rows
    ("completion_ids", pa.list_(pa.int64())),  # the completion's token ids (null in Serve mode)
    ("finish_reason", pa.string()),  # eos | length | stop | guard (null on error rows)
    ("num_prompt_tokens", pa.int64()),
    ("num_generated_tokens", pa.int64()),  # tokens decoded, including any the guard cut
    ("is_guard_stop", pa.bool_()),
    ("latency_s", pa.float64()),
    ("error", pa.string()),  # null, or why this prompt could not be served
])
SHARD_PATTERN = re.compile(r"^part-(\d{5,})\.parquet$")
TMP_PREFIX = ".tmp-"


def shard_paths(output_dir: str | Path) -> list[Path]:
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return []
    return sorted(p for p in output_dir.iterdir() if SHARD_PATTERN.match(p.name))


def remove_stale_tmp_files(output_dir: str | Path) -> int:
    """Temp files left by a killed run hold no finished shard; their rows are simply redone."""
    stale = [p for p in Path(output_dir).glob(f"{TMP_PREFIX}*")] if Path(output_dir).exists() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def read_done_ids(output_dir: str | Path) -> set[str]:
    done: set[str] = set()
    for path in shard_paths(output_dir):
        done.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return done


def read_output(output_dir: str | Path) -> pa.Table:
    """All shards as one table (order not meaningful)."""
    tables = [pq.read_table(p, schema=OUTPUT_SCHEMA) for p in shard_paths(output_dir)]
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


class ShardWriter:
    """Numbers shards after the highest one already present, so reruns never overwrite."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        existing = [int(SHARD_PATTERN.match(p.name).group(1)) for p in shard_paths(self.output_dir)]
        self.next_index = max(existing, default=-1) + 1
        self.num_shards_written = 0

    def write(self, table: pa.Table) -> Path:
        path = self.output_dir / f"part-{self.next_index:05d}.parquet"
        tmp_path = self.output_dir / f"{TMP_PREFIX}{path.name}"
        pq.write_table(table.cast(OUTPUT_SCHEMA), tmp_path)
        with open(tmp_path, "rb") as f:  # the data must be on disk before the name says "done"
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        self.next_index += 1
        self.num_shards_written += 1
        return path


def error_row(row_id: str, prompt: str | None, message: str) -> dict:
    return {"id": row_id, "prompt": prompt, "completion": None, "completion_ids": None, "finish_reason": None,
            "num_prompt_tokens": None, "num_generated_tokens": None, "is_guard_stop": False,
            "latency_s": None, "error": message}


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
