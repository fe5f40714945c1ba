"""The thread-safe front: concurrent requests (coroutines or threads) share steps; a cancelled
request frees its slot; a failing step fails its waiters; health and stats never wait for a step."""
import asyncio
import threading
import time

import pytest

from engine import EngineDeadError, PromptError, SamplingParams, SequenceError
from engine.async_engine import DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES, AsyncEngine
from tests.helpers import tiny_engine

WAIT_S = 30  # bound on every wait below; the cases themselves take milliseconds

PROMPTS = ["def add(a, b):\n", "x = 1\n", "hello", "#"]


def test_concurrent_requests_are_batched_and_match_sync_results():
    params = SamplingParams(max_new_tokens=16)
    expected = [r.token_ids for r in tiny_engine().generate(PROMPTS, params)]
    aengine = AsyncEngine(tiny_engine())

    async def main():
        return await asyncio.gather(*(aengine.generate(p, params) for p in PROMPTS))

    results = asyncio.run(main())
    aengine.shutdown()
    assert [r.token_ids for r in results] == expected
    assert aengine.stats()["max_decode_batch_size"] > 1


def test_cancelled_stream_aborts_its_sequence():
    aengine = AsyncEngine(tiny_engine())
    params = SamplingParams(max_new_tokens=400, ignore_eos=True)

    async def main():
        stream = aengine.stream("x" * 10, params)
        await stream.__anext__()  # the request is running
        assert aengine.stats()["num_running"] == 1
        await stream.aclose()  # what a disconnecting client does
        for _ in range(200):
            if aengine.stats()["num_running"] == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(main())
    aengine.shutdown()
    assert aengine.engine.runner.num_rows == 0


def test_submit_from_threads_matches_sync_results_and_shares_steps():
    params = SamplingParams(max_new_tokens=16)
    expected = [r.token_ids for r in tiny_engine().generate(PROMPTS, params)]
    aengine = AsyncEngine(tiny_engine())
    futures: list = [None] * len(PROMPTS)

    def submit(i: int) -> None:
        futures[i] = aengine.submit(PROMPTS[i], params)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = [f.result(timeout=60) for f in futures]
    aengine.shutdown()
    assert [r.token_ids for r in results] == expected
    assert aengine.stats()["max_decode_batch_size"] > 1


def test_submit_refuses_a_bad_prompt_at_once_and_queues_nothing():
    aengine = AsyncEngine(tiny_engine())
    with pytest.raises(PromptError, match="empty"):
        aengine.submit("", SamplingParams())
    assert aengine.stats()["num_waiting"] == 0
    aengine.shutdown()


def test_a_failing_step_fails_every_submitted_future():
    aengine = AsyncEngine(tiny_engine())

    def broken_decode(seqs):
        raise RuntimeError("device lost")

    aengine.engine.runner.decode = broken_decode
    futures = [aengine.submit(p, SamplingParams(max_new_tokens=8, ignore_eos=True))
               for p in PROMPTS[:2]]
    for future in futures:
        with pytest.raises(RuntimeError, match="device lost"):
            future.result(timeout=60)
    assert aengine.stats()["num_running"] == 0
    aengine.shutdown()


def blocking_decode(aengine: AsyncEngine) -> tuple[threading.Event, threading.Event]:
    """Make the next decode step block until released: (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    decode = aengine.engine.runner.decode

    def slow_decode(seqs):
        entered.set()
        release.wait(WAIT_S)
        return decode(seqs)

    aengine.engine.runner.decode = slow_decode
    return entered, release


def finishes_within(fn, timeout_s: float = 1.0) -> bool:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


def test_stats_health_and_new_requests_do_not_wait_for_a_running_step():
    aengine = AsyncEngine(tiny_engine(), wedge_timeout_s=60)
    entered, release = blocking_decode(aengine)
    running = aengine.submit(PROMPTS[0], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert entered.wait(WAIT_S)  # a step is running now, and will not end by itself
    assert finishes_within(aengine.stats)
    assert finishes_within(aengine.check_health)
    late: list = []
    assert finishes_within(lambda: late.append(aengine.submit(PROMPTS[1], SamplingParams(max_new_tokens=4))))
    assert aengine.stats()["num_waiting"] == 1 and aengine.stats()["step_running_s"] > 0
    release.set()
    assert running.result(WAIT_S).num_generated_tokens == 4 and late[0].result(WAIT_S).token_ids
    aengine.shutdown()


def test_a_wedged_step_is_unhealthy_until_it_ends():
    aengine = AsyncEngine(tiny_engine(), wedge_timeout_s=0.2)
    entered, release = blocking_decode(aengine)
    future = aengine.submit(PROMPTS[0], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert entered.wait(WAIT_S)
    time.sleep(0.3)
    with pytest.raises(EngineDeadError, match="wedge timeout"):
        aengine.check_health()
    release.set()
    future.result(WAIT_S)
    aengine.check_health()  # the step ended: healthy again
    aengine.shutdown()


def test_steps_that_keep_failing_mark_the_engine_dead():
    aengine = AsyncEngine(tiny_engine(), max_consecutive_step_failures=3)
    aengine.engine.runner.prefill = lambda seqs: (_ for _ in ()).throw(RuntimeError("device lost"))
    for _ in range(3):
        aengine.check_health()  # one more failing step is not death yet
        with pytest.raises(SequenceError, match="device lost"):
            aengine.submit(PROMPTS[0], SamplingParams(max_new_tokens=4)).result(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while not aengine.health.is_dead and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(EngineDeadError, match="3 engine steps failed in a row; last: StepError: RuntimeError: device"):
        aengine.check_health()
    with pytest.raises(EngineDeadError):  # refused at once instead of queued forever
        aengine.submit(PROMPTS[0], SamplingParams())


def test_steps_that_fail_every_other_time_mark_the_engine_dead():
    """Never three failures in a row, but half the steps fail: the failure rate over the recent
    steps makes the engine dead, so Serve's health check fails and replaces the replica."""
    aengine = AsyncEngine(tiny_engine())
    prefill, num_calls = aengine.engine.runner.prefill, [0]

    def flaky_prefill(seqs):
        num_calls[0] += 1
        if num_calls[0] % 2:
            raise RuntimeError("device flaky")
        return prefill(seqs)

    aengine.engine.runner.prefill = flaky_prefill
    outcomes = []
    for _ in range(40):  # one step each (a prefill, one token); the rule needs far fewer
        try:
            aengine.submit(PROMPTS[0], SamplingParams(max_new_tokens=1)).result(WAIT_S)
            outcomes.append("ok")
        except SequenceError:
            outcomes.append("failed")
        except EngineDeadError:
            break
    assert "ok" in outcomes and "failed" in outcomes
    assert aengine.stats()["num_consecutive_step_failures"] < DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES
    with pytest.raises(EngineDeadError, match=r"of the last \d+ engine steps failed"):
        aengine.check_health()


def test_a_dead_loop_thread_is_reported_and_not_restarted():
    aengine = AsyncEngine(tiny_engine())
    aengine.engine.has_unfinished = lambda: (_ for _ in ()).throw(SystemExit("loop bug"))
    future = aengine.submit(PROMPTS[0], SamplingParams(max_new_tokens=2))
    with pytest.raises(EngineDeadError, match="loop crashed: SystemExit"):
        future.result(WAIT_S)  # the waiter learns of it
    with pytest.raises(EngineDeadError, match="loop crashed"):
        aengine.check_health()
    with pytest.raises(EngineDeadError):
        aengine.submit(PROMPTS[1], SamplingParams())
    assert not aengine._thread.is_alive()


def test_one_failing_sequence_fails_alone_through_submit():
    aengine = AsyncEngine(tiny_engine())
    process = aengine.engine.processor.process

    def process_or_fail(seq, output):
        if seq.prompt == PROMPTS[0]:
            raise KeyError("injected")
        process(seq, output)

    aengine.engine.processor.process = process_or_fail
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    futures = [aengine.submit(p, params) for p in PROMPTS[:3]]
    with pytest.raises(SequenceError, match="KeyError"):
        futures[0].result(WAIT_S)
    assert [f.result(WAIT_S).num_generated_tokens for f in futures[1:]] == [4, 4]
    aengine.check_health()
    aengine.shutdown()
