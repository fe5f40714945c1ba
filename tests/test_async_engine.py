"""The thread-safe front: concurrent requests (coroutines or threads) share steps; a cancelled
request frees its slot; a failing step fails every waiter."""
import asyncio
import threading

import pytest

from engine import PromptError, SamplingParams
from engine.async_engine import AsyncEngine
from tests.helpers import tiny_engine

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
