"""The job's input as a Ray Data dataset: read on the workers, never gathered on the driver.

`open_corpus` checks the input before any work starts (the path or URI resolves and exists, the
format is known, the first file opens and has the prompt column, the split exists, no input
column would be overwritten by a generated one) and returns a `Corpus` whose `read()` is a Ray
Data read: `read_parquet` for parquet, Ray's `HuggingFaceDatasource` for a `datasets` folder
saved with `save_to_disk`, and `JsonlDatasource` (below) for JSON lines. All three are Read
operators, which is what Ray Data's checkpointing filters on.

Ids: the id column's value (its own type for parquet and datasets; text for JSON lines, which have
no schema to keep ids of one type). Without an id column the id is `sha1-<16 hex>` of the prompt,
stable across reruns and row order, so resume works; identical prompts then share one id.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import pyarrow as pa

from jobs.rows import (
    GENERATED_SCHEMA,
    INPUT_ERROR_COLUMN,
    INTERNAL_PREFIX,
    PROMPT_UTF8_COLUMN,
    ROW_SETTING_TYPES,
)
from jobs.storage import Location, redacted, resolve

JSONL_EXTENSIONS = ("jsonl", "json", "ndjson", "jsonl.gz", "json.gz", "ndjson.gz")
HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# JSON lines carry no schema: the column types are those of the first lines of the first file.
SCHEMA_SAMPLE_LINES = 1000
JSONL_ROWS_PER_BLOCK = 1024


def prompt_hash_id(prompt: object) -> str:
    text = prompt if isinstance(prompt, str) else f"<{type(prompt).__name__}>{prompt!r}"
    return "sha1-" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def with_row_ids(block: pa.Table, id_column: str, prompt_column: str) -> pa.Table:
    """Adds the prompt-hash id column to a block that has no id column (parquet / datasets
    corpora without ids; the JSON lines reader adds its own, from the values as parsed)."""
    if id_column in block.column_names:
        return block
    prompts = block.column(prompt_column).to_pylist() if prompt_column in block.column_names \
        else [None] * block.num_rows
    return block.append_column(id_column, pa.array([prompt_hash_id(p) for p in prompts], pa.string()))


# ---- JSON lines ------------------------------------------------------------------------------
def _json_type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _fit(value: object, arrow_type: pa.DataType) -> tuple[object, str | None]:
    """(value as the column holds it, None) or (None, why it does not fit). Checked by Python
    type: pyarrow itself would silently truncate 1.5 into an int64 column."""
    if value is None:
        return None, None
    if pa.types.is_string(arrow_type):
        if isinstance(value, str):
            return (value, None) if _is_utf8(value) else (None, "text that is not valid Unicode")
        return json.dumps(value), None  # a column of mixed JSON types is kept as JSON text
    if pa.types.is_integer(arrow_type):
        if isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63:
            return value, None
    elif pa.types.is_floating(arrow_type):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
    elif pa.types.is_boolean(arrow_type):
        if isinstance(value, bool):
            return value, None
    elif pa.types.is_list(arrow_type) and pa.types.is_string(arrow_type.value_type):
        if isinstance(value, str):
            value = [value]  # `"stop": "\n\n"` and `"stop": ["\n\n"]` mean the same
        if isinstance(value, list) and all(isinstance(v, str) and _is_utf8(v) for v in value):
            return value, None
    else:  # nested values: pyarrow checks them
        try:
            pa.array([value], type=arrow_type)
            return value, None
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeEncodeError):
            pass
    return None, f"{_json_type_name(value)} {json.dumps(value)[:40]} is not {arrow_type}"


@dataclass(frozen=True)
class JsonlLayout:
    """Column names and types of a JSON lines corpus, fixed up front so that every block (and
    every output file) has the same schema."""

    columns: tuple[tuple[str, pa.DataType], ...]
    prompt_column: str
    id_column: str
    is_id_derived: bool

    @classmethod
    def infer(cls, records: list[dict], prompt_column: str, id_column: str) -> JsonlLayout:
        names: dict[str, None] = {}
        for record in records:
            names.update(dict.fromkeys(record))
        is_id_derived = id_column not in names
        names.update(dict.fromkeys([id_column, prompt_column]))
        columns = []
        for name in names:
            if name in (prompt_column, id_column):
                arrow_type = pa.string()
            elif name in ROW_SETTING_TYPES and name not in ("guard", "language"):
                arrow_type = ROW_SETTING_TYPES[name]
            else:
                arrow_type = _infer_type([r.get(name) for r in records])
            columns.append((name, arrow_type))
        return cls(tuple(columns), prompt_column, id_column, is_id_derived)

    def to_table(self, records: list[dict]) -> pa.Table:
        num_rows = len(records)
        input_errors: list[str | None] = [None] * num_rows
        prompt_utf8: list[bytes | None] = [None] * num_rows
        arrays = {}
        for name, arrow_type in self.columns:
            values = [record.get(name) for record in records]
            if name == self.id_column:
                values = ([prompt_hash_id(r.get(self.prompt_column)) for r in records]
                          if self.is_id_derived else [_id_text(v) for v in values])
            elif name == self.prompt_column:
                for i, value in enumerate(values):
                    if isinstance(value, str) and not _is_utf8(value):
                        # Arrow text cannot hold it; the bytes travel and the backend judges the
                        # text itself (the tokenizer refuses a lone surrogate: an error row).
                        prompt_utf8[i], values[i] = value.encode("utf-8", "surrogatepass"), None
                    elif value is not None and not isinstance(value, str):
                        input_errors[i] = f"prompt must be a string, got {type(value).__name__}"
                        values[i] = None
            else:
                for i, value in enumerate(values):
                    values[i], problem = _fit(value, arrow_type)
                    if problem and input_errors[i] is None:
                        input_errors[i] = f"column {name!r}: {problem}"
            arrays[name] = pa.array(values, arrow_type)
        arrays[INPUT_ERROR_COLUMN] = pa.array(input_errors, pa.string())
        arrays[PROMPT_UTF8_COLUMN] = pa.array(prompt_utf8, pa.binary())
        return pa.table(arrays)


def _id_text(value: object) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    return text if _is_utf8(text) else text.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")


def _infer_type(values: list) -> pa.DataType:
    present = [v for v in values if v is not None]
    if not present:
        return pa.string()
    if all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64() if all(-2**63 <= v < 2**63 for v in present) else pa.string()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.float64()
    if all(isinstance(v, str) for v in present):
        return pa.string()
    try:
        arrow_type = pa.array(present).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeEncodeError):
        return pa.string()  # mixed JSON types: kept as JSON text
    return pa.string() if pa.types.is_null(arrow_type) else arrow_type


def _parse_line(line: str, path: str, line_number: int) -> dict | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_number}: expected a JSON object per line")
    return record


def _iter_records(stream, path: str):
    # surrogateescape: bytes that are not UTF-8 reach the prompt as lone surrogates, which then
    # make that row an error row instead of failing the whole file.
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape")
    for line_number, line in enumerate(text, start=1):
        record = _parse_line(line, path, line_number)
        if record is not None:
            yield record


def _make_jsonl_datasource_class():
    # Defined on first use: importing ray.data costs seconds, and the layout code above is also
    # used on the driver before Ray starts.
    from ray.data.datasource import FileBasedDatasource

    class JsonlDatasource(FileBasedDatasource):
        """JSON lines parsed row by row with Python's json module.

        Ray's own read_json goes through pyarrow or pandas, which fail the whole file on one row
        that Arrow cannot hold (a lone surrogate, a prompt that is a number next to prompts that
        are text). Here such a row becomes an error row with its reason, and every block gets the
        corpus layout's schema.
        """

        _FILE_EXTENSIONS = list(JSONL_EXTENSIONS)

        def __init__(self, paths, layout: JsonlLayout, **kwargs):
            super().__init__(paths, file_extensions=list(JSONL_EXTENSIONS), **kwargs)
            self.layout = layout

        def _read_stream(self, f, path: str):
            records = []
            for record in _iter_records(f, path):
                records.append(record)
                if len(records) >= JSONL_ROWS_PER_BLOCK:
                    yield self.layout.to_table(records)
                    records = []
            if records:
                yield self.layout.to_table(records)

    return JsonlDatasource


# ---- the corpus ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    """What `open_corpus` found; `read()` builds the Ray Data read (on the driver only the plan)."""

    location: Location
    kind: str  # "jsonl" | "parquet" | "hf"
    prompt_column: str
    id_column: str
    is_id_derived: bool
    column_names: tuple[str, ...]  # input columns (internal ones not counted)
    num_rows: int | None = None  # when known without reading the rows
    split: str | None = None
    jsonl_layout: JsonlLayout | None = None
    file_paths: tuple[str, ...] = field(default=(), repr=False)

    def fingerprint(self) -> list:
        """(path, size, modification time) of every input file: what tells a rerun that the
        input is the one a finished run read. One listing, no file opened."""
        if self.kind == "hf":
            infos = self.location.list_files(recursive=True)
        else:
            infos = self.location.filesystem.get_file_info(list(self.file_paths))
        return sorted([info.path, info.size, info.mtime_ns] for info in infos)

    def read(self):
        import ray

        fs = self.location.filesystem
        if self.kind == "jsonl":
            datasource = _make_jsonl_datasource_class()(list(self.file_paths), self.jsonl_layout, filesystem=fs)
            return ray.data.read_datasource(datasource)
        if self.kind == "parquet":
            return ray.data.read_parquet(self.location.path, filesystem=fs)
        from ray.data._internal.datasource.huggingface_datasource import (
            HuggingFaceDatasource,
        )

        return ray.data.read_datasource(HuggingFaceDatasource(_load_hf_split(self.location, self.split)))


def _load_hf_split(location: Location, split: str | None):
    """The chosen split of a save_to_disk folder; an unknown split names the ones there are."""
    import datasets

    dataset = datasets.load_from_disk(location.path)
    if isinstance(dataset, datasets.DatasetDict):
        names = list(dataset)
        if split is None:
            if len(names) != 1:
                raise ValueError(f"{redacted(location.uri)} has splits {', '.join(names)}; pick one with --split")
            split = names[0]
        if split not in dataset:
            raise ValueError(f"split {split!r} not found in {redacted(location.uri)}; its splits are: {', '.join(names)}")
        return dataset[split]
    if split is not None:
        raise ValueError(f"--split {split!r} given, but {redacted(location.uri)} is a single dataset without splits")
    return dataset


def _is_hf_dataset_dir(location: Location) -> bool:
    return location.is_dir() and any(location.child(name).exists() for name in HF_DATASET_MARKERS)


def _has_extension(path: str, extensions) -> bool:
    return any(path.lower().endswith("." + ext) for ext in extensions)


def _open_error(location: Location, path: str, error: Exception) -> ValueError:
    return ValueError(f"cannot read {path if location.is_local else redacted(location.uri)}: "
                      f"{type(error).__name__}: {error}")


def _sample_jsonl(location: Location, path: str) -> list[dict]:
    records = []
    try:
        with location.filesystem.open_input_stream(path, compression="detect") as stream:
            for record in _iter_records(stream, path):
                records.append(record)
                if len(records) >= SCHEMA_SAMPLE_LINES:
                    break
    except ValueError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise _open_error(location, path, e) from None
    return records


def open_corpus(uri: str, prompt_column: str = "prompt", id_column: str = "id",
                split: str | None = None) -> Corpus:
    """Checks the input before any work starts; raises ValueError / FileNotFoundError with one
    clear line."""
    location = resolve(uri)
    if not location.exists():
        raise FileNotFoundError(f"input {redacted(uri)} does not exist")
    settings = dict(location=location, prompt_column=prompt_column, id_column=id_column)
    if location.is_local and _is_hf_dataset_dir(location):
        dataset = _load_hf_split(location, split)
        names = tuple(dataset.column_names)
        return _checked(Corpus(kind="hf", is_id_derived=id_column not in names, column_names=names,
                               num_rows=dataset.num_rows, split=split, **settings))
    if split is not None:
        raise ValueError(f"--split applies to a datasets folder saved with save_to_disk; {redacted(uri)} is not one")
    if location.is_dir():
        files = [info.path for info in location.list_files(recursive=True)]
    else:
        files = [location.path]
    jsonl_files = [p for p in files if _has_extension(p, JSONL_EXTENSIONS)]
    parquet_files = [p for p in files if _has_extension(p, ("parquet",))]
    if jsonl_files and not parquet_files:
        records = _sample_jsonl(location, jsonl_files[0])
        if not records:
            raise ValueError(f"{jsonl_files[0]} holds no JSON lines")
        if not any(prompt_column in r for r in records):
            raise ValueError(f"{redacted(uri)} has no column {prompt_column!r} (columns in its first lines: "
                             f"{', '.join(dict.fromkeys(k for r in records for k in r))})")
        layout = JsonlLayout.infer(records, prompt_column, id_column)
        return _checked(Corpus(kind="jsonl", is_id_derived=layout.is_id_derived,
                               column_names=tuple(name for name, _ in layout.columns),
                               jsonl_layout=layout, file_paths=tuple(jsonl_files), **settings))
    if parquet_files and not jsonl_files:
        import pyarrow.parquet as pq

        try:
            metadata = pq.ParquetFile(location.filesystem.open_input_file(parquet_files[0])).metadata
        except (OSError, pa.ArrowException) as e:
            raise _open_error(location, parquet_files[0], e) from None
        names = tuple(metadata.schema.to_arrow_schema().names)
        return _checked(Corpus(kind="parquet", is_id_derived=id_column not in names, column_names=names,
                               num_rows=metadata.num_rows if len(parquet_files) == 1 else None,
                               file_paths=tuple(parquet_files), **settings))
    found = "both .jsonl and .parquet files" if files else "no files"
    raise ValueError(f"cannot read {redacted(uri)}: expected .jsonl, .parquet (a file or a folder of one kind) "
                     f"or a datasets folder saved with save_to_disk; found {found}")


def _checked(corpus: Corpus) -> Corpus:
    if corpus.prompt_column not in corpus.column_names:
        raise ValueError(f"{redacted(corpus.location.uri)} has no column {corpus.prompt_column!r} "
                         f"(columns: {', '.join(corpus.column_names)})")
    clashes = [n for n in corpus.column_names if n in GENERATED_SCHEMA.names or n.startswith(INTERNAL_PREFIX)]
    if clashes:
        raise ValueError(f"input column(s) {', '.join(map(repr, clashes))} would be overwritten by the "
                         f"generated column(s) of the same name; rename them in the corpus")
    return corpus


def describe(corpus: Corpus) -> str:
    parts = [f"{corpus.kind}", f"columns {', '.join(corpus.column_names)}"]
    if corpus.num_rows is not None:
        parts.append(f"{corpus.num_rows} rows")
    if corpus.kind != "hf" and len(corpus.file_paths) > 1:
        parts.append(f"{len(corpus.file_paths)} files")
    if corpus.is_id_derived:
        parts.append(f"ids are prompt hashes (no {corpus.id_column!r} column)")
    return ", ".join(parts)
