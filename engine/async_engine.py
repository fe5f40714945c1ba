"""A thread-safe front for one Engine: a background thread steps it while requests are in flight.

Two ways in, sharing the same decode steps: `stream`/`generate` for asyncio callers (the Serve
replica; a cancelled coroutine, i.e. a client gone, aborts its sequence and frees its slot at the
next step), and `submit`, which returns a concurrent Future, for plain threads (the Ray Data
actor, whose concurrent batch calls keep the engine's queue full while a batch's tail drains).

Only the loop thread touches the engine. Callers encode their prompt (the tokenizer alone, so a
bad prompt fails at once) and leave adds and aborts in an inbox that the loop takes in before
each step: a caller never waits for a step, so one slow step cannot block an event loop, and
`stats()` returns numbers the loop published after its last step.

Health (`check_health`, what Serve's health check calls; the rules are engine/health.py's): the
engine is dead when its loop thread died, when `max_consecutive_step_failures` steps failed in a
row or too many of the recent ones failed (`step_failure_rate`; every waiter then fails with
EngineDeadError and new requests are refused: a replica that cannot generate must be replaced,
not kept answering 500s), or after `shutdown()`; it is
unhealthy while one step has run longer than `wedge_timeout_s`. A failed step fails only the
requests that were in it.
"""
from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future

from engine.engine import Engine
from engine.errors import EngineDeadError, PromptError, SequenceError, StepError
from engine.health import (DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES, DEFAULT_WEDGE_TIMEOUT_S, EngineHealth,
                           FailureRateRule)
from engine.params import SamplingParams
from engine.sequence import FinishReason, Result, StepEvent

__all__ = ["DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES", "DEFAULT_WEDGE_TIMEOUT_S", "AsyncEngine"]


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05,
                 wedge_timeout_s: float = DEFAULT_WEDGE_TIMEOUT_S,
                 max_consecutive_step_failures: int = DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES,
                 step_failure_rate: FailureRateRule = FailureRateRule()):
        if not idle_wait_s > 0:
            raise ValueError(f"idle_wait_s must be > 0, got {idle_wait_s}")
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.health = EngineHealth(wedge_timeout_s, max_consecutive_step_failures, step_failure_rate)
        # Adds and aborts for the loop. Its lock is held for an append or a swap, never for a step.
        self._inbox: list[tuple] = []
        self._inbox_lock = threading.Lock()
        self._has_work = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._futures: dict[str, Future] = {}  # submit(): request id -> its Result
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._is_stopped = False
        self._published_stats = self._snapshot()

    # ---- callers (any thread, or an event loop) ---------------------------------------------
    async def stream(self, prompt: str, params: SamplingParams = SamplingParams(),
                     request_id: str | None = None) -> AsyncIterator[StepEvent]:
        """Yield StepEvents of one request; the last one has is_finished and the Result.

        Raises PromptError (before anything is queued) for a prompt the engine cannot serve,
        SequenceError when generation fails for this request, EngineDeadError when the engine
        cannot serve any more.
        """
        request_id = request_id or uuid.uuid4().hex
        prompt_ids = self._admit(prompt, params, request_id)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._send(("add", request_id, prompt, prompt_ids, params, True))
        is_finished = False
        try:
            while not is_finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    is_finished = True  # the engine holds nothing of it any more
                    raise item
                is_finished = item.is_finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not is_finished:
                self._send(("abort", request_id))

    async def generate(self, prompt: str, params: SamplingParams = SamplingParams(),
                       request_id: str | None = None) -> Result:
        async for event in self.stream(prompt, params, request_id):
            if event.is_finished:
                return event.result
        raise RuntimeError("request ended without a result")

    def submit(self, prompt: str, params: SamplingParams = SamplingParams(),
               request_id: str | None = None) -> Future:
        """Queue one request from any thread; the Future resolves to its Result (or raises its
        SequenceError / EngineDeadError). Raises PromptError at once, queueing nothing, for a
        prompt the engine cannot serve."""
        request_id = request_id or uuid.uuid4().hex
        prompt_ids = self._admit(prompt, params, request_id)
        future: Future = Future()
        self._futures[request_id] = future
        self._send(("add", request_id, prompt, prompt_ids, params, False))
        return future

    def stats(self) -> dict:
        """Counters the loop published after its last step (never waits for a running step)."""
        with self._inbox_lock:
            num_pending = sum(item[0] == "add" for item in self._inbox)
        stats = dict(self._published_stats)
        stats["num_waiting"] += num_pending
        stats["step_running_s"] = round(self.health.step_running_s, 3)
        stats["num_consecutive_step_failures"] = self.health.num_consecutive_failures
        stats["num_recent_step_failures"] = self.health.num_recent_failures
        stats["num_recent_steps"] = self.health.num_recent_steps
        return stats

    def check_health(self) -> None:
        """Raise EngineDeadError when this engine cannot serve (dead, or a step is wedged).
        Reads flags the loop sets; never waits for it."""
        if self._is_stopped:
            raise EngineDeadError("the engine was shut down")
        self.health.check()

    def shutdown(self) -> None:
        """Stop the loop; requests still in flight fail with EngineDeadError."""
        self._is_stopped = True
        self._has_work.set()
        if self._thread is None:
            self._fail_waiters(EngineDeadError("the engine was shut down"))

    def _admit(self, prompt: str, params: SamplingParams, request_id: str) -> list[int]:
        if self._is_stopped or self.health.is_dead:
            self.check_health()
        if request_id in self._queues or request_id in self._futures:
            raise ValueError(f"request id {request_id!r} is already in flight")
        prompt_ids = self.engine.encode_prompt(prompt, params)  # the tokenizer only: no engine state
        self._ensure_thread()
        return prompt_ids

    def _send(self, item: tuple) -> None:
        with self._inbox_lock:
            self._inbox.append(item)
        self._has_work.set()
        thread = self._thread
        if thread is not None and not thread.is_alive():  # the loop ended after _admit checked
            self._fail_waiters(EngineDeadError(self.health.dead_reason or "the engine was shut down"))

    def _ensure_thread(self) -> None:
        with self._thread_lock:  # submit() may race from several threads; one loop thread only
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
                thread.start()  # published only once alive: a thread not yet started reads as dead
                self._thread = thread
                self.health.watch_thread(thread)
            elif not self._thread.is_alive():  # never restarted in silence: the replica must go
                self.check_health()

    # ---- the loop thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._is_stopped and self.health.dead_reason is None:
                self._has_work.clear()
                self._take_inbox()
                if not self.engine.has_unfinished():
                    self._publish()
                    self._has_work.wait(self.idle_wait_s)
                    continue
                self._step()
        except BaseException as exc:  # a loop that dies must say so, not vanish
            self.health.mark_dead(f"the engine loop crashed: {type(exc).__name__}: {exc}")
        finally:
            self._fail_waiters(EngineDeadError(self.health.dead_reason or "the engine was shut down"))

    def _step(self) -> None:
        failure: Exception | None = None
        with self.health.step():
            try:
                events = self.engine.step()
            except StepError as exc:  # the requests of that step failed; their results say why
                events, failure = exc.events, exc
            except Exception as exc:  # engine state unknown: every request fails
                events, failure = [], exc
                self._abort_all(exc)
        self._publish()
        for event in events:
            self._deliver(event.request_id, event)
        if failure is None:
            self.health.record_success()
        else:
            self.health.record_failure(failure)

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            items, self._inbox = self._inbox, []
        for kind, request_id, *rest in items:
            if kind == "abort":
                self.engine.abort(request_id)
                continue
            prompt, prompt_ids, params, is_stream = rest
            try:
                self.engine.add_request(prompt, params, request_id=request_id, stream=is_stream,
                                        prompt_ids=prompt_ids)
            except (PromptError, ValueError) as exc:
                self._deliver(request_id, exc)

    def _snapshot(self) -> dict:
        return {**self.engine.stats.as_dict(), "num_running": self.engine.num_running,
                "num_waiting": self.engine.num_waiting}

    def _publish(self) -> None:
        self._published_stats = self._snapshot()  # one reference swap: readers never see half

    def _abort_all(self, error: Exception) -> None:
        for request_id in list(self._queues) + list(self._futures):
            self.engine.abort(request_id)
            self._deliver(request_id, error)

    def _fail_waiters(self, error: Exception) -> None:
        for request_id in list(self._queues) + list(self._futures):
            self._deliver(request_id, error)

    def _deliver(self, request_id: str, item: StepEvent | Exception) -> None:
        if isinstance(item, StepEvent) and item.is_finished and item.result.finish_reason == FinishReason.ERROR.value:
            item = SequenceError(f"generation failed: {item.result.error}")
        future = self._futures.get(request_id)
        if future is not None:
            if isinstance(item, Exception):
                self._futures.pop(request_id, None)
                future.set_exception(item)
            elif item.is_finished:
                self._futures.pop(request_id, None)
                future.set_result(item.result)
            return
        entry = self._queues.get(request_id)
        if entry is not None:
            loop, queue = entry
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # that caller's event loop is closed: nobody is listening
                self._queues.pop(request_id, None)
