"""vLLM's output as we return it: one contract for our backend (backends/vllm.py), Ray Serve LLM's
server (deployments/llm_app.py) and Ray Data LLM's postprocess (jobs/ray_data_llm.py).

vLLM reports a guard stop as a stop on a marker token (guard/export.py). Read here, a completion
keeps the ids and text the guard keeps (the excess line and the marker out), finishes as our
engine does (eos | stop | length | abort | guard) and counts what was dropped; a stream sends
only what no later stop can take back (engine/holdback.py), with the logprobs of what it sends.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from engine.holdback import HoldBack

logger = logging.getLogger(__name__)

GUARD_FINISH = "guard"
# vLLM's guard processor decides a stop on a line's end one step after it (guard/vllm_processor.py).
GUARD_STOP_LAG = 1


def finish_reason(vllm_reason: str | None, stop_reason) -> str:
    """vLLM's finish as our engine's: eos | stop (a stop string) | length | abort."""
    if vllm_reason in ("length", "abort"):
        return vllm_reason
    if vllm_reason == "stop":
        return "stop" if isinstance(stop_reason, str) else "eos"
    return vllm_reason or "eos"


@dataclass(frozen=True)
class Completion:
    """One finished completion as we return it."""

    token_ids: list[int]  # what is kept
    text: str | None
    finish_reason: str  # our engine's
    num_generated: int  # decode steps, a guard marker's included (it took the stopped token's step)
    guard_stop_index: int | None = None  # the token whose vote stopped it, as our engine counts

    @property
    def is_guard_stop(self) -> bool:
        return self.guard_stop_index is not None

    @property
    def num_cut(self) -> int:
        """vLLM's entries (ids, logprobs) past the kept ones, a marker's included."""
        return self.num_generated - len(self.token_ids)

    @property
    def num_dropped(self) -> int:
        """Decoded tokens cut from the output (a marker is no text)."""
        return self.num_cut - int(self.is_guard_stop)


class VllmOutputs:
    """Reads a served folder's vLLM outputs: its export (None without a guard), line ends, tokenizer."""

    def __init__(self, export, is_line_end, tokenizer):
        self.export = export
        self.is_line_end = is_line_end  # the token table's column (None without a guard)
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, folder: str | Path, guarded: bool = True) -> "VllmOutputs":
        from transformers import AutoTokenizer

        from guard.export import GuardExport
        from guard.token_table import TABLE_FILE, TokenTable

        tokenizer = AutoTokenizer.from_pretrained(folder)
        if not guarded:
            return cls(None, None, tokenizer)
        return cls(GuardExport.load(folder), TokenTable.load(Path(folder) / TABLE_FILE).arrays["is_line_end"],
                   tokenizer)

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def finished(self, token_ids, text: str | None, vllm_reason: str | None, stop_reason,
                 cap: int | None = None) -> Completion:
        """A finished vLLM completion (its ids, its text with an echoed prompt in front if any) as
        we return it. `cap`: the request's own max tokens where vLLM was allowed one more step, for
        a stop decided on the last allowed token's vote; unused, that step is cut off again."""
        token_ids = list(token_ids)
        kept = stop_index = None
        if self.export is not None:
            kept = self.export.kept_ids(token_ids, stop_reason, self.is_line_end)
            stop_index = self.export.stop_index(token_ids, stop_reason)
        if kept is not None and (cap is None or stop_index < cap):
            reason = GUARD_FINISH
        elif cap is not None and len(token_ids) > cap:  # the extra step the guard did not use
            kept, stop_index, reason = token_ids[:cap], None, "length"
        else:
            return Completion(token_ids, text, finish_reason(vllm_reason, stop_reason), len(token_ids))
        # vLLM's text is an echoed prompt (if any), then the completion's (a marker has no text):
        # the completion's part is replaced by what is kept.
        body = token_ids[:-1] if token_ids and token_ids[-1] == stop_reason else token_ids
        text = _replace_tail(text or "", self.decode(body), self.decode(kept))
        return Completion(kept, text, reason, len(token_ids), stop_index)


def _replace_tail(text: str, tail: str, new_tail: str) -> str:
    """`text` with its `tail` replaced; only `new_tail` if it does not end so (no echo then)."""
    return text[:len(text) - len(tail)] + new_tail if text.endswith(tail) else new_tail


# ---- streams --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Delta:
    """What a stream sends now: text, the ids behind it, their logprob entries (None: none asked)."""

    text: str
    token_ids: list[int]
    logprobs: list | None = None


@dataclass
class StreamedCompletion:
    """One streamed completion: every id (and logprob entry) so far, vLLM's text, what was sent."""

    outputs: VllmOutputs
    hold: HoldBack
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None  # one entry per id, where the client asked for them
    text: str = ""  # vLLM's text so far
    sent_text: str = ""
    num_sent_ids: int = 0
    lines_text: str = ""  # the decoded ids no guard stop can drop
    num_line_ids: int = 0

    @classmethod
    def start(cls, outputs: VllmOutputs, guarded: bool, stop=()) -> "StreamedCompletion":
        return cls(outputs, HoldBack(outputs.is_line_end if guarded else None, tuple(stop), GUARD_STOP_LAG))

    def add(self, new_ids, text: str, logprobs: list | None = None) -> None:
        """New ids (and their logprob entries) from vLLM, and its whole text so far."""
        self.token_ids.extend(new_ids)
        self.text = text
        if logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(logprobs)

    def safe_delta(self) -> Delta:
        """While running: what no later stop can take back."""
        end = self.hold.safe_token_end(self.token_ids)
        if self.hold.is_line_end is None:
            safe = self.text
        else:
            if end > self.num_line_ids:
                self.lines_text, self.num_line_ids = self.outputs.decode(self.token_ids[:end]), end
            safe = self.lines_text
        return self._advance(self.hold.safe_text(safe, self.text), end)

    def final_delta(self, completion: Completion) -> Delta:
        """At the finish: the rest of what the completion keeps."""
        return self._advance(completion.text or "", len(completion.token_ids))

    def _advance(self, safe: str, end: int) -> Delta:
        """Sent text stays a prefix of the final text: never take back what was sent."""
        if not safe.startswith(self.sent_text):
            logger.warning("a stream's safe text does not extend what was sent: held")
            safe = self.sent_text
        start, self.num_sent_ids = self.num_sent_ids, max(self.num_sent_ids, end)
        text, self.sent_text = safe[len(self.sent_text):], safe
        logprobs = None if self.logprobs is None else self.logprobs[start:end]
        return Delta(text, self.token_ids[start:end], logprobs)


# ---- logprobs -------------------------------------------------------------------------------------
# A completion's logprobs are lists with one entry per token (an echoed prompt's first); a chat
# completion's, the list `content`.
COMPLETION_LOGPROB_LISTS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
_LOGPROB_LISTS = COMPLETION_LOGPROB_LISTS + ("content",)


def drop_logprobs(logprobs, num_dropped: int) -> None:
    """Drops the entries of the last `num_dropped` tokens of a response choice's logprobs."""
    for name in _LOGPROB_LISTS:
        entries = getattr(logprobs, name, None)
        if isinstance(entries, list):
            setattr(logprobs, name, entries[:max(len(entries) - num_dropped, 0)])


def logprob_entries(logprobs: dict | None, is_chat: bool) -> list | None:
    """A streamed chunk's logprobs as one entry per token (None: none in this chunk)."""
    if not logprobs:
        return None
    if is_chat:
        return list(logprobs.get("content") or [])
    lists = {name: logprobs[name] for name in COMPLETION_LOGPROB_LISTS if isinstance(logprobs.get(name), list)}
    num_entries = max((len(values) for values in lists.values()), default=0)
    return [{name: values[i] for name, values in lists.items() if i < len(values)} for i in range(num_entries)]


def pack_logprobs(entries: list, is_chat: bool) -> dict:
    """Entries back into a streamed chunk's logprobs."""
    if is_chat:
        return {"content": entries}
    return {name: [entry.get(name) for entry in entries] for name in COMPLETION_LOGPROB_LISTS}


# ---- server-sent events ---------------------------------------------------------------------------
# Ray Serve LLM's LLMServer hands a stream over as vLLM's serialized SSE strings (vLLM serializes
# each chunk where it makes it), so a streamed chunk is patched as JSON.
def parse_sse(item) -> dict | None:
    """A stream item's chunk; None for [DONE], an error, anything not a chunk."""
    if not isinstance(item, str) or not item.startswith("data: "):
        return None
    payload = item[len("data: "):].strip()
    if payload == "[DONE]":
        return None
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError:
        return None
    return chunk if isinstance(chunk, dict) and "choices" in chunk else None


def to_sse(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"
