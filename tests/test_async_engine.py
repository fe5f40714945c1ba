"""The asyncio front: concurrent requests share steps; a cancelled request frees its slot."""
import asyncio

from engine import SamplingParams
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
