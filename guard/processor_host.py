"""GenGuard processor's host path: the step's decisions with the votes in NumPy arrays, on a CPU
(logits read as a NumPy view) and on a GPU with the syntax gate (which must see the proposed stops
on the host anyway)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from guard.policy import PolicyKind, StopPolicy, line_start_would_stop
from guard.processor_gate import GateBridge
from guard.processor_state import FLOAT, INT, RowState, Vocab, vote_arrays


class HostPath:
    """Forces the rows' pending markers and decides line-start stops before sampling, row by row
    for the few rows that stop; on a GPU those rows are copied over and back (once a stop)."""

    def __init__(self, state: RowState, vocab: Vocab, policy: StopPolicy, gate: GateBridge | None,
                 logits_on_host: bool, to_device: Callable[[np.ndarray], torch.Tensor]):
        self.state, self.vocab, self.policy, self.gate = state, vocab, policy, gate
        self.logits_on_host, self.to_device = logits_on_host, to_device

    def decide(self, view, guarded: np.ndarray, rows, stop_logits: np.ndarray,
               done_logits: np.ndarray | None) -> None:
        state, vocab = self.state, self.vocab
        p_stop = state.floats[FLOAT["p_stop"]]
        # float64 before the sigmoid, as on the device path: both paths then vote alike on a tie
        p_stop[rows] = sigmoid(stop_logits[rows].astype(np.float64))
        state.floats[FLOAT["p_done"], rows] = (0.0 if done_logits is None
                                               else sigmoid(done_logits[rows].astype(np.float64)))
        state.has_probs[rows] = True
        may_end = state.may_end(rows)
        pending = state.ints[INT["pending_marker"], rows]
        is_forced = may_end & (pending >= 0)
        if is_forced.any():
            for index, kind in zip(guarded[is_forced], pending[is_forced]):
                view[index] = float("-inf")
                view[index, vocab.marker_id_of_kind[int(kind)]] = 0.0
        is_open = may_end & (pending < 0)
        votes = vote_arrays(state.ints[:, rows], state.floats[:, rows])
        p_open, thresholds = p_stop[rows], state.floats[FLOAT["stop_threshold"], rows]
        if self.policy.kind is PolicyKind.TOKEN:
            may_drop = votes.num_code_lines >= self.policy.min_code_lines
            will = is_open & may_drop & (
                votes.num_consecutive_stop_votes + (p_open >= thresholds) >= self.policy.num_consecutive)
            for index in guarded[will]:  # any next token stops it: end here
                view[index] = float("-inf")
                view[index, vocab.drop_open_id] = 0.0
            return
        if self.policy.keep_stop_line:
            return  # the stop line (with the token that stops it) is kept: it must be emitted
        will = is_open & line_start_would_stop(votes, p_open, self.policy, thresholds)
        if will.any() and self.gate is not None:
            will = self.gate.will(guarded, will)
        if will.any():
            self._decide_line_start(view, guarded[will])

    def _decide_line_start(self, view, will_rows: np.ndarray) -> None:
        """Each row's code tokens give way to the marker: sampled, it takes their mass; greedy, the
        row's token is known now."""
        state, vocab = self.state, self.vocab
        # A copy of those rows (on a GPU, over to the host and back: once per stopping request)
        at = will_rows if self.logits_on_host else self.to_device(will_rows)
        block = view[at] if self.logits_on_host else view[at].cpu().numpy()
        for row, index in zip(block, will_rows):
            if state.temperature[index] > 0:
                marker = marker_logit(row[vocab.is_code], state.temperature[index])
                row[vocab.is_code] = float("-inf")
                row[vocab.drop_open_id] = marker
            else:  # greedy: the marker, or the best whitespace / EOS
                noncode = row[vocab.noncode_ids]
                best = int(noncode.argmax())
                target = vocab.drop_open_id if row.max() > noncode[best] else int(vocab.noncode_ids[best])
                row[:] = float("-inf")
                row[target] = 0.0
        view[at] = block if self.logits_on_host else self.to_device(block)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def marker_logit(code_logits: np.ndarray, temperature: float) -> float:
    """A sampled row's marker logit: T*logsumexp(l/T) over its code tokens, so after vLLM divides
    by T the marker holds the probability mass all code tokens had together."""
    scaled = code_logits / temperature
    peak = float(scaled.max())
    if math.isinf(peak):
        return peak
    return temperature * (peak + math.log(float(np.exp(scaled - peak).sum())))
