"""vLLM with GenGuard inside, on the real default model (vLLM's CPU build): the backend protocol,
exact stops against the policy replay, streaming that never sends a dropped line, per-request
control. One engine for the module (a vLLM start costs most of a minute here)."""
import asyncio

import pytest


from backends import BackendSpec, build_backend
from engine import PromptError, SamplingParams
from evals.exactness import exactness, probabilities_changed, replay_expectations, self_replay
from evals.mbxp import load_problems, split_problems
from guard.export import GuardExport
from guard.vllm_processor import TRACE_DIR_ENV, read_trace

pytestmark = [pytest.mark.default_model, pytest.mark.vllm]
MAX_NEW_TOKENS = 160


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("guard-trace")


@pytest.fixture(scope="module")
def backend(trace_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv(TRACE_DIR_ENV, str(trace_dir))  # read by the processor when the engine starts
    backend = build_backend(BackendSpec(backend="vllm", model="default", guard="default", max_num_seqs=8,
                                        kv_cache_gib=1, max_model_len=2048))
    yield backend
    backend.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def problems():
    return [p for lang in ("python", "javascript", "go", "cpp")
            for p in split_problems(load_problems(lang), "test")[:2]]


def test_guarded_vllm_stops_exactly_where_the_policy_replay_says(backend, problems, trace_dir):
    """As benchmarks.vllm_exactness checks it: (c) the guarded run; (a) each request again with the
    guard observing (votes traced, never stopping), capped at what (c)'s engine decoded; the policy
    replay over (a)'s tokens and vLLM's own probabilities must give (c)'s stop. The prefix cache is
    emptied before each run; with the caps both runs hold the same requests in the batch at each step."""
    from evals import fixed_layout

    assert backend.info.has_guard and backend.info.backend == "vllm"
    # On CPU the model runs inside the engine-core process, on every core (backends/spec.py).
    assert backend._engine.vllm_config.parallel_config.distributed_executor_backend == "uni"
    guarded = fixed_layout.run(backend, problems, MAX_NEW_TOKENS)
    caps = [fixed_layout.observe_cap(row) for row in guarded["problems"]]
    assert all(cap <= MAX_NEW_TOKENS + 1 for cap in caps) and any(cap < MAX_NEW_TOKENS for cap in caps)
    observed = fixed_layout.run(backend, problems, MAX_NEW_TOKENS, caps)
    # An observing guard never stops, so it gets no extra step past its cap.
    for row, cap in zip(observed["problems"], caps):
        assert row["finish_reason"] != "guard" and len(row["token_ids"]) <= cap
    assert sum(len(row["token_ids"]) == cap for row, cap in zip(observed["problems"], caps)) >= 6
    guard_rows = guarded["problems"]
    assert sum(row["finish_reason"] == "guard" for row in guard_rows) >= 6, [r["finish_reason"] for r in guard_rows]
    export = GuardExport.load(backend.folder)
    expectations = replay_expectations(observed, problems, backend.tokenizer, export, read_trace(trace_dir))
    changed = probabilities_changed(problems, backend.tokenizer, read_trace(trace_dir),
                                    read_trace(trace_dir, mode="on"), guarded)
    report = exactness(expectations, guarded, observed, changed)
    assert not report["mismatches"], report
    assert report["num_exact"] >= len(problems) - 1, report
    own = self_replay(guarded, problems, backend.tokenizer, export, read_trace(trace_dir, mode="on"), MAX_NEW_TOKENS)
    assert own["num_exact"] == len(problems), own
    for row in guard_rows:  # excess test code never reaches the text
        assert "assert " not in row["text"] and "console.log" not in row["text"] and "int main" not in row["text"]
        assert row["num_generated_tokens"] < MAX_NEW_TOKENS
    assert backend.reset_prefix_cache() is True


@pytest.fixture(scope="module")
def guard_and_stop_word_runs(backend, problems):
    """One problem per language, eight requests in the batch at once: streamed with the guard on,
    and submitted with the language's stop words (which vLLM's front end ends)."""
    from evals.methods import method_params

    one_each = problems[::2]
    stop_word_futures = [backend.submit(p.prompt, method_params("stop_words", p.language, MAX_NEW_TOKENS))
                         for p in one_each]

    async def collect(problem):
        deltas, result = [], None
        async for event in backend.stream(problem.prompt, method_params("guard", problem.language, MAX_NEW_TOKENS)):
            deltas.append(event.text_delta)
            if event.is_finished:
                result = event.result
        return deltas, result

    async def streams():
        return await asyncio.gather(*(collect(p) for p in one_each))

    streamed = asyncio.run(streams())
    return one_each, streamed, [future.result(timeout=600) for future in stop_word_futures]


def test_stream_sends_only_what_the_result_keeps(guard_and_stop_word_runs):
    _, streamed, _ = guard_and_stop_word_runs
    for deltas, result in streamed:
        assert "".join(deltas) == result.text  # a dropped line was never sent
        assert result.finish_reason == "guard"


def test_per_request_guard_off_and_bad_prompts(backend, problems):
    problem = problems[0]
    futures = [backend.submit(problem.prompt, SamplingParams(max_new_tokens=60, use_guard=use))
               for use in (False, True)]  # both in the batch at once
    off, on = (future.result(timeout=600) for future in futures)
    assert off.finish_reason == "length" and on.finish_reason == "guard"
    assert on.text and off.text.startswith(on.text)
    for bad in ("", "\ud800"):
        with pytest.raises(PromptError):
            backend.submit(bad, SamplingParams())
    stats = backend.stats()
    assert stats["num_guard_stops"] >= 1 and stats["num_running"] == 0
    backend.check_health()


def test_decoded_tokens_count_what_vllm_decoded_past_a_stop_string(backend, guard_and_stop_word_runs, trace_dir):
    from evals.vllm_trace import add_decoded_tokens

    one_each, streamed, stop_word_results = guard_and_stop_word_runs
    languages = [problem.language for problem in one_each]
    cells = {}
    for method, results in (("stop_words", stop_word_results), ("guard", [result for _, result in streamed])):
        for problem, language, result in zip(one_each, languages, results):
            cell = {"method": method, "language": language,
                    "problems": [{"num_generated_tokens": result.num_generated_tokens}]}
            cells[(method, language)] = (cell, problem, result)
    for cell, problem, _ in cells.values():
        add_decoded_tokens(backend, cell, [problem], trace_dir, MAX_NEW_TOKENS)
    stop_word_rows = [(cell["problems"][0], result) for (method, _), (cell, _, result) in cells.items()
                      if method == "stop_words"]
    assert all(result.finish_reason == "stop" for _, result in stop_word_rows)
    # vLLM aborts a stop-string request from its front end; the engine has decoded on meanwhile.
    assert all(row["num_decoded_tokens"] >= len(result.token_ids) for row, result in stop_word_rows)
    assert sum(row["num_decoded_tokens"] - len(result.token_ids) for row, result in stop_word_rows) >= 1, \
        stop_word_rows
    for (method, _), (cell, _, result) in cells.items():
        if method == "guard":  # the guard's marker is an EOS: the scheduler ends the request at once
            assert result.finish_reason == "guard"
            assert cell["num_decoded_tokens"] == result.num_generated_tokens == len(result.token_ids) + 1
