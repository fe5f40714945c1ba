"""End to end on the real default model (Qwen2.5-Coder-0.5B-Instruct) with its shipped GenGuard."""
import pytest

from engine import Engine, EngineConfig, SamplingParams
from evals.mbxp import load_problems, split_problems

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("default", guard="default", config=EngineConfig(max_num_seqs=6))


def test_mbpp_prompts_with_guard_give_sane_completions(engine):
    assert engine.guard is not None, "the default model must ship with its GenGuard"
    problems = split_problems(load_problems("python"), "test")[:6]
    results = engine.generate([p.prompt for p in problems], SamplingParams(max_new_tokens=200))
    reasons = [r.finish_reason for r in results]
    assert set(reasons) <= {"eos", "length", "guard"}
    assert reasons.count("guard") >= 3, reasons  # excess code after the function gets cut
    for problem, result in zip(problems, results):
        assert result.num_generated_tokens > 0
        assert "return" in result.text, (problem.task_id, result.text)
        if result.finish_reason == "guard":
            # Stopped before writing test code for the function.
            assert f"print({problem.entry_point}(" not in result.text
            assert "assert " not in result.text


def test_guard_off_runs_longer(engine):
    # MBPP/475: the guard stops after about 15 tokens; unguarded, the model writes ~200 (tests).
    problem = split_problems(load_problems("python"), "test")[0]
    on, off = engine.generate([problem.prompt] * 2, [SamplingParams(max_new_tokens=64),
                                                    SamplingParams(max_new_tokens=64, use_guard=False)])
    assert on.finish_reason == "guard" and off.finish_reason == "length"
    assert on.num_generated_tokens < off.num_generated_tokens
    assert on.text and off.text.startswith(on.text)  # the guard only cuts, it never changes text
