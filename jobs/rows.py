"""Rows in, rows out: what both workers (engine actors and Serve) do with a batch, apart from
sending the requests.

Every input column comes through to the output with its own type, next to the generated columns
(`GENERATED_SCHEMA`). Optional per-row columns (`ROW_SETTING_TYPES`) override the job's settings
for that row; a value that is not valid makes that row an error row. With `num_samples` k each
input row gives k output rows, `sample_index` 0..k-1, each with its own seed: (id, sample_index)
is unique in the output.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import pyarrow as pa

from engine.params import SamplingParams

GENERATED_SCHEMA = pa.schema([
    ("sample_index", pa.int64()),  # 0..num_samples-1; (id, sample_index) is unique
    ("sample_seed", pa.int64()),  # the seed this sample was drawn with (null: none)
    ("completion", pa.string()),  # null on error rows
    ("completion_ids", pa.list_(pa.int64())),  # its token ids (null in Serve mode)
    ("finish_reason", pa.string()),  # eos | length | stop | guard (Serve: stop | length | guard)
    ("num_prompt_tokens", pa.int64()),
    ("num_generated_tokens", pa.int64()),  # tokens decoded, including any the guard cut
    ("is_guard_stop", pa.bool_()),
    ("latency_s", pa.float64()),
    ("error", pa.string()),  # null, or why this row could not be served
])
# Per-row settings: a column of this name (null = the job's setting) overrides the job's value.
ROW_SETTING_TYPES = {"max_tokens": pa.int64(), "temperature": pa.float64(), "top_p": pa.float64(),
                     "seed": pa.int64(), "stop": pa.list_(pa.string()), "guard": pa.string(),
                     "language": pa.string()}
LANGUAGE_ALIASES = {"py": "python", "js": "javascript", "node": "javascript", "golang": "go", "c++": "cpp",
                    "cxx": "cpp"}
GUARD_VALUES = {True: True, False: False, "on": True, "off": False, "true": True, "false": False}
INTERNAL_PREFIX = "_codefast_"  # columns the reader adds for the workers; never written out
INPUT_ERROR_COLUMN = INTERNAL_PREFIX + "input_error"  # why the reader could not take the row
PROMPT_UTF8_COLUMN = INTERNAL_PREFIX + "prompt_utf8"  # text Arrow cannot hold (lone surrogates)
MAX_SEED = 2**63 - 1  # the engine's generators take int64 seeds


@dataclass(frozen=True)
class RowSettings:
    """The job's sampling settings and how rows use them; sent to every worker."""

    params: SamplingParams
    prompt_column: str = "prompt"
    id_column: str = "id"
    num_samples: int = 1
    is_guard_available: bool = True  # False: a row asking for the guard is an error row

    def __post_init__(self) -> None:
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {self.num_samples!r}")


@dataclass(frozen=True)
class SampleRequest:
    """One output row to produce: a prompt and its params, or the reason it cannot be served."""

    row_index: int
    sample_index: int
    prompt: str | None
    params: SamplingParams | None
    error: str | None = None


def stable_seed(row_id: object) -> int:
    """A per-row seed for rows that give none, so k samples differ and reruns repeat them."""
    digest = hashlib.sha1(str(row_id).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def _as_int(name: str, value: object, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")
    return value


def _as_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def row_params(row: dict, settings: RowSettings) -> SamplingParams:
    """The job's params with this row's overrides; ValueError (-> error row) for a bad value."""
    changes = {}
    if row.get("max_tokens") is not None:
        changes["max_new_tokens"] = _as_int("max_tokens", row["max_tokens"], 1, 2**31)
    if row.get("temperature") is not None:
        changes["temperature"] = _as_number("temperature", row["temperature"])
    if row.get("top_p") is not None:
        changes["top_p"] = _as_number("top_p", row["top_p"])
    if row.get("seed") is not None:
        changes["seed"] = _as_int("seed", row["seed"], 0, MAX_SEED)
    stop = row.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {row['stop']!r}")
        changes["stop"] = tuple(stop)
    guard = row.get("guard")
    if guard is not None:
        key = guard.lower() if isinstance(guard, str) else guard
        if key not in GUARD_VALUES:
            raise ValueError(f"guard must be on/off (or true/false), got {guard!r}")
        if GUARD_VALUES[key] and not settings.is_guard_available:
            raise ValueError("guard 'on' asked, but this job runs without a guard")
        changes["use_guard"] = GUARD_VALUES[key]
    language = row.get("language")
    if language is not None:
        # Code corpora often carry a language column of their own ("Python", "C++", "rust"): it
        # sets the gate's language, so a language with no grammar goes ungated, never guessed.
        if not isinstance(language, str):
            raise ValueError(f"language must be a string, got {language!r}")
        if name := language_name(language):
            changes["language"] = name
    return replace(settings.params, **changes) if changes else settings.params  # validates again


def language_name(name: str) -> str | None:
    """A corpus's language name ("Python", "C++", "golang") as the syntax gate names it (any
    language: one with no grammar goes ungated); None for a blank one (the prompt's guess)."""
    name = name.strip().lower()
    return LANGUAGE_ALIASES.get(name, name) or None


def sample_seeds(params: SamplingParams, row_id: object, num_samples: int) -> list[int | None]:
    if params.seed is None and num_samples == 1:
        return [None]  # unseeded, as asked
    base = stable_seed(row_id) if params.seed is None else params.seed
    return [(base + i) % (MAX_SEED + 1) for i in range(num_samples)]


def _prompt_values(batch: pa.Table, prompt_column: str) -> list[object]:
    prompts = batch.column(prompt_column).to_pylist()
    if PROMPT_UTF8_COLUMN in batch.column_names:
        for i, raw in enumerate(batch.column(PROMPT_UTF8_COLUMN).to_pylist()):
            if raw is not None:
                prompts[i] = raw.decode("utf-8", "surrogatepass")
    return prompts


def plan_requests(batch: pa.Table, settings: RowSettings) -> list[SampleRequest]:
    """num_samples requests per row, in row order; a row that cannot be served gets its reason on
    every sample, so the output still has each (id, sample_index) once."""
    prompts = _prompt_values(batch, settings.prompt_column)
    ids = batch.column(settings.id_column).to_pylist()
    input_errors = (batch.column(INPUT_ERROR_COLUMN).to_pylist()
                    if INPUT_ERROR_COLUMN in batch.column_names else [None] * batch.num_rows)
    setting_columns = {name: batch.column(name).to_pylist()
                       for name in ROW_SETTING_TYPES if name in batch.column_names}
    requests = []
    for i, prompt in enumerate(prompts):
        error, params, seeds = input_errors[i], None, [None] * settings.num_samples
        if error is None and not isinstance(prompt, str):
            error = f"prompt must be a string, got {type(prompt).__name__}"
        if error is None:
            try:
                params = row_params({name: values[i] for name, values in setting_columns.items()}, settings)
                seeds = sample_seeds(params, ids[i], settings.num_samples)
            except ValueError as e:
                error = f"bad per-row setting: {e}"
        for sample_index, seed in enumerate(seeds):
            if error is not None:
                requests.append(SampleRequest(i, sample_index, None, None, error))
            else:
                sample_params = params if seed == params.seed else replace(params, seed=seed)
                requests.append(SampleRequest(i, sample_index, prompt, sample_params))
    return requests


def error_fields(message: str) -> dict:
    return {"completion": None, "completion_ids": None, "finish_reason": None,
            "num_prompt_tokens": None, "num_generated_tokens": None, "is_guard_stop": False,
            "latency_s": None, "error": message[:2000]}


def result_fields(result) -> dict:
    """Generated columns of an engine `Result`."""
    return {"completion": result.text, "completion_ids": list(result.token_ids),
            "finish_reason": result.finish_reason, "num_prompt_tokens": result.num_prompt_tokens,
            "num_generated_tokens": result.num_generated_tokens,
            "is_guard_stop": result.finish_reason == "guard", "latency_s": result.latency_s,
            "error": None}


def build_output(batch: pa.Table, requests: list[SampleRequest], outcomes: list[dict]) -> pa.Table:
    """The input columns of each request's row (their own types), then the generated columns."""
    kept = batch.drop_columns([n for n in batch.column_names if n.startswith(INTERNAL_PREFIX)])
    table = kept.take(pa.array([r.row_index for r in requests], pa.int64()))
    generated = pa.Table.from_pylist(
        [{"sample_index": r.sample_index,
          "sample_seed": None if r.params is None else r.params.seed, **fields}
         for r, fields in zip(requests, outcomes)], schema=GENERATED_SCHEMA)
    for field, column in zip(GENERATED_SCHEMA, generated.columns):
        table = table.append_column(field, column)
    return table


def batch_counts(table: pa.Table) -> dict:
    """What a finished batch adds to the job's progress."""
    import pyarrow.compute as pc

    def total(name: str) -> int:
        return pc.sum(table.column(name)).as_py() or 0

    return {"num_rows": table.num_rows, "num_errors": table.num_rows - table.column("error").null_count,
            "num_guard_stops": total("is_guard_stop"), "num_prompt_tokens": total("num_prompt_tokens"),
            "num_generated_tokens": total("num_generated_tokens")}
