"""The one engine protocol that Serve deployments and Data jobs talk to, whatever runs underneath.

Two backends implement it: ours (`backends.codefast`: engine/ stepped by a background thread,
any HF causal LM) and vLLM (`backends.vllm`: vLLM's AsyncLLM with GenGuard in a logits
processor). Callers never branch on which one they hold: they submit `SamplingParams`, get
`StepEvent`s (streams) or `Result`s, and report `stats()` / `check_health()`.
"""
from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass

from engine.errors import EngineDeadError, PromptError
from engine.params import SamplingParams
from engine.sequence import Result, StepEvent

BACKEND_NAMES = ("codefast", "vllm")

__all__ = ["BACKEND_NAMES", "EngineDeadError", "GenerationBackend", "ModelInfo", "PromptError"]


@dataclass(frozen=True)
class ModelInfo:
    """What a backend serves, for `/v1/models`, validation and logs."""

    model_name: str
    max_model_len: int
    has_guard: bool
    backend: str


class GenerationBackend(abc.ABC):
    """A running engine that many callers (coroutines or threads) share."""

    info: ModelInfo

    @abc.abstractmethod
    def encode_prompt(self, prompt: str, params: SamplingParams) -> list[int]:
        """Token ids of a prompt; raises PromptError (the caller's fault, a 4xx / error row) for a
        prompt this backend cannot serve: not text, empty, not encodable, too long."""

    @abc.abstractmethod
    def stream(self, prompt: str, params: SamplingParams,
               request_id: str | None = None) -> AsyncIterator[StepEvent]:
        """Async iterator of one request's events; the last has `is_finished` and the Result.
        Text deltas are safe: a line the guard may still drop is never sent. Cancelling the
        consumer aborts the request and frees its slot."""

    async def generate(self, prompt: str, params: SamplingParams,
                       request_id: str | None = None) -> Result:
        async for event in self.stream(prompt, params, request_id):
            if event.is_finished:
                return event.result
        raise RuntimeError("request ended without a result")

    @abc.abstractmethod
    def submit(self, prompt: str, params: SamplingParams, request_id: str | None = None) -> Future:
        """From any thread: queue one request, get a concurrent Future of its Result. Raises
        PromptError at once (nothing queued) for a prompt the backend cannot serve."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """Counters published by the engine (never blocks on a running step)."""

    @abc.abstractmethod
    def check_health(self) -> None:
        """Raise EngineDeadError when the engine cannot serve any more."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the engine; pending requests fail."""


async def gather_results(backend: GenerationBackend, prompts: list[str],
                         params: list[SamplingParams]) -> list[Result]:
    """Run prompts concurrently on one backend; results in prompt order."""
    return list(await asyncio.gather(*(backend.generate(p, sp) for p, sp in zip(prompts, params))))
