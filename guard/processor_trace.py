"""GenGuard processor's trace (tests and the exactness check): with `CODEFAST_GUARD_TRACE_DIR` set,
each engine process appends the guard probabilities its requests saw and how many tokens it
decoded for each, and `read_trace` / `read_decoded` read them back."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from guard.processor_state import FLOAT, RowState
from guard.vllm_contract import GUARD_ARG, OBSERVE, parse_guard_arg

TRACE_DIR_ENV = "CODEFAST_GUARD_TRACE_DIR"  # set: write every request's guard probabilities (tests)


class TracedRow(NamedTuple):
    key: str | None  # `prompt_key` of the request
    mode: str  # "off", "on" or "observe"
    output_ids: list[int]


class TraceWriter:
    """Follows every row through the batch, guarded or not, and writes its records."""

    def __init__(self, file: TextIO, num_slots: int):
        self.file = file
        self.rows: list[TracedRow | None] = [None] * num_slots

    @classmethod
    def open(cls, num_slots: int) -> TraceWriter | None:
        """A writer where `TRACE_DIR_ENV` says to trace, one file a process; else None."""
        trace_dir = os.environ.get(TRACE_DIR_ENV)
        if not trace_dir:
            return None
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        return cls(open(Path(trace_dir) / f"trace-{os.getpid()}.jsonl", "a"), num_slots)

    def follow(self, batch_update: BatchUpdate) -> None:
        """A row that leaves writes its output list's length, each token the engine sampled for it
        (a preempted request writes again when it ends)."""
        rows = self.rows
        records = []

        def leave(index: int) -> None:
            if rows[index] is not None:
                key, mode, output_ids = rows[index]
                records.append({"prompt": key, "mode": mode, "num_decoded": len(output_ids)})
                rows[index] = None

        for index in batch_update.removed:
            leave(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            leave(index)  # vLLM gives a freed row to a new request without listing it as removed
            setting = parse_guard_arg((params.extra_args or {}).get(GUARD_ARG))
            mode = "off" if setting is False else OBSERVE if setting == OBSERVE else "on"
            rows[index] = TracedRow(prompt_key(prompt_ids, params.stop or ()), mode, output_ids)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                rows[a], rows[b] = rows[b], rows[a]
            else:  # condensing: a live row fills the row of one that left, unlisted as removed
                leave(b)
                rows[b], rows[a] = rows[a], None
        self._write(records)

    def write_step(self, guarded: np.ndarray, state: RowState) -> None:
        """One record per guarded row: the probabilities of the token at `position`, about to be
        sampled, and the token emitted at the step before (position - 1). A row whose step was a
        partial prefill writes a position again; the last record counts."""
        records = []
        for index in guarded:
            key, mode, _ = self.rows[index]
            if key is None:
                continue
            output_ids = state.output_ids[index]
            records.append({"prompt": key, "mode": mode,
                            "position": int(state.num_folded[index]),
                            "last_token": int(output_ids[-1]) if output_ids else None,
                            "p_stop": float(state.floats[FLOAT["p_stop"], index]),
                            "p_done": float(state.floats[FLOAT["p_done"], index])})
        self._write(records)

    def _write(self, records: list[dict]) -> None:
        if records:
            self.file.write("".join(json.dumps(r) + "\n" for r in records))
            self.file.flush()


def read_trace(trace_dir: str | Path, mode: str = OBSERVE) -> dict[str, tuple[list[float], list[float], list[int]]]:
    """Per prompt key, for the requests traced in `mode` ("observe" or "on"): (p_stop, p_done) of
    every position they reached, and the tokens they emitted before the last one."""
    by_prompt: dict[str, dict[int, tuple]] = {}
    for record in _trace_records(trace_dir):
        if record.get("mode", OBSERVE) == mode and "position" in record:
            by_prompt.setdefault(record["prompt"], {})[record["position"]] = (
                record["p_stop"], record["p_done"], record.get("last_token"))
    traces = {}
    for key, positions in by_prompt.items():
        ordered = [positions[i] for i in range(max(positions) + 1) if i in positions]
        tokens = [positions[i + 1][2] for i in range(max(positions)) if i + 1 in positions]
        traces[key] = ([p for p, _, _ in ordered], [d for _, d, _ in ordered], tokens)
    return traces


def read_decoded(trace_dir: str | Path) -> dict[tuple[str, str], int]:
    """Per (prompt key, mode "off" / "on" / "observe"): the tokens the engine decoded for that
    request, written when it left the batch. vLLM hands processors a batch's removals at the
    engine's next step, so the last requests of a run are written once another request runs."""
    decoded: dict[tuple[str, str], int] = {}
    for record in _trace_records(trace_dir):
        if "num_decoded" in record:
            key = (record["prompt"], record["mode"])
            decoded[key] = max(decoded.get(key, 0), record["num_decoded"])
    return decoded


def _trace_records(trace_dir: str | Path):
    """Every record of every trace file (one a process) in `trace_dir`."""
    for path in sorted(Path(trace_dir).glob("trace-*.jsonl")):
        for line in path.read_text().splitlines():
            yield json.loads(line)


def prompt_key(prompt_ids, stop=()) -> str | None:
    """The key the trace files use for a request: a hash of its prompt token ids and stop strings
    (so a run with stop strings is told apart from one without)."""
    if prompt_ids is None:
        return None
    digest = hashlib.sha1(np.asarray(list(prompt_ids), dtype=np.int64).tobytes())
    digest.update(json.dumps(sorted(stop)).encode())
    return digest.hexdigest()[:16]
