"""The engine's errors and prompt check, shared by both backends, Serve and batch jobs.

Kept apart from engine/engine.py (which imports torch and transformers) so that processes that
only route or record requests (a job's driver, its ledger and Ray Data tasks, the HTTP worker)
can raise and catch them without importing torch: each such import costs seconds of CPU and
hundreds of MiB in every Ray worker process."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.sequence import StepEvent


class PromptError(ValueError):
    """The prompt cannot be served (empty, not text, not encodable, or longer than the context
    allows): the caller's fault, a 400 / an error row."""


class EngineDeadError(RuntimeError):
    """The engine can no longer serve (its step loop died or is wedged): restart the replica."""


class SequenceError(RuntimeError):
    """Generation failed for this one request (its Result has finish_reason "error")."""


class StepError(RuntimeError):
    """A whole step failed (the model's forward pass raised). Every sequence of that step is
    finished with finish reason "error" and released; `events` carries their Results, so the
    caller can fail exactly those requests. Sequences not in the step are untouched."""

    def __init__(self, message: str, events: list[StepEvent]):
        super().__init__(message)
        self.events = events


def encode_prompt(tokenizer, prompt: str, max_model_len: int) -> list[int]:
    """Token ids of a prompt, or PromptError saying why it cannot be served (both backends)."""
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt:
        raise PromptError("prompt is empty")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") is no text a tokenizer takes
        raise PromptError(f"prompt is not valid Unicode text: character {exc.start} is"
                          f" U+{ord(prompt[exc.start]):04X}, a lone surrogate") from None
    try:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    except Exception as exc:  # whatever else the tokenizer refuses is the prompt's fault
        raise PromptError(f"prompt cannot be tokenized: {type(exc).__name__}: {exc}") from exc
    if not prompt_ids:
        raise PromptError("prompt encodes to no tokens")
    if len(prompt_ids) >= max_model_len:
        raise PromptError(f"prompt has {len(prompt_ids)} tokens; the model's context is"
                          f" {max_model_len} tokens and at least one must be generated")
    return prompt_ids
