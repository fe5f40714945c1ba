"""The job's output folder and its checkpoint: written by the workers through Ray Data's parquet
sink with Ray Data's own checkpointing (`ray.data.checkpoint`), read back here.

Exactly once, by id, even across crashes: each write task first records the ids it is about to
write as a *pending* checkpoint file, then writes its parquet file, then renames the checkpoint
to committed. A rerun deletes the output files of pending checkpoints (their writer died midway)
and skips, right after the read, every id in a committed one; rows that were in flight in a
dead actor or a killed driver were never committed, so they are generated again, once. The ids
are loaded and searched by Ray's checkpoint actors, never listed on the driver.

Output files are named `<run id>_<write uuid>_<task>.parquet`; a run appends, never overwrites.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_filter import NumpyArrayBasedCheckpointFilter

from jobs.corpus import with_row_ids
from jobs.storage import Location, redacted, resolve

PENDING_CHECKPOINT_SUFFIX = ".pending.parquet"  # ray.data.checkpoint.checkpoint_writer's


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


def count_checkpointed_rows(checkpoint: Location) -> int:
    """Rows committed by earlier runs, from the parquet footers (one small read per file)."""
    total = 0
    for path in committed_checkpoint_files(checkpoint):
        with checkpoint.filesystem.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


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
