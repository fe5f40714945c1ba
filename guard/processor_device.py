"""GenGuard processor's device path: the step's decisions with the votes in torch tensors on the
device (a GPU without the syntax gate), made with masks over the whole batch so that nothing
waits for the device."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from guard.policy import PolicyKind, StopPolicy, line_start_would_stop
from guard.processor_state import FLOAT, INT, RowState, Vocab, vote_arrays

# The logit that makes a decided row take its token, the rest of the row left as it was: any other
# token then has probability 0 in float32 at any temperature vLLM samples at (>= 1e-5; 1e30 / 1e-5
# is still finite), and the penalties vLLM applies after the processors do not bring another near it.
FORCED_LOGIT = 1e30


def to_device(array: np.ndarray, device: torch.device, is_pin_memory: bool) -> torch.Tensor:
    """A host array on `device` without waiting for the device: a plain copy
    (`torch.as_tensor(array, device=...)`) synchronizes the stream on a GPU, so this one goes
    asynchronously, from pinned memory where vLLM says there is some (torch's pinned-memory
    cache keeps the block until the copy is done)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if is_pin_memory and device.type != "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class DevicePath:
    """On a GPU what costs is a pass over the vocabulary (the whole batch's logits), so a
    row whose token is decided gets it by one write (`FORCED_LOGIT` at that token, the rest of its
    row as it was), not by masking its row, and a step makes one pass, the max of each row (does a
    greedy row's best token start code?), unless guarded rows sample: then, in the steps where one
    of them may end, a logsumexp (the code tokens' mass for the marker) and the mask of their code
    tokens, as on the host."""

    def __init__(self, state: RowState, vocab: Vocab, policy: StopPolicy, device: torch.device,
                 to_device: Callable[[np.ndarray], torch.Tensor]):
        self.state, self.policy, self.device, self.to_device = state, policy, device, to_device
        self.drop_open_id = vocab.drop_open_id
        self.is_code = torch.as_tensor(vocab.is_code, device=device)
        self.noncode_ids = torch.as_tensor(vocab.noncode_ids, device=device)
        self.marker_id_of_kind = torch.as_tensor(vocab.marker_id_of_kind, device=device)

    def decide(self, logits: torch.Tensor, guarded: np.ndarray, stop_logits: torch.Tensor,
               done_logits: torch.Tensor | None) -> None:
        state = self.state
        num_rows = logits.shape[0]
        index = self.to_device(guarded)
        state.floats[FLOAT["p_stop"], index] = torch.sigmoid(stop_logits[index])
        state.floats[FLOAT["p_done"], index] = (torch.sigmoid(done_logits[index]) if done_logits is not None
                                                else torch.zeros_like(stop_logits[index]))
        state.has_probs[guarded] = True
        may = np.zeros(num_rows, dtype=bool)
        may[guarded[state.may_end(guarded)]] = True
        is_row_open = self.to_device(may)
        ints, floats = state.ints[:, :num_rows], state.floats[:, :num_rows]
        pending = ints[INT["pending_marker"]]
        is_forced = is_row_open & (pending >= 0)
        forced_id = torch.where(is_forced, self.marker_id_of_kind[pending.clamp(min=0)], self.drop_open_id)
        votes = vote_arrays(ints, floats)
        p_open, thresholds = floats[FLOAT["p_stop"]], floats[FLOAT["stop_threshold"]]
        is_open = is_row_open & (pending < 0)
        if self.policy.kind is PolicyKind.TOKEN:  # any next token stops it: the marker now
            may_drop = votes.num_code_lines >= self.policy.min_code_lines
            is_forced = is_forced | (is_open & may_drop & (
                votes.num_consecutive_stop_votes + (p_open >= thresholds) >= self.policy.num_consecutive))
        elif self.policy.has_line_start_stop and not self.policy.keep_stop_line:
            will_code = is_open & line_start_would_stop(votes, p_open, self.policy, thresholds)
            is_sampled_host = state.temperature[:num_rows] > 0
            # Known on the host: a greedy batch copies no flags over, and skips the sampled rows' work.
            is_sampled = self.to_device(is_sampled_host) if is_sampled_host.any() else None
            noncode = logits[:, self.noncode_ids]
            best = noncode.argmax(dim=1)
            code_wins = logits.amax(dim=1) > noncode.gather(1, best[:, None])[:, 0]
            will_greedy = will_code if is_sampled is None else will_code & ~is_sampled
            forced_id = torch.where(will_greedy, torch.where(code_wins, self.drop_open_id, self.noncode_ids[best]),
                                    forced_id)
            is_forced = is_forced | will_greedy
            if (is_sampled_host & may).any():
                self._carry_code_mass(logits, noncode, will_code & is_sampled, is_sampled_host)
        rows = torch.arange(num_rows, device=self.device)
        logits[rows, forced_id] = torch.where(is_forced, FORCED_LOGIT, logits[rows, forced_id])

    def _carry_code_mass(self, logits: torch.Tensor, noncode: torch.Tensor, will: torch.Tensor,
                         is_sampled_host: np.ndarray) -> None:
        """For the sampled rows in `will`: mask their code tokens and give the marker their mass
        after temperature, T*log(sum exp(l/T) over code), found as all tokens' less the others'
        (one logsumexp over the vocabulary, no masked copy of it)."""
        temperature = np.where(is_sampled_host, self.state.temperature[:logits.shape[0]], 1.0)
        t = self.to_device(temperature)
        lse_all = torch.logsumexp(logits / t.to(logits.dtype)[:, None], dim=1).double()
        lse_noncode = torch.logsumexp(noncode / t.to(noncode.dtype)[:, None], dim=1).double()
        # log(e^a - e^b) = a + log(1 - e^(b-a)); -inf when the code tokens hold no mass
        lse_code = lse_all + torch.log1p(-torch.exp((lse_noncode - lse_all).clamp(max=0.0)))
        marker = (t * lse_code).to(logits.dtype)
        logits.masked_fill_(will[:, None] & self.is_code[None, :], float("-inf"))
        column = logits[:, self.drop_open_id]
        logits[:, self.drop_open_id] = torch.where(will, marker, column)
