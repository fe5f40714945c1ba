"""An asyncio front for one Engine: a background thread steps it while requests are in flight.

Used by the Serve replica (and anything else with an event loop). Requests from many coroutines
share decode steps; a coroutine that is cancelled (client gone) aborts its sequence, which frees
its slot at the next step.
"""
from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator

from engine.engine import Engine, StepEvent
from engine.params import SamplingParams
from engine.sequence import Result


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._lock = threading.Lock()  # guards the engine: stepping vs add/abort from the loop
        self._has_work = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._is_stopped = False

    def _ensure_thread(self) -> None:
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
            if error is not None:
                self._fail_all(error)
                continue
            if not events and not self._has_work.is_set():
                self._has_work.wait(self.idle_wait_s)
            for event in events:
                self._deliver(event.request_id, event)

    def _deliver(self, request_id: str, item) -> None:
        entry = self._queues.get(request_id)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            for request_id in list(self._queues):
                self.engine.abort(request_id)
        for request_id in list(self._queues):
            self._deliver(request_id, error)

    async def stream(self, prompt: str, params: SamplingParams = SamplingParams(),
                     request_id: str | None = None) -> AsyncIterator[StepEvent]:
        """Yield StepEvents of one request; the last one has is_finished and the Result.

        Raises PromptError (before anything is queued) for a prompt the engine cannot serve.
        """
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
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
                with self._lock:
                    self.engine.abort(request_id)
                self._has_work.set()

    async def generate(self, prompt: str, params: SamplingParams = SamplingParams(),
                       request_id: str | None = None) -> Result:
        async for event in self.stream(prompt, params, request_id):
            if event.is_finished:
                return event.result
        raise RuntimeError("request ended without a result")

    def stats(self) -> dict:
        with self._lock:
            return {**self.engine.stats.as_dict(), "num_running": self.engine.num_running,
                    "num_waiting": self.engine.num_waiting}

    def shutdown(self) -> None:
        self._is_stopped = True
        self._has_work.set()
