"""Read a prompt corpus (jsonl, parquet, or a `datasets` folder saved with save_to_disk) into rows.

Every row gets a string id: the id column's value as text, or — when the corpus has no id column —
`sha1-<16 hex>` of the prompt, stable across reruns and row order (so resume works), at the price
that identical prompts share one id. Ids must be unique: a repeated id keeps its first row and the
repeat is counted in `Corpus.num_duplicates` (reported by the job, never processed). The prompt
value is kept as is; a value that is not text becomes an error row later, not a crash here.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: object  # str for a usable prompt; anything else becomes an error row


@dataclass
class Corpus:
    rows: list[PromptRow]
    num_input_rows: int
    is_id_derived: bool  # True: ids are prompt hashes (the corpus had no id column)
    duplicate_ids: list[str] = field(default_factory=list)
    num_missing_ids: int = 0  # rows whose id value was null: skipped, no stable id to resume by

    @property
    def num_duplicates(self) -> int:
        return len(self.duplicate_ids)


def prompt_hash_id(prompt: object) -> str:
    text = prompt if isinstance(prompt, str) else f"<{type(prompt).__name__}>{prompt!r}"
    return "sha1-" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object per line")
            records.append(record)
    return records


def _read_table_columns(table: pa.Table, columns: list[str]) -> list[dict]:
    present = [c for c in columns if c in table.column_names]
    return table.select(present).to_pylist()


def _read_hf_dataset(path: Path, columns: list[str], split: str | None) -> list[dict]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            if len(dataset) != 1:
                raise ValueError(f"{path} has splits {list(dataset)}; pick one with --split")
            split = next(iter(dataset))
        dataset = dataset[split]
    present = [c for c in columns if c in dataset.column_names]
    return dataset.select_columns(present).to_list()


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in
                                 ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_records(path: str | Path, columns: list[str], split: str | None = None) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if is_hf_dataset_dir(path):
        return _read_hf_dataset(path, columns, split)
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        import pyarrow.parquet as pq

        return _read_table_columns(pq.read_table(path), columns)
    raise ValueError(f"cannot read {path}: expected .jsonl, .parquet (file or folder) or a "
                     f"datasets folder saved with save_to_disk")


def load_corpus(path: str | Path, prompt_column: str = "prompt", id_column: str = "id",
                split: str | None = None) -> Corpus:
    records = read_records(path, [id_column, prompt_column], split)
    if records and not any(prompt_column in r for r in records):
        raise ValueError(f"{path} has no column {prompt_column!r}")
    is_id_derived = not any(id_column in r for r in records)
    corpus = Corpus(rows=[], num_input_rows=len(records), is_id_derived=is_id_derived)
    seen: set[str] = set()
    for record in records:
        prompt = record.get(prompt_column)
        if is_id_derived:
            row_id = prompt_hash_id(prompt)
        elif record.get(id_column) is None:
            corpus.num_missing_ids += 1
            continue
        else:
            row_id = str(record[id_column])
        if row_id in seen:
            corpus.duplicate_ids.append(row_id)
            continue
        seen.add(row_id)
        corpus.rows.append(PromptRow(row_id, prompt))
    return corpus
