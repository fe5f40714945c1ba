"""vLLM behind the backend protocol, with GenGuard inside it (guard/export.py, guard/vllm_processor.py).

vLLM's AsyncLLM runs on a private event loop in a background thread, so every caller works the
same way whatever its own situation: Serve coroutines (`stream`, `generate`), Ray Data actor
threads (`submit`). With a guard, the engine serves the exported folder (the guard rows in the
LM head, markers as EOS) and the logits processor decides; this module turns a marker at the end
of a completion back into what our engine reports: finish reason `guard` and the kept text
without the excess line. While streaming, a line the guard may still drop is held back: text is
sent up to the last line end before the newest token (a stop decided on a line's end comes one
step after it).

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

import numpy as np

from backends.protocol import GenerationBackend, ModelInfo
from backends.spec import VLLM_CPU_EXECUTOR, VLLM_CPU_EXECUTOR_ENV, BackendSpec
from engine.dtypes import resolve_dtype
from engine.errors import EngineDeadError, encode_prompt
from engine.params import SamplingParams
from engine.sequence import Result, StepEvent
from guard.export import last_line_end

logger = logging.getLogger(__name__)

ENGINE_START_TIMEOUT_S = 900  # a CPU start takes about a minute; a first GPU compile, more
_LOOPBACK_ENV = {"VLLM_HOST_IP": "127.0.0.1"}  # keep vLLM's own sockets on loopback
_GUARD_MARKER_FINISH = "guard"
GIB = 1 << 30


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
    safe_text: str = ""  # decoded whole lines the guard can no longer drop
    num_safe_ids: int = 0  # tokens behind safe_text
    sent_text: str = ""  # what the stream has sent


class VllmBackend(GenerationBackend):
    def __init__(self, spec: BackendSpec):
        from guard.export import GuardExport, export_folder_for, resolve_model_folder

        self.spec = spec
        device = spec.resolved_device()
        if spec.guard is not None:
            self.folder = export_folder_for(spec.model, spec.guard)
            self.export = GuardExport.load(self.folder)
            model_name = self.export.model_name
        else:
            self.folder, model_name = resolve_model_folder(spec.model)
            self.export = None
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.line_end_ids = self._line_end_table()
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

    def _line_end_table(self) -> np.ndarray:
        if self.export is not None:
            from guard.token_table import TABLE_FILE, TokenTable

            return TokenTable.load(self.folder / TABLE_FILE).arrays["is_line_end"]
        from guard.token_table import TokenTable

        return TokenTable.from_tokenizer(self.tokenizer).arrays["is_line_end"]

    def _model_max_len(self) -> int:
        import json

        from engine.model_loading import MAX_MODEL_LEN_CAP

        config = json.loads((Path(self.folder) / "config.json").read_text())
        text_config = config.get("text_config", config)
        return min(int(text_config.get("max_position_embeddings") or MAX_MODEL_LEN_CAP), MAX_MODEL_LEN_CAP)

    async def _start(self, device: str):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        env = dict(_LOOPBACK_ENV)
        enforce_eager = self.spec.enforce_eager if self.spec.enforce_eager is not None else device == "cpu"
        kwargs = {}
        if self.export is not None:
            from guard.vllm_processor import GenGuardLogitsProcessor

            kwargs["logits_processors"] = [GenGuardLogitsProcessor]
        if device == "cpu":  # an explicit KV size; vLLM then skips its reserve-92%-of-RAM check
            kwargs["kv_cache_memory_bytes"] = self.spec.kv_cache_gib * GIB
            kwargs["distributed_executor_backend"] = VLLM_CPU_EXECUTOR
            env |= VLLM_CPU_EXECUTOR_ENV
        else:
            kwargs["gpu_memory_utilization"] = self.spec.gpu_memory_utilization
        for name, value in env.items():  # read by vLLM when the config is built, below
            os.environ.setdefault(name, value)
        args = AsyncEngineArgs(model=str(self.folder), dtype=resolve_dtype(self.spec.dtype, device),
                               max_num_seqs=self.spec.max_num_seqs, max_model_len=self.max_model_len,
                               enforce_eager=enforce_eager, seed=0, disable_log_stats=True, **kwargs)
        return AsyncLLM.from_engine_args(args)

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
        asyncio.run_coroutine_threadsafe(self._pump(request, put, is_stream=True), self._loop)
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

        asyncio.run_coroutine_threadsafe(self._pump(request, put, is_stream=False), self._loop)
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
        # forced one step later: one more step is allowed, and _result cuts it off again when
        # the guard did not use it, so the cap acts as in our engine (guard first, then length).
        # An observing guard never stops, so it gets no extra step.
        max_tokens = params.max_new_tokens + (1 if extra.get(GUARD_ARG) not in (None, "off", OBSERVE) else 0)
        return VllmParams(
            n=1, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            max_tokens=max_tokens, stop=list(params.stop) or None,
            stop_token_ids=stop_token_ids, ignore_eos=params.ignore_eos, skip_special_tokens=True,
            extra_args=extra or None,
            # Cumulative for submit too: every step's output keeps the wedge check fed.
            output_kind=RequestOutputKind.CUMULATIVE)

    async def _pump(self, request: _Request, put, is_stream: bool) -> None:
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
            async for output in engine.generate({"prompt_token_ids": request.prompt_ids}, params,
                                                request.request_id):
                completion = output.outputs[0]
                self._last_output_at = time.monotonic()
                if request.first_token_time is None and completion.token_ids:
                    request.first_token_time = time.perf_counter()
                if output.finished:
                    result = self._result(request, completion)
                    done(StepEvent(request.request_id, _advance(request, result.text) if is_stream else "",
                                   True, result))
                    return
                if is_stream:
                    delta = self._safe_delta(request, completion)
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

    def _safe_delta(self, request: _Request, completion) -> str:
        """New text no rule can take back: with the guard, whole lines up to the last line end
        before the newest token; with stop strings, all but a possible stop string's start."""
        if request.uses_guard:
            token_ids = completion.token_ids
            safe_end = last_line_end(token_ids, len(token_ids) - 1, self.line_end_ids)
            if safe_end > request.num_safe_ids:
                request.safe_text += self.tokenizer.decode(token_ids[request.num_safe_ids:safe_end],
                                                           skip_special_tokens=True)
                request.num_safe_ids = safe_end
            safe = request.safe_text
        else:
            safe = completion.text
        if request.params.stop:  # vLLM cuts a matched stop string (and what follows) off the text
            hold = max(len(s) for s in request.params.stop) - 1
            safe = safe[:max(min(len(safe), len(completion.text) - hold), 0)]
        return _advance(request, safe)

    def _result(self, request: _Request, completion) -> Result:
        token_ids = list(completion.token_ids)
        cap = request.params.max_new_tokens
        kept = (self.export.kept_ids(token_ids, completion.stop_reason, self.line_end_ids)
                if self.export is not None else None)
        stop_index = None if kept is None else self.export.stop_index(token_ids, completion.stop_reason)
        if kept is not None and stop_index < cap:
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            finish_reason = _GUARD_MARKER_FINISH
        elif len(token_ids) > cap:  # the extra step the guard did not use: the cap ends it
            kept, stop_index = token_ids[:cap], None
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            finish_reason = "length"
        else:
            kept, text, stop_index = token_ids, completion.text, None
            finish_reason = _finish_reason(completion)
        is_guard_stop = stop_index is not None
        now = time.perf_counter()
        # Generated: every decode step, the marker's included (it took the step of the token the
        # guard stopped on). Dropped: decoded text cut from the output (the marker is no text).
        num_generated = len(token_ids)
        num_dropped = num_generated - len(kept) - int(is_guard_stop)
        with self._stats_lock:
            self._num_generated_tokens += num_generated
            if is_guard_stop:
                self._num_guard_stops += 1
                self._num_dropped_tokens += num_dropped
        return Result(
            request_id=request.request_id, prompt=request.prompt, text=text, token_ids=kept,
            finish_reason=finish_reason, num_prompt_tokens=len(request.prompt_ids),
            num_generated_tokens=num_generated, num_dropped_tokens=num_dropped,
            latency_s=now - request.arrival_time,
            time_to_first_token_s=(None if request.first_token_time is None
                                   else request.first_token_time - request.arrival_time),
            guard_stop_index=stop_index)


async def _close(engine) -> None:
    """Stop the engine and the tasks it left on this loop (its output handler)."""
    if engine is not None:
        engine.shutdown()
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _advance(request: _Request, safe: str) -> str:
    """The part of `safe` not sent yet. Sent text is always a prefix of the final text: only
    whole lines the guard cannot drop, and never a possible stop string's start."""
    sent = request.sent_text
    if len(safe) <= len(sent) or not safe.startswith(sent):
        if not safe.startswith(sent):
            logger.warning("request %s: final text does not extend what was streamed", request.request_id)
        return ""
    request.sent_text = safe
    return safe[len(sent):]


def _finish_reason(completion) -> str:
    """vLLM's finish as our engine's: eos | stop (a stop string) | length | abort."""
    reason = completion.finish_reason
    if reason == "length":
        return "length"
    if reason == "abort":
        return "abort"
    if reason == "stop":
        return "stop" if isinstance(completion.stop_reason, str) else "eos"
    return reason or "eos"
