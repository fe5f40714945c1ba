"""GenGuard processor's bridge to the syntax gate (guard/syntax.py): host work, done only for the
rows proposing a stop, through the same `guard.policy` gate rules as our engine."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from guard.policy import StopPolicy, gate_may_refuse, gate_parse, gate_step
from guard.processor_state import RowState
from guard.syntax import gate_language, is_complete


class GateRequest:
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


class GateBridge:
    """The gate's say on the rows' proposed stops; every parse is remembered in the row's GateState."""

    def __init__(self, state: RowState, policy: StopPolicy, model_dir: Path):
        self.state, self.policy, self.model_dir = state, policy, model_dir
        self._tokenizer = None  # loaded at the first parse

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def kept_is_complete(self, index: int, num_kept: int) -> bool:
        """Does the row's prompt + its first `num_kept` output tokens parse as complete code?"""
        prompt, language = self.state.gate_input[index].resolve(self.tokenizer)
        if language is None:  # neither named nor told by the prompt: the row goes ungated
            return True
        kept = self.tokenizer.decode(self.state.output_ids[index][:num_kept], skip_special_tokens=True)
        return is_complete(language, prompt, kept, self.policy.syntax_gate_allows_stub)

    def folded(self, row_ids: np.ndarray, ends: np.ndarray, is_stop, keeps_line):
        """The stops the fold proposed, less those the gate refuses; every gated row's line start
        and gate state move on (`guard.policy.gate_step`, as in our engine)."""
        state = self.state
        stops = np.asarray(is_stop, dtype=bool)
        # Python per row only where a stop is proposed or a refusal is counting line ends.
        # (Observed rows never stop: their stops are not parsed.)
        candidates = (stops | state.is_gate_holding[row_ids]) & ~state.is_observed[row_ids]
        if candidates.any():  # most steps: none
            keeps = np.asarray(keeps_line, dtype=bool) | self.policy.keep_stop_line
            allowed = stops.copy()
            for j in np.flatnonzero(candidates).tolist():
                index = int(row_ids[j])
                if state.gate_input[index] is None:
                    continue
                num_kept = int(state.num_folded[index]) if keeps[j] else int(state.line_start[index])
                state.gate_state[index], allowed[j] = gate_step(
                    state.gate_state[index], bool(stops[j]), bool(ends[j]), num_kept, self.policy,
                    lambda n, i=index: self.kept_is_complete(i, n))
                state.is_gate_holding[index] = state.gate_state[index].num_refusals > 0
            is_stop = allowed
        ended = row_ids[ends]
        state.line_start[ended] = state.num_folded[ended]
        return is_stop

    def will(self, guarded: np.ndarray, will: np.ndarray) -> np.ndarray:
        """The rows a line-start stop would end before sampling, less those whose kept text (the
        lines before this one) the gate refuses."""
        state = self.state
        will = will.copy()
        for j in np.flatnonzero(will):
            index = int(guarded[j])
            if state.gate_input[index] is not None and gate_may_refuse(state.gate_state[index], self.policy):
                state.gate_state[index], will[j] = gate_parse(
                    state.gate_state[index], int(state.line_start[index]),
                    lambda n, i=index: self.kept_is_complete(i, n))
        return will
