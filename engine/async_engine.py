"""A thread-safe front for one Engine: a background thread steps it while requests are in flight.

Two ways in, sharing the same decode steps: `stream`/`generate` for asyncio callers (the Serve
replica; a cancelled coroutine, i.e. a client gone, aborts its sequence and frees its slot at the
next step), and `submit`, which returns a concurrent Future, for plain threads (the Ray Data
actor, whose concurrent batch calls keep the engine's queue full while a batch's tail drains).
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future

from engine.engine import Engine, StepEvent
from engine.params import SamplingParams
from engine.sequence import Result


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._lock = threading.Lock()  # guards the engine: stepping vs add/abort from callers
        # Callers waiting for the lock. threading.Lock is not fair: a loop that re-takes it right
        # after each step could starve a caller for many steps, so the loop lets them go first.
        self._num_callers_waiting = 0
        self._callers_done = threading.Condition()
        self._has_work = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._futures: dict[str, Future] = {}  # submit(): request id -> its Result
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._is_stopped = False

    def _ensure_thread(self) -> None:
        with self._thread_lock:  # submit() may race from several threads; one loop thread only
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._is_stopped:
            with self._lock:
                if not self.engine.has_unfinished():
                    self._has_work.clear()
                    events, error = [], None
                else:
                    try:
                        events, error = self.engine.step(), None
                    except Exception as exc:  # fail every waiter instead of hanging them
                        events, error = [], exc
            self._let_callers_in()
            if error is not None:
                self._fail_all(error)
                continue
            if not events and not self._has_work.is_set():
                self._has_work.wait(self.idle_wait_s)
            for event in events:
                self._deliver(event.request_id, event)

    @contextlib.contextmanager
    def _caller_access(self):
        """The engine lock for a caller (not the loop), taken ahead of the loop's next step."""
        with self._callers_done:
            self._num_callers_waiting += 1
        try:
            with self._lock:
                yield
        finally:
            with self._callers_done:
                self._num_callers_waiting -= 1
                self._callers_done.notify_all()

    def _let_callers_in(self) -> None:
        with self._callers_done:  # bounded wait: adding or aborting a request takes microseconds
            self._callers_done.wait_for(lambda: self._num_callers_waiting == 0, timeout=1.0)

    def _deliver(self, request_id: str, item) -> None:
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
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            request_ids = list(self._queues) + list(self._futures)
            for request_id in request_ids:
                self.engine.abort(request_id)
        for request_id in request_ids:
            self._deliver(request_id, error)

    async def stream(self, prompt: str, params: SamplingParams = SamplingParams(),
                     request_id: str | None = None) -> AsyncIterator[StepEvent]:
        """Yield StepEvents of one request; the last one has is_finished and the Result.

        Raises PromptError (before anything is queued) for a prompt the engine cannot serve.
        """
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        with self._caller_access():
            self.engine.add_request(prompt, params, request_id=request_id, stream=True)
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._ensure_thread()
        self._has_work.set()
        is_finished = False
        try:
            while not is_finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                is_finished = item.is_finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not is_finished:
                with self._caller_access():
                    self.engine.abort(request_id)
                self._has_work.set()

    async def generate(self, prompt: str, params: SamplingParams = SamplingParams(),
                       request_id: str | None = None) -> Result:
        async for event in self.stream(prompt, params, request_id):
            if event.is_finished:
                return event.result
        raise RuntimeError("request ended without a result")

    def submit(self, prompt: str, params: SamplingParams = SamplingParams(),
               request_id: str | None = None) -> Future:
        """Queue one request from any thread; the Future resolves to its Result (or the step's
        error). Raises PromptError at once, queueing nothing, for a prompt the engine cannot serve."""
        request_id = request_id or uuid.uuid4().hex
        future: Future = Future()
        with self._caller_access():
            self.engine.add_request(prompt, params, request_id=request_id)
            self._futures[request_id] = future
        self._ensure_thread()
        self._has_work.set()
        return future

    def stats(self) -> dict:
        with self._caller_access():
            return {**self.engine.stats.as_dict(), "num_running": self.engine.num_running,
                    "num_waiting": self.engine.num_waiting}

    def shutdown(self) -> None:
        self._is_stopped = True
        self._has_work.set()
