"""GenGuard processor's state: the export's vocabulary as the processor reads it, and each batch
row's votes and facts, kept in step with vLLM's batch updates (guard/vllm_processor.py)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from guard.export import GuardExport, MarkerKind
from guard.policy import VOTE_FIELDS, GateState, VoteArrays
from guard.token_table import TokenTable

if TYPE_CHECKING:
    from guard.processor_gate import GateRequest

NO_MARKER = -1
# Votes, per batch row: two matrices with one column a row (moving a request moves a column):
# counts and flags (0/1) as int64, the rest as float64. The rules work on 0/1 flags as on bools.
FLOAT_FIELDS = ("line_code_stop_mass", "p_stop", "p_done", "stop_threshold")
INT_FIELDS = tuple(name for name in VOTE_FIELDS if name not in FLOAT_FIELDS) + ("pending_marker",)
INT = {name: i for i, name in enumerate(INT_FIELDS)}
FLOAT = {name: i for i, name in enumerate(FLOAT_FIELDS)}
_MAX_PARKED_FACTOR = 4  # parked requests kept, per batch slot (oldest dropped first)


def vote_arrays(ints, floats) -> VoteArrays:
    """The policy's view of vote columns (NumPy or torch alike)."""
    return VoteArrays(**{name: floats[FLOAT[name]] if name in FLOAT else ints[INT[name]] for name in VOTE_FIELDS})


@dataclass(frozen=True)
class Vocab:
    """The export's vocabulary as the processor reads it, fixed at start."""
    guard_cols: slice  # the stop and done rows, then the markers: never sampled
    drop_open_id: int
    marker_id_of_kind: np.ndarray  # marker token id, by MarkerKind
    is_code: np.ndarray  # per token: replaced by the marker on a line-start stop (not whitespace, not EOS)
    # What a line-start stop leaves to the row (whitespace, EOS), in id order: a greedy row takes
    # the marker only if the best token overall beats the best of these.
    noncode_ids: np.ndarray

    @classmethod
    def of(cls, export: GuardExport, table: TokenTable) -> Vocab:
        first_row = export.first_guard_row
        guard_cols = slice(first_row, first_row + len(export.marker_ids) + 2)
        is_code = ~table.arrays["is_whitespace"]
        is_code[list(export.eos_token_ids)] = False
        is_code[guard_cols] = False
        return cls(guard_cols, export.marker_id(MarkerKind.DROP_OPEN), np.array(export.marker_ids, dtype=np.int64),
                   is_code, np.flatnonzero(~is_code[:first_row]))


@dataclass(frozen=True, slots=True)
class RowFacts:
    """A batch row's host-side facts: what a moved, swapped or parked request takes along."""
    output_ids: list[int] | None = None  # vLLM's output list of the request (grows in place)
    is_guarded: bool = False
    num_folded: int = 0  # output tokens folded into the votes
    has_probs: bool = False  # the guard's probabilities of the next token were read
    temperature: float = 0.0  # 0: greedy
    min_tokens: int = 0
    is_observed: bool = False  # votes only, never stopped
    gate_input: GateRequest | None = None  # the syntax gate's prompt and language
    gate_state: GateState = GateState()  # remembers the last parse
    line_start: int = 0  # where the line being written starts (the gate's kept text)
    is_gate_holding: bool = False  # the gate refused once: it counts line ends


ROW_FIELDS = tuple(f.name for f in fields(RowFacts))


@dataclass(frozen=True, slots=True)
class ParkedRow:
    """A request out of the batch for a while (not scheduled, preempted), kept by its output list."""
    facts: RowFacts
    ints: Any  # its vote columns, copied
    floats: Any


class RowState:
    """Every batch row's votes (NumPy; torch tensors when they live on the device) and facts (one
    array a `RowFacts` field, named as the field), moved as vLLM moves the requests."""

    def __init__(self, num_slots: int, votes_on_host: bool, device: torch.device,
                 to_device: Callable[[np.ndarray], torch.Tensor]):
        self.num_slots, self.votes_on_host, self._to_device = num_slots, votes_on_host, to_device
        if votes_on_host:
            self.ints = np.zeros((len(INT_FIELDS), num_slots), dtype=np.int64)
            self.floats = np.zeros((len(FLOAT_FIELDS), num_slots), dtype=np.float64)
        else:
            self.ints = torch.zeros((len(INT_FIELDS), num_slots), dtype=torch.int64, device=device)
            self.floats = torch.zeros((len(FLOAT_FIELDS), num_slots), dtype=torch.float64, device=device)
        self.output_ids: list[list[int] | None] = [None] * num_slots
        self.is_guarded = np.zeros(num_slots, dtype=bool)
        self.num_folded = np.zeros(num_slots, dtype=np.int64)
        self.has_probs = np.zeros(num_slots, dtype=bool)
        self.temperature = np.zeros(num_slots, dtype=np.float64)
        self.min_tokens = np.zeros(num_slots, dtype=np.int64)
        self.is_observed = np.zeros(num_slots, dtype=bool)
        self.gate_input: list[GateRequest | None] = [None] * num_slots
        self.gate_state: list[GateState] = [GateState()] * num_slots
        self.line_start = np.zeros(num_slots, dtype=np.int64)
        self.is_gate_holding = np.zeros(num_slots, dtype=bool)
        self._parked: OrderedDict[int, ParkedRow] = OrderedDict()
        self.version = 0  # bumped on every change of the batch's rows
        self._active_key = None
        self._active_cache = (np.zeros(0, dtype=np.int64), [])

    def facts(self, index: int) -> RowFacts:
        return RowFacts(*(getattr(self, name)[index] for name in ROW_FIELDS))

    def set_facts(self, index: int, facts: RowFacts) -> None:
        for name in ROW_FIELDS:
            getattr(self, name)[index] = getattr(facts, name)

    def clear(self, index: int) -> None:
        self.version += 1
        self.set_facts(index, RowFacts())

    def start(self, index: int, facts: RowFacts, stop_threshold: float) -> None:
        """A new guarded request in `index`: its facts, and votes from scratch."""
        self.set_facts(index, facts)
        ints = [0] * len(INT_FIELDS)
        ints[INT["is_line_text_blank"]] = 1
        ints[INT["pending_marker"]] = NO_MARKER
        floats = [0.0] * len(FLOAT_FIELDS)
        floats[FLOAT["stop_threshold"]] = stop_threshold
        if self.votes_on_host:
            self.ints[:, index], self.floats[:, index] = ints, floats
        else:
            self.ints[:, index] = torch.tensor(ints).to(self.ints.device, non_blocking=True)
            self.floats[:, index] = torch.tensor(floats, dtype=torch.float64).to(self.floats.device, non_blocking=True)

    def _votes_copy(self, index: int) -> tuple:
        copy = (lambda x: x.copy()) if self.votes_on_host else (lambda x: x.clone())
        return copy(self.ints[:, index]), copy(self.floats[:, index])

    def park(self, index: int) -> None:
        output_ids = self.output_ids[index]
        if self.is_guarded[index] and output_ids is not None:
            self._parked[id(output_ids)] = ParkedRow(self.facts(index), *self._votes_copy(index))
            while len(self._parked) > _MAX_PARKED_FACTOR * self.num_slots:
                self._parked.popitem(last=False)
        self.clear(index)

    def unpark(self, index: int, output_ids: list[int]) -> bool:
        """Puts the request of `output_ids` back in `index` if it was parked."""
        parked = self._parked.pop(id(output_ids), None)
        if parked is None or parked.facts.output_ids is not output_ids:
            return False
        self.set_facts(index, parked.facts)
        self.ints[:, index], self.floats[:, index] = parked.ints, parked.floats
        return True

    def move(self, a: int, b: int) -> None:
        self.set_facts(b, self.facts(a))
        self.ints[:, b], self.floats[:, b] = self._votes_copy(a)
        self.clear(a)

    def swap(self, a: int, b: int) -> None:
        facts_a, facts_b = self.facts(a), self.facts(b)
        self.set_facts(a, facts_b)
        self.set_facts(b, facts_a)
        pair, swapped = [a, b], [b, a]
        if not self.votes_on_host:  # index tensors on the device (a list would be copied over and waited for)
            pair, swapped = self._to_device(np.array(pair)), self._to_device(np.array(swapped))
        self.ints[:, pair] = self.ints[:, swapped]
        self.floats[:, pair] = self.floats[:, swapped]

    def active(self, num_rows: int) -> tuple[np.ndarray, list]:
        """The guarded rows and their output lists, rebuilt only when the batch changed."""
        key = (self.version, num_rows)
        if self._active_key != key:
            guarded = np.flatnonzero(self.is_guarded[:num_rows])
            self._active_cache = (guarded, [self.output_ids[i] for i in guarded.tolist()])
            self._active_key = key
        return self._active_cache

    def may_end(self, rows) -> np.ndarray:
        """Rows whose request may end now: not only observed, and min_tokens reached."""
        return ~self.is_observed[rows] & (self.num_folded[rows] >= self.min_tokens[rows])
