"""Is an engine's step loop still able to serve? One answer for every backend.

`EngineHealth` is the bookkeeping a loop does around its steps (ours in AsyncEngine; the vLLM
backend around its engine core's), and `check()` is what the backend's `check_health()` calls.
Everything here is flags and timestamps written by the loop and read lock-free by anyone: a
health check never waits for a running step, which is exactly what it must detect.

- dead: the loop thread is gone, `max_consecutive_failures` steps failed in a row, too many of
  the recent steps failed (`FailureRateRule`: steps that fail every other time never make a
  run), the loop crashed, or the engine was shut down. Permanent: Serve must replace the replica.
- wedged: one step has run longer than `wedge_timeout_s`. Unhealthy while it lasts.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from engine.errors import EngineDeadError

# Longest a single step may run before the engine reports itself unhealthy. A prefill of
# max_prefill_tokens on a slow CPU takes tens of seconds; a step of minutes is a hung device.
DEFAULT_WEDGE_TIMEOUT_S = 300.0
DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES = 3


@dataclass(frozen=True)
class FailureRateRule:
    """Dead once more than `max_failure_fraction` of the last `window` steps failed, judged at each
    failed step once `min_steps` steps are in (a lone early failure is not a rate). A healthy
    engine's steps do not fail at all: a steady share of failures is a replica to replace."""

    window: int = 50
    min_steps: int = 10
    max_failure_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if not isinstance(self.min_steps, int) or not 1 <= self.min_steps <= self.window:
            raise ValueError(f"min_steps must be an int in [1, window = {self.window}], got {self.min_steps!r}")
        if not 0 <= self.max_failure_fraction < 1:
            raise ValueError(f"max_failure_fraction must be in [0, 1), got {self.max_failure_fraction!r}")

    def is_broken(self, num_failures: int, num_steps: int) -> bool:
        return num_steps >= self.min_steps and num_failures > self.max_failure_fraction * num_steps


class EngineHealth:
    def __init__(self, wedge_timeout_s: float = DEFAULT_WEDGE_TIMEOUT_S,
                 max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES,
                 failure_rate: FailureRateRule = FailureRateRule()):
        if not wedge_timeout_s > 0:
            raise ValueError(f"wedge_timeout_s must be > 0, got {wedge_timeout_s}")
        if not isinstance(max_consecutive_failures, int) or max_consecutive_failures < 1:
            raise ValueError(f"max_consecutive_failures must be an int >= 1, got {max_consecutive_failures!r}")
        self.wedge_timeout_s = wedge_timeout_s
        self.max_consecutive_failures = max_consecutive_failures
        self.failure_rate = failure_rate
        self.num_consecutive_failures = 0
        self._recent_failed: deque[bool] = deque(maxlen=failure_rate.window)  # True: that step failed
        self.num_recent_failures = 0  # of the steps in _recent_failed
        self.dead_reason: str | None = None
        self._step_started_at: float | None = None  # monotonic; None between steps
        self._thread: threading.Thread | None = None

    @property
    def is_dead(self) -> bool:
        return self.dead_reason is not None or (self._thread is not None and not self._thread.is_alive())

    @property
    def step_running_s(self) -> float:
        started = self._step_started_at
        return 0.0 if started is None else time.monotonic() - started

    def watch_thread(self, thread: threading.Thread) -> None:
        """The loop thread: if it ends without a recorded reason, the engine is dead."""
        self._thread = thread

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Around one step: it counts as wedged once it outlasts the timeout."""
        self._step_started_at = time.monotonic()
        try:
            yield
        finally:
            self._step_started_at = None

    @property
    def num_recent_steps(self) -> int:
        return len(self._recent_failed)

    def record_success(self) -> None:
        self.num_consecutive_failures = 0
        self._remember(failed=False)

    def record_failure(self, error: BaseException) -> bool:
        """A failed step; True when this one made the engine dead."""
        self.num_consecutive_failures += 1
        self._remember(failed=True)
        last = f"last: {type(error).__name__}: {error}"
        if self.num_consecutive_failures >= self.max_consecutive_failures:
            self.mark_dead(f"{self.num_consecutive_failures} engine steps failed in a row; {last}")
        elif self.failure_rate.is_broken(self.num_recent_failures, self.num_recent_steps):
            self.mark_dead(f"{self.num_recent_failures} of the last {self.num_recent_steps} engine steps"
                           f" failed (the limit is {self.failure_rate.max_failure_fraction:.0%}); {last}")
        return self.dead_reason is not None

    def _remember(self, failed: bool) -> None:
        if len(self._recent_failed) == self._recent_failed.maxlen:
            self.num_recent_failures -= self._recent_failed[0]
        self._recent_failed.append(failed)
        self.num_recent_failures += failed

    def mark_dead(self, reason: str) -> None:
        if self.dead_reason is None:  # the first cause is the one to report
            self.dead_reason = reason

    def check(self) -> None:
        """Raise EngineDeadError when the engine cannot serve: dead, or a step is wedged."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if self._thread is not None and not self._thread.is_alive():
            raise EngineDeadError("the engine loop thread is gone")
        running_s = self.step_running_s
        if running_s > self.wedge_timeout_s:
            raise EngineDeadError(f"an engine step has been running for {running_s:.1f} s, longer than"
                                  f" the wedge timeout ({self.wedge_timeout_s:g} s)")
