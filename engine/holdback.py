"""What a stream holds back: the text of a running request that a later stop can still take back.

One rule for every stream we send, our engine's and vLLM's (backends/vllm_output.py): a guard stop
drops the line being written, so only whole lines are sure; a stop string cuts the text where it
begins, so its possible start is not; nor is a partial UTF-8 character at the end.
"""
from __future__ import annotations

from dataclasses import dataclass

from guard.export import last_line_end

REPLACEMENT_CHAR = "\ufffd"  # what decoding makes of a character whose bytes have not all come


@dataclass(frozen=True)
class HoldBack:
    """Where a running request's safe text ends."""

    is_line_end: object | None = None  # the token table's column; None: no guard stop can come
    stop: tuple[str, ...] = ()  # the request's stop strings
    guard_lag: int = 0  # steps from a token to a stop decided on its vote (vLLM's processor: one)

    def safe_token_end(self, token_ids) -> int:
        """How many tokens no guard stop can drop: those up to the last line end before the
        newest `guard_lag` (a stop decided on a line's end comes that many steps after it)."""
        if self.is_line_end is None:
            return len(token_ids)
        return last_line_end(token_ids, len(token_ids) - self.guard_lag, self.is_line_end)

    def safe_text(self, safe: str, text: str) -> str:
        """`safe`, a prefix of the request's whole `text` so far, short of a partial character and
        of the tail where a stop string may begin."""
        safe = safe.rstrip(REPLACEMENT_CHAR)
        if not self.stop:
            return safe
        hold = max(len(s) for s in self.stop) - 1  # a whole stop string would have ended the request
        return safe[:max(min(len(safe), len(text.rstrip(REPLACEMENT_CHAR)) - hold), 0)]
