"""The second packaged model (Qwen2.5-Coder-1.5B-Instruct, `make model-1.5b`) with the guard built
for it by the same pipeline. CI installs it (.ci/run); `make test` alone does not, so on a machine
without its wheels these tests skip and say how to install them."""
import pytest

from engine import Engine, EngineConfig, SamplingParams
from evals.mbxp import load_problems, split_problems
from models.errors import ModelNotFoundError
from models.packaged import QWEN_1_5B_MODEL
from models.wheels import find_part_files

pytestmark = pytest.mark.second_model


@pytest.fixture(scope="module")
def engine():
    try:
        find_part_files(QWEN_1_5B_MODEL)
    except ModelNotFoundError as exc:
        pytest.skip(f"second model not installed: {exc}")
    return Engine.from_pretrained(QWEN_1_5B_MODEL.aliases[0], guard="default", config=EngineConfig(max_num_seqs=4))


def test_second_model_ships_its_own_guard_and_stops_excess_code(engine):
    assert engine.model_name == QWEN_1_5B_MODEL.model_name
    assert engine.guard is not None and engine.guard.hidden_size == 1536  # its own, not the 0.5B's (896)
    problems = split_problems(load_problems("python"), "test")[:4]
    results = engine.generate([p.prompt for p in problems], SamplingParams(max_new_tokens=160))
    reasons = [r.finish_reason for r in results]
    assert reasons.count("guard") + reasons.count("eos") >= 3, reasons
    for problem, result in zip(problems, results):
        assert "return" in result.text, (problem.task_id, result.text)
        if result.finish_reason == "guard":
            assert f"print({problem.entry_point}(" not in result.text and "assert " not in result.text
