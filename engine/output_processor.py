"""Folds one new token into a sequence and decides whether it finishes (and why).

Checks, in order: EOS, GenGuard's stop policy, stop strings, length. Text is decoded only when a
rule needs it (line ends for the guard, stop strings, streaming, the final result).
"""
from __future__ import annotations

from functools import cached_property

import numpy as np

from guard.policy import StopPolicy, fold_token, gate_step
from guard.syntax import gate_check
from guard.token_table import TokenTable

from engine.holdback import HoldBack
from engine.runner import RunnerOutput
from engine.sequence import FinishReason, Sequence


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int,
                 policy: StopPolicy | None):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.policy = policy

    @cached_property
    def token_table(self) -> TokenTable:
        """What the stop rules need of each token's text (the vLLM processor uses the same table)."""
        return TokenTable.from_tokenizer(self.tokenizer)

    @cached_property
    def newline_token_ids(self) -> frozenset[int]:
        """Token ids whose text contains a newline: a line end is any of them, not one id."""
        return frozenset(np.flatnonzero(self.token_table.arrays["is_line_end"]).tolist())

    @cached_property
    def whitespace_token_ids(self) -> frozenset[int]:
        """Token ids that are only whitespace (indentation): they do not start a line's code."""
        return frozenset(np.flatnonzero(self.token_table.arrays["is_whitespace"]).tolist())

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def process(self, seq: Sequence, output: RunnerOutput) -> None:
        token_id = output.token_id
        seq.append_token(token_id)
        if token_id in self.eos_token_ids and not seq.params.ignore_eos:
            self._finish(seq, FinishReason.EOS)
            return
        if self._guard_stops(seq, output.p_stop, output.p_done):
            self._finish(seq, FinishReason.GUARD)
            return
        if seq.params.stop and self._stop_string_matches(seq):
            return
        if seq.num_output_tokens >= seq.params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, FinishReason.LENGTH)

    def _guard_stops(self, seq: Sequence, p_stop: float | None, p_done: float | None = None) -> bool:
        is_line_end = seq.output_ids[-1] in self.newline_token_ids
        guard_on = self.policy is not None and p_stop is not None and seq.params.use_guard
        if not guard_on:
            if is_line_end:
                seq.line_start = seq.num_output_tokens
            return False
        decision = fold_token(seq.vote_state, p_stop, self.token_table.features(seq.output_ids[-1]),
                              self.policy, seq.params.guard_threshold, p_done=p_done)
        seq.vote_state = decision.state
        # The line being written when the guard fired is excess: drop it unless asked to keep
        # (or the done rule fired: that line was the expected code's last).
        num_kept = (seq.num_output_tokens if self.policy.keep_stop_line or decision.keeps_line
                    else seq.line_start)
        is_stop = decision.is_stop
        if self.policy.syntax_gate and (is_stop or seq.gate_state.num_refusals):
            check = gate_check(self.policy, seq.params.language, seq.prompt,
                               lambda n: self.decode(seq.output_ids[:n]))
            seq.gate_state, is_stop = gate_step(seq.gate_state, is_stop, is_line_end, num_kept, self.policy, check)
        if is_stop:
            seq.num_kept_tokens = num_kept
            return True
        if is_line_end:
            seq.line_start = seq.num_output_tokens
        return False

    def _stop_string_matches(self, seq: Sequence) -> bool:
        text = self.decode(seq.output_ids)
        # Only the tail can hold a new match: earlier text was already searched.
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(0, len(seq.text) - longest)
        hits = [i for i in (text.find(s, search_from) for s in seq.params.stop) if i >= 0]
        seq.text = text
        if not hits:
            return False
        self._finish(seq, FinishReason.STOP, text=text[:min(hits)])
        return True

    def _finish(self, seq: Sequence, reason: FinishReason, text: str | None = None) -> None:
        seq.text = self.decode(seq.kept_ids) if text is None else text
        seq.finish(reason)

    def stream_delta(self, seq: Sequence) -> str:
        """New text that is safe to send: it will not be dropped or truncated later."""
        if seq.is_finished:
            safe = seq.text
        else:
            # With the guard on, the current line may still be dropped (a stop is decided on the
            # token's own vote here, so no lag); seq.text is the whole text when stop strings are set.
            guard_on = self.policy is not None and seq.params.use_guard and not self.policy.keep_stop_line
            hold = HoldBack(self.token_table.arrays["is_line_end"] if guard_on else None, tuple(seq.params.stop))
            safe = hold.safe_text(self.decode(seq.output_ids[:hold.safe_token_end(seq.output_ids)]), seq.text)
        delta = safe[seq.num_streamed_chars:]
        seq.num_streamed_chars = max(seq.num_streamed_chars, len(safe))
        return delta
