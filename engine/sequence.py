"""One request's whole state: ids, status, finish reason, guard votes, timings."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.params import SamplingParams
from guard.policy import GateState, VoteState

if TYPE_CHECKING:  # torch is the runner's; this module stays light (engine/errors.py says why)
    import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"  # a stop string matched
    GUARD = "guard"  # GenGuard voted the code now being written is excess
    ABORT = "abort"  # the client went away or the request was cancelled
    ERROR = "error"  # generation failed for this sequence (Result.error says why)


_seq_counter = itertools.count()


@dataclass
class Sequence:
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # Guard state: votes of the line now being written, and where that line starts in output_ids.
    vote_state: VoteState = field(default_factory=VoteState)
    line_start: int = 0
    gate_state: GateState = field(default_factory=GateState)  # the syntax gate's, when the policy has it
    # Output length to report; tokens past it were generated but cut (stop string or guard line).
    num_kept_tokens: int | None = None
    text: str = ""
    num_streamed_chars: int = 0  # how much of the text a stream consumer already got
    is_streaming: bool = False
    generator: torch.Generator | None = None  # per-request RNG when a seed is given
    error: str | None = None  # why generation failed (finish reason ERROR)
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"seq-{self.seq_id}"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def kept_ids(self) -> list[int]:
        n = len(self.output_ids) if self.num_kept_tokens is None else self.num_kept_tokens
        return self.output_ids[:n]

    def append_token(self, token_id: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.output_ids.append(token_id)

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = time.perf_counter()


@dataclass(frozen=True)
class Result:
    """What a caller gets back for one finished request."""

    request_id: str
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    num_generated_tokens: int  # tokens the model actually decoded (work done)
    num_dropped_tokens: int  # decoded but cut from `text` (the guard's excess line / stop string tail)
    latency_s: float
    time_to_first_token_s: float | None
    error: str | None = None  # set when finish_reason is "error": why this sequence failed
    # A guard stop: index (in the generated tokens) of the token whose vote stopped it, as
    # guard.policy.find_stop counts; with len(token_ids) it is what the policy replay predicts.
    guard_stop_index: int | None = None
    num_gate_refusals: int = 0  # guard stops the syntax gate refused (the kept code did not parse)

    @classmethod
    def from_sequence(cls, seq: Sequence) -> "Result":
        end = seq.finish_time or time.perf_counter()
        ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time
        return cls(
            request_id=seq.request_id,
            prompt=seq.prompt,
            text=seq.text,
            token_ids=list(seq.kept_ids),
            finish_reason=seq.finish_reason.value if seq.finish_reason else "",
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_output_tokens,
            num_dropped_tokens=seq.num_output_tokens - len(seq.kept_ids),
            latency_s=end - seq.arrival_time,
            time_to_first_token_s=ttft,
            error=seq.error,
            guard_stop_index=seq.num_output_tokens - 1 if seq.finish_reason is FinishReason.GUARD else None,
            num_gate_refusals=seq.gate_state.num_refusals,
        )


@dataclass(frozen=True)
class StepEvent:
    """What one step produced for one request: new text (streams only), and the result once done."""

    request_id: str
    text_delta: str
    is_finished: bool
    result: Result | None = None
