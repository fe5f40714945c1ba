"""GenGuard inside vLLM: a v1 logits processor over a model exported by `guard.export`.

    LLM(model=export_folder, logits_processors=[GenGuardLogitsProcessor])   # or "guard.vllm_processor:GenGuardLogitsProcessor"

Each step it folds every guarded request's newest token into its votes with our engine's rules
(`guard.policy`), masks the guard's columns, and ends the requests the votes stop by forcing a
marker token, before sampling where it can. Its parts: guard/processor_state.py (rows and
votes), processor_host.py / processor_device.py (the step, NumPy or torch), processor_gate.py
(the syntax gate), processor_trace.py (trace files); docs/design.md says how and why.
"""
from __future__ import annotations

import logging
import operator
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from guard.export import GuardExport, MarkerKind
from guard.policy import FEATURE_FIELDS, TokenFeatures, fold_arrays
from guard.processor_device import DevicePath, to_device
from guard.processor_gate import GateBridge, GateRequest
from guard.processor_host import HostPath
from guard.processor_state import FLOAT, INT, RowState, RowFacts, Vocab, vote_arrays
from guard.processor_trace import TRACE_DIR_ENV, TraceWriter, prompt_key, read_decoded, read_trace
from guard.syntax import language_name_error
from guard.token_table import TABLE_FILE, TokenTable
from guard.vllm_contract import GUARD_ARG, LANGUAGE_ARG, OBSERVE, guard_columns_masked_by, parse_guard_arg

__all__ = ["DEVICE_PATH_ENV", "TRACE_DIR_ENV", "GenGuardLogitsProcessor", "prompt_key", "read_decoded",
           "read_trace"]

logger = logging.getLogger(__name__)

# Set to 1: the GPU code path on a CPU as well (logits as torch tensors), to check that path inside
# a real vLLM engine without a GPU (`benchmarks.vllm_exactness --device-path`).
DEVICE_PATH_ENV = "CODEFAST_GUARD_DEVICE_PATH"
_SAMPLING_EPS = 1e-5  # vLLM's: a temperature below it is greedy
_LAST = operator.itemgetter(-1)  # a C call per output list: the step's cheapest way to read them


class GenGuardLogitsProcessor(LogitsProcessor):
    # The GPU code path on any device (logits as torch tensors; without the syntax gate, votes on
    # the device too); tests set it to check that path against the NumPy one on a CPU.
    use_device_path = False

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra_args = sampling_params.extra_args or {}
        setting = parse_guard_arg(extra_args.get(GUARD_ARG))
        masked_by = guard_columns_masked_by(sampling_params.structured_outputs, sampling_params.allowed_token_ids)
        if masked_by and extra_args.get(GUARD_ARG) is not None and setting is not False:
            raise ValueError(f"extra_args['{GUARD_ARG}'] = {extra_args[GUARD_ARG]!r} with {masked_by}: vLLM masks"
                             " the guard's columns with the rest of the vocabulary before the guard reads them,"
                             " so it could never stop the request; send 'off', or no guard setting (such a"
                             " request then runs without the guard)")
        language = extra_args.get(LANGUAGE_ARG)
        if (error := language_name_error(language)) is not None:
            raise ValueError(f"extra_args['{LANGUAGE_ARG}']: {error}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        model_dir = Path(vllm_config.model_config.model)
        self.export = GuardExport.load(model_dir)  # a clear error, never a silent run without the guard
        self.policy = self.export.policy
        table = TokenTable.load(model_dir / TABLE_FILE)
        self.vocab = Vocab.of(self.export, table)
        self.device = torch.device(device)
        # vLLM's word on whether host memory can be pinned here
        self.to_device = partial(to_device, device=self.device, is_pin_memory=is_pin_memory)
        # Logits read as NumPy (a view): on a CPU. Votes kept as NumPy arrays: on a CPU, and on a
        # GPU with the syntax gate on, which needs the host to know the proposed stops each step
        # anyway: there one small copy of the guard columns a step (the one wait for the device)
        # replaces the torch path's wait for its proposed stops and the many small kernels of its
        # fold and decisions. Without the gate, a GPU keeps the votes on the device and never waits.
        is_device_path = self.use_device_path or os.environ.get(DEVICE_PATH_ENV) == "1"
        self.logits_on_host = self.device.type == "cpu" and not is_device_path
        self.is_host = self.logits_on_host or self.policy.syntax_gate
        num_slots = vllm_config.scheduler_config.max_num_seqs
        self.state = RowState(num_slots, self.is_host, self.device, self.to_device)
        self.gate = GateBridge(self.state, self.policy, model_dir) if self.policy.syntax_gate else None
        first_row = self.export.first_guard_row
        self.guard_probs_cols = slice(first_row, first_row + 2)  # stop, done: copied from a GPU
        if self.is_host:
            self.packed_features = table.packed()
            self.path = HostPath(self.state, self.vocab, self.policy, self.gate, self.logits_on_host, self.to_device)
        else:
            self.packed_features = torch.as_tensor(table.packed(), device=self.device)
            self.path = DevicePath(self.state, self.vocab, self.policy, self.device, self.to_device)
        self.num_lost_requests = 0
        self._trace = TraceWriter.open(num_slots)

    @property
    def ints(self):
        """The rows' integer votes, one column a row (tests read them)."""
        return self.state.ints

    @property
    def is_guarded(self) -> np.ndarray:
        """Per batch row: is the guard on for its request (tests and benchmarks read it)."""
        return self.state.is_guarded

    def is_argmax_invariant(self) -> bool:
        return False  # it forces and masks tokens: greedy requests need it too

    # ---- batch bookkeeping -----------------------------------------------------------------------
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return  # new tokens are folded in apply(), when async scheduling has filled them in
        if self._trace is not None:
            self._trace.follow(batch_update)
        self.state.version += 1
        for index in batch_update.removed:
            self.state.park(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self._add(index, params, prompt_ids, output_ids)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.state.swap(a, b)
            else:
                self.state.move(a, b)

    def _add(self, index: int, params, prompt_ids, output_ids: list[int]) -> None:
        if self.state.unpark(index, output_ids):
            return
        self.state.clear(index)
        raw_setting = (params.extra_args or {}).get(GUARD_ARG)
        setting = parse_guard_arg(raw_setting)
        markers_end_it = set(self.export.marker_ids) <= set(params.stop_token_ids or ())
        # Its columns are masked (an explicit setting was refused in validate_params).
        is_masked = raw_setting is None and bool(guard_columns_masked_by(params.structured_outputs,
                                                                          params.allowed_token_ids))
        if setting is not False and raw_setting is not None and not markers_end_it:
            # Asked for, but nothing would end the request on a marker (ignore_eos without them
            # in stop_token_ids): said in the engine's log rather than run silently without it.
            logger.warning("GenGuard is off for a request that asks for it (%s=%r): its stop tokens %s are"
                           " not in its stop_token_ids (ignore_eos?)", GUARD_ARG, raw_setting,
                           list(self.export.marker_ids))
        if setting is False or not markers_end_it or is_masked:
            return
        if output_ids:  # joined mid-way with no record of its votes (e.g. recomputed): guard off
            self.num_lost_requests += 1
            return
        gate_input = None
        if self.gate is not None:
            gate_input = GateRequest(list(prompt_ids or ()), (params.extra_args or {}).get(LANGUAGE_ARG))
        facts = RowFacts(output_ids=output_ids, is_guarded=True,
                         temperature=params.temperature if params.temperature >= _SAMPLING_EPS else 0.0,
                         min_tokens=params.min_tokens or 0, is_observed=setting == OBSERVE, gate_input=gate_input)
        self.state.start(index, facts, setting if isinstance(setting, float) else self.policy.stop_threshold)

    # ---- the step --------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        num_rows = logits.shape[0]
        guard_cols = self.vocab.guard_cols
        guarded, lists = self.state.active(num_rows)
        if not guarded.size:
            logits[:, guard_cols] = float("-inf")
            return logits
        # The common case, the guarded rows are the batch's first rows: slices (views), no gathers.
        rows = slice(0, guarded.size) if guarded[-1] + 1 == guarded.size else guarded
        self._fold_new_tokens(guarded, rows, lists)
        # vLLM's sampler hands processors float32 logits; on a CPU they are read as NumPy (a
        # view), whose small operations cost a fraction of torch's.
        view = logits.numpy() if self.logits_on_host else logits
        if self.is_host and not self.logits_on_host:  # votes on the host, logits on a GPU
            cols = logits[:, self.guard_probs_cols].cpu().numpy()  # the step's one wait for the device
        else:
            cols = view[:, guard_cols]
        scale = 1.0 / self.export.logit_scale
        stop_logits = cols[:, 0] * scale + self.export.stop_bias
        done_logits = (cols[:, 1] * scale + self.export.done_bias) if self.export.done_row is not None else None
        if self.is_host:
            view[:, guard_cols] = float("-inf")
            self.path.decide(view, guarded, rows, stop_logits, done_logits)
        else:
            stop_logits = stop_logits.double()
            done_logits = None if done_logits is None else done_logits.double()
            logits[:, guard_cols] = float("-inf")
            self.path.decide(logits, guarded, stop_logits, done_logits)
        if self._trace is not None:
            self._trace.write_step(guarded, self.state)
        return logits

    def _fold_new_tokens(self, guarded: np.ndarray, rows, lists: list) -> None:
        """Fold, per row, the token sampled at the previous step with that step's probabilities."""
        state, first_guard_row = self.state, self.vocab.guard_cols.start
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        grown = lengths - state.num_folded[rows]
        if (grown == 1).all() and state.has_probs[rows].all():  # every row got its one token
            token_ids = np.fromiter(map(_LAST, lists), dtype=np.int64, count=len(lists))
            # -1: async scheduling has not filled it in yet; a forced marker may come back once
            # under async scheduling (the request is ending): neither is folded.
            if (token_ids >= 0).all() and (token_ids < first_guard_row).all():
                state.num_folded[rows] += 1
                self._fold_rows(rows, token_ids, guarded)
                return
        lost = (grown > 1) | ((grown == 1) & ~state.has_probs[rows])
        if lost.any():  # tokens we never saw the probabilities of: no honest vote is possible
            self.num_lost_requests += int(lost.sum())
            for index in guarded[lost]:
                state.clear(index)
        has_new = (grown == 1) & ~lost
        if not has_new.any():
            return
        new_rows = guarded[has_new]
        token_ids = np.array([lists[i][-1] for i in np.flatnonzero(has_new)], dtype=np.int64)
        is_known = token_ids >= 0
        new_rows, token_ids = new_rows[is_known], token_ids[is_known]
        state.num_folded[new_rows] += 1
        is_folded = token_ids < first_guard_row
        if is_folded.any():
            self._fold_rows(new_rows[is_folded], token_ids[is_folded], new_rows[is_folded])

    def _fold_rows(self, rows, token_ids: np.ndarray, row_ids: np.ndarray) -> None:
        """Fold one token into each of `rows` (a slice: views, written in place; else a gather);
        `row_ids`: the same rows as indices."""
        state = self.state
        is_view = isinstance(rows, slice)
        select = rows if is_view or self.is_host else self.to_device(rows)
        ids = token_ids if self.is_host else self.to_device(token_ids)
        ints, floats = state.ints[:, select], state.floats[:, select]
        gathered = self.packed_features[ids]  # one gather from the packed table; flags come as 0/1 ints
        tokens = TokenFeatures(*(gathered[:, j] for j in range(len(FEATURE_FIELDS))))
        new, is_stop, keeps_line = fold_arrays(
            vote_arrays(ints, floats), floats[FLOAT["p_stop"]], floats[FLOAT["p_done"]], tokens, self.policy,
            floats[FLOAT["stop_threshold"]])
        for name, value in new.items():
            if name in FLOAT:
                floats[FLOAT[name]] = value
            else:
                ints[INT[name]] = value
        if self.gate is not None:  # (its votes are on the host: NumPy)
            is_stop = self.gate.folded(row_ids, np.asarray(tokens.is_line_end, dtype=bool), is_stop, keeps_line)
        if is_stop.any() if self.is_host else True:
            kind = _select(keeps_line | self.policy.keep_stop_line, int(MarkerKind.KEEP),
                           _select(tokens.is_line_end, int(MarkerKind.DROP_ENDED), int(MarkerKind.DROP_OPEN)))
            pending = ints[INT["pending_marker"]]
            ints[INT["pending_marker"]] = _select(is_stop & (pending < 0), kind, pending)
        if not is_view:  # fancy indexing gave copies: write them back
            state.ints[:, select], state.floats[:, select] = ints, floats


def _select(condition, if_true: int, if_false):
    """where() over int64 for NumPy and torch alike."""
    if isinstance(condition, np.ndarray):
        return np.where(condition, if_true, if_false)
    condition = condition if condition.dtype == torch.bool else condition.bool()
    if not torch.is_tensor(if_false):  # a fill on the device, not a copy from the host
        if_false = torch.full(condition.shape, if_false, dtype=torch.int64, device=condition.device)
    return torch.where(condition, if_true, if_false)  # a Python scalar: no copy (one would wait on a GPU)
