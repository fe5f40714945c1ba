"""vLLM behind the backend protocol, with GenGuard inside it (guard/export.py, guard/vllm_processor.py).

vLLM's AsyncLLM runs on a private event loop in a background thread, so every caller works the
same way whatever its own situation: Serve coroutines (`stream`, `generate`), Ray Data actor
threads (`submit`). With a guard, the engine serves the exported folder (the guard rows in the
LM head, markers as EOS) and the logits processor decides; this module turns a marker at the end
of a completion back into what our engine reports (backends/vllm_output.py: finish reason
`guard`, the kept text without the excess line, and while streaming only what no later stop can
take back); its engine arguments are backends/vllm_args.py's.

Every request runs with the guard off, on, observed (votes only), or with its own threshold
(`SamplingParams.use_guard`, `guard_threshold`): the same engine serves them all at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from backends.protocol import GenerationBackend, ModelInfo
from backends.spec import BackendSpec
from backends.vllm_args import served_folder, vllm_engine_args
from backends.vllm_output import StreamedCompletion, VllmOutputs
from engine.errors import EngineDeadError, encode_prompt
from engine.params import SamplingParams
from engine.sequence import Result, StepEvent

logger = logging.getLogger(__name__)

ENGINE_START_TIMEOUT_S = 900  # a CPU start takes about a minute; a first GPU compile, more


@dataclass
class _Request:
    """What the backend tracks of one request while it runs (on the backend's loop)."""

    request_id: str
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    uses_guard: bool
    observes_guard: bool = False  # count the guard's votes (and trace them), never stop
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    stream: StreamedCompletion | None = None  # what a stream holds back and has sent


class VllmBackend(GenerationBackend):
    def __init__(self, spec: BackendSpec):
        self.spec = spec
        device = spec.resolved_device()
        self.folder, model_name = served_folder(spec)
        self.outputs = VllmOutputs.load(self.folder, guarded=spec.guard is not None)
        self.export, self.tokenizer = self.outputs.export, self.outputs.tokenizer
        max_len = self._model_max_len()
        self.max_model_len = min(spec.max_model_len or max_len, max_len)
        self.info = ModelInfo(model_name=model_name, max_model_len=self.max_model_len,
                              has_guard=self.export is not None, backend="vllm")
        self._num_requests = 0
        self._num_guard_stops = 0
        self._num_generated_tokens = 0
        self._num_dropped_tokens = 0
        self._num_running = 0
        self._last_output_at = time.monotonic()  # any request's newest output (wedge check)
        self._stats_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        self._engine = None
        start = asyncio.run_coroutine_threadsafe(self._start(device), self._loop)
        self._engine = start.result(timeout=ENGINE_START_TIMEOUT_S)

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> "VllmBackend":
        return cls(spec)

    def _model_max_len(self) -> int:
        import json

        from engine.model_loading import MAX_MODEL_LEN_CAP

        config = json.loads((Path(self.folder) / "config.json").read_text())
        text_config = config.get("text_config", config)
        return min(int(text_config.get("max_position_embeddings") or MAX_MODEL_LEN_CAP), MAX_MODEL_LEN_CAP)

    async def _start(self, device: str):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = vllm_engine_args(self.spec.with_overrides(device=device, max_model_len=self.max_model_len))
        kwargs = dict(args.kwargs)
        if device != "cpu":  # this backend shares its GPU as the spec says; Ray's LLM apps take vLLM's share
            kwargs["gpu_memory_utilization"] = self.spec.gpu_memory_utilization
        for name, value in args.env.items():  # read by vLLM when the config is built, below
            os.environ.setdefault(name, value)
        return AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(self.folder), disable_log_stats=True, **kwargs))

    # ---- protocol ---------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, params: SamplingParams) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.max_model_len)  # the checks of our engine

    def stream(self, prompt: str, params: SamplingParams,
               request_id: str | None = None) -> AsyncIterator[StepEvent]:
        prompt_ids = self.encode_prompt(prompt, params)  # PromptError before anything is queued
        return self._stream(prompt, prompt_ids, params, request_id or uuid.uuid4().hex)

    async def _stream(self, prompt: str, prompt_ids: list[int], params: SamplingParams,
                      request_id: str) -> AsyncIterator[StepEvent]:
        caller_loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            caller_loop.call_soon_threadsafe(queue.put_nowait, item)

        request = self._new_request(request_id, prompt, prompt_ids, params)
        request.stream = StreamedCompletion.start(self.outputs, request.uses_guard, params.stop)
        asyncio.run_coroutine_threadsafe(self._pump(request, put), self._loop)
        is_finished = False
        try:
            while not is_finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    is_finished = True
                    raise item
                is_finished = item.is_finished
                yield item
        finally:
            if not is_finished:  # the caller went away: free the slot
                asyncio.run_coroutine_threadsafe(self._abort(request_id), self._loop)

    def submit(self, prompt: str, params: SamplingParams, request_id: str | None = None,
               observe_guard: bool = False) -> Future:
        """`observe_guard` (this backend only): the guard counts its votes and, with
        CODEFAST_GUARD_TRACE_DIR set, traces its probabilities, but never stops the request."""
        prompt_ids = self.encode_prompt(prompt, params)
        request = self._new_request(request_id or uuid.uuid4().hex, prompt, prompt_ids, params)
        request.observes_guard = observe_guard and self.export is not None
        request.uses_guard = request.uses_guard and not request.observes_guard
        future: Future = Future()

        def put(item) -> None:
            if isinstance(item, BaseException):
                future.set_exception(item)
            elif item.is_finished:
                future.set_result(item.result)

        asyncio.run_coroutine_threadsafe(self._pump(request, put), self._loop)
        return future

    def reset_prefix_cache(self) -> bool:
        """Empties vLLM's prefix cache; False when vLLM refused (it does while requests run).
        A prompt found there is prefilled only past the cached blocks, in other matrix shapes than
        a fresh prefill, and bf16 sums over other shapes can round otherwise: two runs that must
        compute alike (benchmarks.vllm_exactness) empty it first."""
        if self._engine is None:
            raise RuntimeError("the vLLM backend is shut down")
        return asyncio.run_coroutine_threadsafe(self._engine.reset_prefix_cache(), self._loop).result(timeout=60)

    def stats(self) -> dict:
        with self._stats_lock:
            return {"backend": "vllm", "num_requests": self._num_requests, "num_running": self._num_running,
                    "num_generated_tokens": self._num_generated_tokens, "num_guard_stops": self._num_guard_stops,
                    "num_dropped_tokens": self._num_dropped_tokens}

    def check_health(self) -> None:
        engine = self._engine
        if engine is None or not self._thread.is_alive():
            raise EngineDeadError("the vLLM engine is not running")
        if engine.errored:
            raise EngineDeadError(f"the vLLM engine died: {engine.dead_error}")
        # vLLM's steps run in its engine-core process; from here a wedged step shows as requests
        # that get no output at all (every running request gets a token each step).
        silent_s = time.monotonic() - self._last_output_at
        if self._num_running and silent_s > self.spec.wedge_timeout_s:
            raise EngineDeadError(f"{self._num_running} requests running and no output for {silent_s:.0f} s"
                                  f" (wedge timeout {self.spec.wedge_timeout_s:.0f} s)")

    def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if not self._loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(_close(engine), self._loop).result(timeout=60)
        except Exception:  # already gone, or stuck: the daemon thread dies with the process
            logger.debug("vLLM shutdown raised", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # ---- requests on the backend loop -----------------------------------------------------------
    def _new_request(self, request_id: str, prompt: str, prompt_ids: list[int],
                     params: SamplingParams) -> _Request:
        uses_guard = self.export is not None and params.use_guard
        return _Request(request_id, prompt, prompt_ids, params, uses_guard)

    def vllm_params(self, params: SamplingParams, *, observe: bool = False):
        """Our SamplingParams as vLLM's. `observe`: count the guard's votes without stopping."""
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        from guard.vllm_contract import GUARD_ARG, LANGUAGE_ARG, OBSERVE

        extra = {}
        stop_token_ids = []
        if self.export is not None:
            setting = OBSERVE if observe else (params.guard_threshold or "on") if params.use_guard else "off"
            extra[GUARD_ARG] = setting
            if params.language is not None:
                extra[LANGUAGE_ARG] = params.language
            # Explicitly, so that a request with ignore_eos still ends on a guard marker.
            stop_token_ids = list(self.export.marker_ids)
        # A stop decided on the last allowed token's own vote (a line end, the done rule) is
        # forced one step later: one more step is allowed, and reading the output cuts it off again
        # when the guard did not use it (VllmOutputs.finished's `cap`), so the cap acts as in our
        # engine (guard first, then length).
        # An observing guard never stops, so it gets no extra step.
        max_tokens = params.max_new_tokens + (1 if extra.get(GUARD_ARG) not in (None, "off", OBSERVE) else 0)
        return VllmParams(
            n=1, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            max_tokens=max_tokens, stop=list(params.stop) or None,
            stop_token_ids=stop_token_ids, ignore_eos=params.ignore_eos, skip_special_tokens=True,
            extra_args=extra or None,
            # Cumulative for submit too: every step's output keeps the wedge check fed.
            output_kind=RequestOutputKind.CUMULATIVE)

    async def _pump(self, request: _Request, put) -> None:
        with self._stats_lock:
            self._num_requests += 1
            if not self._num_running:
                self._last_output_at = time.monotonic()
            self._num_running += 1
        is_running = True

        def done(item) -> None:  # counted out before the caller hears of it
            nonlocal is_running
            with self._stats_lock:
                self._num_running -= is_running
                is_running = False
            put(item)

        try:
            engine = self._engine
            if engine is None:
                raise EngineDeadError("the vLLM engine is shut down")
            params = self.vllm_params(request.params, observe=request.observes_guard)
            stream = request.stream
            async for output in engine.generate({"prompt_token_ids": request.prompt_ids}, params,
                                                request.request_id):
                completion = output.outputs[0]
                self._last_output_at = time.monotonic()
                if request.first_token_time is None and completion.token_ids:
                    request.first_token_time = time.perf_counter()
                if stream is not None:  # cumulative outputs: the ids not seen yet, the whole text
                    stream.add(completion.token_ids[len(stream.token_ids):], completion.text)
                if output.finished:
                    kept = self.outputs.finished(completion.token_ids, completion.text, completion.finish_reason,
                                                 completion.stop_reason, cap=request.params.max_new_tokens)
                    delta = stream.final_delta(kept).text if stream is not None else ""
                    done(StepEvent(request.request_id, delta, True, self._result(request, kept)))
                    return
                if stream is not None:
                    delta = stream.safe_delta().text
                    if delta:
                        put(StepEvent(request.request_id, delta, False))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # hand engine errors to the caller instead of losing them
            done(exc)
        finally:
            with self._stats_lock:
                self._num_running -= is_running

    async def _abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    def _result(self, request: _Request, kept) -> Result:
        """A finished completion (backends/vllm_output.py's) as our engine's Result; counted."""
        with self._stats_lock:
            self._num_generated_tokens += kept.num_generated
            if kept.is_guard_stop:
                self._num_guard_stops += 1
                self._num_dropped_tokens += kept.num_dropped
        return Result(
            request_id=request.request_id, prompt=request.prompt, text=kept.text, token_ids=kept.token_ids,
            finish_reason=kept.finish_reason, num_prompt_tokens=len(request.prompt_ids),
            num_generated_tokens=kept.num_generated, num_dropped_tokens=kept.num_dropped,
            latency_s=time.perf_counter() - request.arrival_time,
            time_to_first_token_s=(None if request.first_token_time is None
                                   else request.first_token_time - request.arrival_time),
            guard_stop_index=kept.guard_stop_index)


async def _close(engine) -> None:
    """Stop the engine and the tasks it left on this loop (its output handler)."""
    if engine is not None:
        engine.shutdown()
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
