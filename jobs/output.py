"""The job's output folder and its checkpoint: written by the workers through Ray Data's parquet
sink with Ray Data's own checkpointing (`ray.data.checkpoint`), read back here.

Exactly once, by id, even across crashes: each write task first records the ids it is about to
write as a *pending* checkpoint file, then writes its parquet file, then renames the checkpoint
to committed. A rerun deletes the output files of pending checkpoints (their writer died midway)
and skips, right after the read, every id in a committed one; rows that were in flight in a
dead actor or a killed driver were never committed, so they are generated again, once. The ids
are loaded and searched by Ray's checkpoint actors, never listed on the driver.

Output files are named `<run id>_<write uuid>_<task>.parquet`; a run appends, never overwrites.
The committed checkpoint of a write has the same name in the checkpoint folder.

A checkpoint only says a file was written, not that it is still there: before a rerun trusts
it, `verify_committed_output` checks each committed write's output (the files exist, their
footers read, their row count is the checkpoint's), and `remove_damaged_writes` deletes the
output files and the checkpoint of any write that fails, so its ids are generated again.
"""
from __future__ import annotations

import bisect
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_filter import NumpyArrayBasedCheckpointFilter

from jobs.corpus import with_row_ids
from jobs.storage import Location, redacted, resolve

PENDING_CHECKPOINT_SUFFIX = ".pending.parquet"  # ray.data.checkpoint.checkpoint_writer's
PARQUET_SUFFIX = ".parquet"
FOOTER_READ_THREADS = 16  # footers are one small read each; on an object store, latency-bound


class CorpusCheckpointConfig(CheckpointConfig):
    """Ray's CheckpointConfig plus the prompt column, from which the filter below derives the
    ids of a corpus without an id column."""

    def __init__(self, *, prompt_column: str, **kwargs):
        super().__init__(**kwargs)
        self.prompt_column = prompt_column


class CorpusCheckpointFilter(NumpyArrayBasedCheckpointFilter):
    """Ray's sorted-numpy filter, with two changes: a block without the id column gets its
    prompt-hash ids first (they must exist before the filter can skip them), and null ids pass
    through (numpy cannot order None against ids; prepare_rows drops those rows)."""

    def filter_rows_for_block(self, block):
        # Readers may yield pandas blocks (Ray's HuggingFaceDatasource does); ids are Arrow here.
        block = BlockAccessor.for_block(block).to_arrow()
        block = with_row_ids(block, self.id_column, self.ckpt_config.prompt_column)
        done_ids = self.checkpointed_ids
        if done_ids.shape[0] == 0 or block.num_rows == 0:
            return block
        ids = block.column(self.id_column)
        is_numeric = pa.types.is_integer(ids.type) or pa.types.is_floating(ids.type)
        if is_numeric != (done_ids.dtype.kind in "iuf") and not pa.types.is_null(ids.type):
            # numpy would turn "1" into 1 and match it: the ids must be of one type.
            raise ValueError(f"the {self.id_column!r} values of this corpus ({ids.type}) are not of the "
                             f"type the checkpoint holds ({done_ids.dtype}); was the input changed?")
        is_valid = ids.is_valid().to_numpy(zero_copy_only=False)
        valid_ids = np.asarray(ids.drop_null().to_pylist(), dtype=done_ids.dtype)
        positions = np.searchsorted(done_ids, valid_ids)
        in_range = positions < done_ids.shape[0]
        matched = np.zeros(valid_ids.shape[0], dtype=bool)
        matched[in_range] = done_ids[positions[in_range]] == valid_ids[in_range]
        is_done = np.zeros(block.num_rows, dtype=bool)
        is_done[is_valid] = matched
        return block.filter(pa.array(~is_done))


def make_checkpoint_config(checkpoint: Location, id_column: str, prompt_column: str) -> CorpusCheckpointConfig:
    # Kept after success: a rerun of a finished job must find every id done.
    return CorpusCheckpointConfig(id_column=id_column, checkpoint_path=checkpoint.path,
                                  override_filesystem=checkpoint.filesystem,
                                  delete_checkpoint_on_success=False,
                                  checkpoint_filter_cls=CorpusCheckpointFilter,
                                  prompt_column=prompt_column)


def committed_checkpoint_files(checkpoint: Location) -> list[str]:
    return [info.path for info in checkpoint.list_files()
            if info.path.endswith(".parquet") and not info.path.endswith(PENDING_CHECKPOINT_SUFFIX)]


@dataclass(frozen=True)
class DamagedWrite:
    """A committed write whose output cannot be trusted."""

    checkpoint_file: str
    data_files: tuple[str, ...]  # its output files that exist (possibly none)
    num_rows: int | None  # the rows its checkpoint holds; None if the checkpoint is unreadable
    reason: str

    @property
    def name(self) -> str:  # the write task's, which its output files' names start with
        return posixpath.basename(self.checkpoint_file)[:-len(PARQUET_SUFFIX)]


@dataclass(frozen=True)
class CommittedOutput:
    num_rows: int  # rows of the committed writes whose output checks out
    damaged: tuple[DamagedWrite, ...]

    @property
    def num_damaged_rows(self) -> int:
        return sum(write.num_rows or 0 for write in self.damaged)


def _footer_rows(filesystem, path: str) -> tuple[int | None, str | None]:
    """(row count, None) from the parquet footer, or (None, why the file cannot be read)."""
    try:
        with filesystem.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows, None
    except (OSError, pa.ArrowException) as e:
        return None, f"{type(e).__name__}: {e}"


def _files_by_write(data_paths: list[str], write_names: list[str]) -> dict[str, list[str]]:
    """Output files of each write: those whose name starts with the write's name (Ray names the
    checkpoint and the data file after the write task, and a task may split its file)."""
    ordered = sorted(write_names)
    groups: dict[str, list[str]] = {name: [] for name in write_names}
    for path in data_paths:
        basename = posixpath.basename(path)
        # Task indexes are zero-padded, so no write's name is a prefix of another's: the
        # greatest name not above the file's is the only candidate.
        index = bisect.bisect_right(ordered, basename) - 1
        if index >= 0 and basename.startswith(ordered[index]):
            groups[ordered[index]].append(path)
    return groups


def _judge_write(checkpoint_rows, data_rows: dict) -> str | None:
    """Why a committed write's output is damaged, or None when it checks out."""
    num_rows, error = checkpoint_rows
    if error is not None:
        return f"its checkpoint file is unreadable ({error})"
    if not data_rows:
        return "its output file is missing"
    for path, (_, file_error) in data_rows.items():
        if file_error is not None:
            return f"{posixpath.basename(path)} is unreadable ({file_error})"
    num_written = sum(rows for rows, _ in data_rows.values())
    if num_written != num_rows:
        return f"its output holds {num_written} rows, its checkpoint {num_rows}"
    return None


def verify_committed_output(output: Location, checkpoint: Location) -> CommittedOutput:
    """Checks every committed write against its output files, reading footers only (a file cut
    short loses its footer; reading every page would download the whole output)."""
    checkpoint_files = committed_checkpoint_files(checkpoint)
    if not checkpoint_files:
        return CommittedOutput(0, ())
    names = [posixpath.basename(path)[:-len(PARQUET_SUFFIX)] for path in checkpoint_files]
    data_paths = [info.path for info in output.list_files() if info.path.endswith(PARQUET_SUFFIX)]
    groups = _files_by_write(data_paths, names)
    owned = [path for paths in groups.values() for path in paths]
    with ThreadPoolExecutor(FOOTER_READ_THREADS) as pool:
        checkpoint_rows = list(pool.map(lambda p: _footer_rows(checkpoint.filesystem, p), checkpoint_files))
        data_rows = dict(zip(owned, pool.map(lambda p: _footer_rows(output.filesystem, p), owned)))
    num_rows, damaged = 0, []
    for path, name, rows in zip(checkpoint_files, names, checkpoint_rows):
        files = {p: data_rows[p] for p in groups[name]}
        reason = _judge_write(rows, files)
        if reason is None:
            num_rows += rows[0]
        else:
            damaged.append(DamagedWrite(path, tuple(files), rows[0], reason))
    return CommittedOutput(num_rows, tuple(damaged))


def _delete_if_present(filesystem, path: str) -> None:
    try:
        filesystem.delete_file(path)
    except FileNotFoundError:
        pass


def remove_damaged_writes(output: Location, checkpoint: Location, damaged) -> None:
    """Deletes the output files, then the checkpoint, of each damaged write, so that its ids are
    generated again and the output folder reads. In that order: a crash in between leaves a
    checkpoint without output, which the next run finds and removes."""
    for write in damaged:
        for path in write.data_files:
            _delete_if_present(output.filesystem, path)
        _delete_if_present(checkpoint.filesystem, write.checkpoint_file)


COMPLETE_MARKER = "_complete.json"  # in the checkpoint folder: '_' keeps Ray's readers off it


def _marker_path(checkpoint: Location) -> str:
    return posixpath.join(checkpoint.path, COMPLETE_MARKER)


def read_complete_marker(checkpoint: Location) -> dict | None:
    try:
        with checkpoint.filesystem.open_input_stream(_marker_path(checkpoint)) as f:
            return json.loads(f.read())
    except (OSError, pa.ArrowException, ValueError):  # absent or unreadable: not known complete
        return None


def write_complete_marker(checkpoint: Location, job_key: dict, num_rows: int) -> None:
    """Written after a run finished: every id of this input is committed."""
    checkpoint.filesystem.create_dir(checkpoint.path, recursive=True)
    with checkpoint.filesystem.open_output_stream(_marker_path(checkpoint)) as f:
        f.write(json.dumps({"job": job_key, "num_rows": num_rows}).encode())


def clear_complete_marker(checkpoint: Location) -> None:
    """Before a run writes: should it not finish, the marker must not claim the output complete."""
    if checkpoint.exists():
        _delete_if_present(checkpoint.filesystem, _marker_path(checkpoint))


def is_known_complete(checkpoint: Location, job_key: dict, committed: CommittedOutput) -> bool:
    """A finished run of this very input and id settings, whose committed rows all check out."""
    marker = read_complete_marker(checkpoint)
    return (marker is not None and not committed.damaged and marker.get("job") == job_key
            and marker.get("num_rows") == committed.num_rows)


def check_output_folder(output: Location, checkpoint: Location) -> None:
    """Refuse an output folder with files but no checkpoint: appending there would add rows that
    nothing can tell apart from what is already in it."""
    if output.exists() and output.list_files() and not checkpoint.exists():
        raise ValueError(f"{redacted(output.uri)} already holds files but has no checkpoint at {checkpoint.path}: "
                         f"not an output this job wrote (or its checkpoint was deleted); "
                         f"use a new --output")


def read_output(uri, columns: list[str] | None = None) -> pa.Table:
    """All output files as one table (order not meaningful). For tests and small outputs: it
    reads everything into this process."""
    location = uri if isinstance(uri, Location) else resolve(str(uri))
    paths = [info.path for info in location.list_files() if info.path.endswith(".parquet")]
    tables = []
    for path in paths:
        with location.filesystem.open_input_file(path) as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")
