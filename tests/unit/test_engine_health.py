"""The health rules of engine/health.py on their own (no engine): consecutive failures, and the
failure rate over a window of recent steps, which catches steps that fail every other time."""
import pytest

from engine import EngineDeadError
from engine.health import DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES, EngineHealth, FailureRateRule

STEP_ERROR = RuntimeError("device lost")


def run_steps(health: EngineHealth, pattern: str) -> int | None:
    """Record one step per character ("F" failed, "." succeeded); the index of the step that made
    the engine dead, or None."""
    for index, outcome in enumerate(pattern):
        if outcome == "F":
            if health.record_failure(STEP_ERROR):
                return index
        else:
            health.record_success()
    return None


def test_steps_failing_every_other_time_make_the_engine_dead():
    health = EngineHealth()
    rule = health.failure_rate
    dead_at = run_steps(health, "F." * rule.window)
    assert health.num_consecutive_failures < DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES
    assert dead_at is not None and rule.min_steps - 1 <= dead_at <= rule.min_steps + 1
    with pytest.raises(EngineDeadError, match=r"of the last \d+ engine steps failed \(the limit is 25%\);"
                                              r" last: RuntimeError: device lost"):
        health.check()


def test_failures_at_or_below_the_allowed_fraction_keep_the_engine_alive():
    rule = FailureRateRule(window=20, min_steps=8, max_failure_fraction=0.25)
    health = EngineHealth(failure_rate=rule)
    assert run_steps(health, "...F" * 50) is None  # exactly a quarter: not more than it
    health.check()
    assert (health.num_recent_failures, health.num_recent_steps) == (5, 20)
    assert run_steps(health, "F") is not None  # 6 of the last 20 now


def test_old_failures_leave_the_window_and_few_steps_are_no_rate():
    rule = FailureRateRule(window=10, min_steps=5, max_failure_fraction=0.25)
    health = EngineHealth(failure_rate=rule)
    assert run_steps(health, "F.F.") is None  # half failed, but only 4 steps: not judged yet
    assert run_steps(health, "." * 10) is None  # both failures have left the window
    assert health.num_recent_failures == 0
    assert run_steps(health, "F.........F") is None  # 2 of 10
    health.check()


def test_consecutive_failures_are_still_reported_as_such():
    health = EngineHealth(max_consecutive_failures=3)
    assert run_steps(health, "FFF") == 2
    with pytest.raises(EngineDeadError, match="3 engine steps failed in a row"):
        health.check()


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"window": 10, "min_steps": 11}, {"min_steps": 0},
                                    {"max_failure_fraction": 1.0}, {"max_failure_fraction": -0.1},
                                    {"window": 2.5}])
def test_a_bad_failure_rate_rule_is_refused(kwargs):
    with pytest.raises(ValueError):
        FailureRateRule(**kwargs)
