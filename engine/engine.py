"""The generation engine: scheduler + model runner + output processor, stepped in a loop.

No Ray and no HTTP in here: Serve replicas and Data actors wrap one Engine each.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


from engine.config import EngineConfig
from engine.errors import StepError, encode_prompt
from engine.output_processor import OutputProcessor
from engine.params import SamplingParams
from engine.runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import FinishReason, Result, Sequence, StepEvent
from guard.policy import StopPolicy
from guard.probe import GenGuard, shipped_guard_dir


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prefill_steps: int = 0
    num_decode_steps: int = 0
    num_generated_tokens: int = 0
    num_finished: int = 0
    num_guard_stops: int = 0
    num_dropped_tokens: int = 0
    max_decode_batch_size: int = 0
    num_failed_steps: int = 0  # the model's forward pass raised: every sequence in it failed
    num_failed_sequences: int = 0  # finished with finish reason "error" (in failed steps or alone)
    # Bounded history of (is_prefill, batch size) per step, for tests and debugging.
    step_batches: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "step_batches"}


class Engine:
    def __init__(self, model, tokenizer, guard: GenGuard | None = None,
                 config: EngineConfig = EngineConfig(), eos_token_ids: tuple[int, ...] = (),
                 model_name: str = "", max_model_len: int | None = None):
        self.config = config
        self.model_name = model_name or getattr(model.config, "_name_or_path", "")
        self.tokenizer = tokenizer
        hidden_size = model.config.get_text_config().hidden_size
        if guard is not None:
            guard.check_compatible(hidden_size, self.model_name)
            guard = guard.to(config.device).eval()
        self.guard = guard
        model_len = max_model_len or getattr(model.config, "max_position_embeddings", 32768)
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        eos = set(eos_token_ids) | ({tokenizer.eos_token_id} - {None})
        self.eos_token_ids = tuple(sorted(eos))
        self.scheduler = Scheduler(config)
        self.runner = ModelRunner(model, guard, config.device)
        self.processor = OutputProcessor(tokenizer, self.eos_token_ids, self.max_model_len,
                                         guard.policy if guard is not None else None)
        self.stats = EngineStats()
        self._sequences: dict[str, Sequence] = {}

    @classmethod
    def from_pretrained(cls, model: str = "default", guard: str | Path | GenGuard | None = "default",
                        config: EngineConfig = EngineConfig(), policy: StopPolicy | None = None
                        ) -> "Engine":
        """Load a model by name/path and its guard: "default" = the guard shipped for that model
        (none if the repo ships none), None = no guard, or a guard folder / GenGuard."""
        from engine.model_loading import load_model

        loaded = load_model(model, dtype=config.dtype, device=config.device)
        if isinstance(guard, str) and guard == "default":
            guard_dir = shipped_guard_dir(loaded.model_name)
            guard = GenGuard.load(guard_dir) if guard_dir else None
        elif isinstance(guard, (str, Path)):
            guard = GenGuard.load(guard)
        if guard is not None and policy is not None:
            guard.policy = policy
        return cls(loaded.model, loaded.tokenizer, guard, config, loaded.eos_token_ids,
                   loaded.model_name, loaded.max_model_len)

    # ---- request lifecycle -------------------------------------------------------------------
    def encode_prompt(self, prompt: str, params: SamplingParams) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.max_model_len)

    def add_request(self, prompt: str, params: SamplingParams = SamplingParams(),
                    request_id: str | None = None, stream: bool = False,
                    prompt_ids: list[int] | None = None) -> Sequence:
        """`prompt_ids`: what `encode_prompt(prompt, params)` returned, when the caller has it."""
        if prompt_ids is None:
            prompt_ids = self.encode_prompt(prompt, params)
        seq = Sequence(prompt=prompt, prompt_ids=prompt_ids, params=params,
                       request_id=request_id or "", is_streaming=stream)
        if seq.request_id in self._sequences:
            raise ValueError(f"request id {seq.request_id!r} is already in flight")
        self._sequences[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slot and cache rows are freed at the next step."""
        seq = self.scheduler.abort(request_id)
        if seq is not None and seq not in self.scheduler.running:
            self._sequences.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        # Aborted sequences leave before the batch is built.
        self._release(self.scheduler.pop_finished())
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        try:
            outputs = self.runner.prefill(seqs) if is_prefill else self.runner.decode(seqs)
        except Exception as exc:
            # A failed prefill left the cache as it was; a failed decode may have written some
            # layers and not others, but it held every running row, and all of them go now.
            self.stats.num_failed_steps += 1
            for seq in seqs:
                self._fail(seq, f"engine step failed: {type(exc).__name__}: {exc}")
            raise StepError(f"{type(exc).__name__}: {exc}", self._finished_events()) from exc
        self._record_step(is_prefill, len(seqs))
        events = []
        for seq, output in zip(seqs, outputs):
            if output.error is not None:
                self._fail(seq, str(output.error))
                continue
            try:  # one sequence whose processing raises fails alone; the batch goes on
                self.processor.process(seq, output)
                if seq.is_streaming and not seq.is_finished:
                    delta = self.processor.stream_delta(seq)
                    if delta:
                        events.append(StepEvent(seq.request_id, delta, False))
            except Exception as exc:
                self._fail(seq, f"{type(exc).__name__}: {exc}")
        return events + self._finished_events()

    def _fail(self, seq: Sequence, error: str) -> None:
        seq.error = error
        seq.finish(FinishReason.ERROR)

    def _finished_events(self) -> list[StepEvent]:
        events = []
        for seq in self._release(self.scheduler.pop_finished()):
            is_failed = seq.finish_reason is FinishReason.ERROR
            delta = self.processor.stream_delta(seq) if seq.is_streaming and not is_failed else ""
            events.append(StepEvent(seq.request_id, delta, True, Result.from_sequence(seq)))
        return events

    def _record_step(self, is_prefill: bool, batch_size: int) -> None:
        stats = self.stats
        stats.num_steps += 1
        stats.num_generated_tokens += batch_size
        stats.step_batches.append((is_prefill, batch_size))
        if is_prefill:
            stats.num_prefill_steps += 1
        else:
            stats.num_decode_steps += 1
            stats.max_decode_batch_size = max(stats.max_decode_batch_size, batch_size)

    def _release(self, finished: list[Sequence]) -> list[Sequence]:
        if finished:
            self.runner.free([s.seq_id for s in finished])
        for seq in finished:
            self._sequences.pop(seq.request_id, None)
            self.stats.num_finished += 1
            self.stats.num_guard_stops += seq.finish_reason is FinishReason.GUARD
            self.stats.num_failed_sequences += seq.finish_reason is FinishReason.ERROR
            self.stats.num_dropped_tokens += seq.num_output_tokens - len(seq.kept_ids)
        return finished

    # ---- convenience APIs --------------------------------------------------------------------
    def generate(self, prompts: list[str], params: SamplingParams | list[SamplingParams] = SamplingParams(),
                 use_tqdm: bool = False) -> list[Result]:
        """Run prompts to completion; results come back in prompt order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("need one SamplingParams per prompt")
        request_ids = [self.add_request(p, sp).request_id for p, sp in zip(prompts, params_list)]
        results: dict[str, Result] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm
            progress = tqdm(total=len(prompts), desc="generate", unit="req")
        while len(results) < len(request_ids) and self.has_unfinished():
            for event in self.step():
                if event.is_finished:
                    results[event.request_id] = event.result
                    if progress is not None:
                        progress.update(1)
        if progress is not None:
            progress.close()
        return [results[rid] for rid in request_ids]

    def stream(self, prompt: str, params: SamplingParams = SamplingParams()) -> Iterator[StepEvent]:
        """Yield text deltas of one request as they become safe to send; the last event has the Result."""
        request_id = self.add_request(prompt, params, stream=True).request_id
        try:
            while True:
                for event in self.step():
                    if event.request_id == request_id:
                        yield event
                        if event.is_finished:
                            return
        finally:
            self.abort(request_id)
            self._release(self.scheduler.pop_finished())
