"""MBXP loading/splitting/program building, and pass@1 over sandboxed runs on a hand-made set."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evals.mbxp import FILES, NUM_TEST, build_program, load_problems, split_problems
from evals.pass_at_k import ProblemResult, evaluate, load_results, pass_at_1, save_results
from evals.sandbox import Limits
from evals.toolchains import toolchain_missing
REPO_ROOT = Path(__file__).resolve().parent.parent

FAST = Limits(timeout_s=3, cpu_s=2, memory_mb=256)
# Canonical solutions checked to pass with build_program (some MBXP canonicals are broken upstream).
CANONICAL_OK = {"python": "MBPP/475", "javascript": "MBJSP/469", "cpp": "MBCPP/391", "java": "MBJP/1",
                "typescript": "MBTSP/1", "php": "MBPHP/1", "ruby": "MBRBP/2", "csharp": "MBCSP/3"}


def require(language: str) -> None:
    reason = toolchain_missing(language)
    if reason:
        pytest.skip(f"{language} toolchain missing: {reason}")


def result(task_id: str, passed: bool) -> ProblemResult:
    return ProblemResult(task_id, "python", "passed" if passed else "failed", passed, 0, 0.1, "")


def test_pass_at_1_is_the_pass_rate():
    assert pass_at_1([result("a", True), result("b", False), result("c", True)]) == pytest.approx(2 / 3)
    assert pass_at_1([result("a", False)]) == 0.0
    with pytest.raises(ValueError):
        pass_at_1([])
    with pytest.raises(ValueError):  # one completion per problem
        pass_at_1([result("a", True), result("a", False)])


@pytest.mark.parametrize("language", list(FILES))
def test_split_is_last_500_for_test_and_the_rest_for_train(language):
    problems = load_problems(language)
    test, train = split_problems(problems, "test"), split_problems(problems, "train")
    assert len(test) == NUM_TEST and train + test == problems
    assert all(p.language == language for p in problems)
    with pytest.raises(ValueError):
        split_problems(problems, "valid")


def test_python_program_calls_check_on_the_entry_point():
    problem = next(p for p in load_problems("python") if p.task_id == "MBPP/502")
    program = build_program(problem, "  return n % m\n")
    assert program.startswith(problem.prompt + "  return n % m\n" + problem.test)
    assert program.rstrip().endswith("check(find)")
    go = next(p for p in load_problems("go") if p.task_id == "MBGP/502")
    assert build_program(go, "X") == go.prompt + "X" + go.test and go.canonical_solution is None


@pytest.mark.parametrize("language", ["java", "typescript", "php", "ruby", "csharp"])
def test_other_programs_are_prompt_completion_test(language):
    """MXEval's rule for every language but Python: the test is a main program of its own."""
    problem = load_problems(language)[0]
    assert build_program(problem, "X") == problem.prompt + "X" + problem.test

@pytest.mark.parametrize("language", list(CANONICAL_OK))
def test_canonical_solution_passes(language):
    require(language)
    problem = next(p for p in load_problems(language) if p.task_id == CANONICAL_OK[language])
    [executed] = evaluate({problem.task_id: problem.canonical_solution}, language, limits=FAST)
    assert executed.passed, executed.stderr_tail


def test_evaluate_hand_made_set(tmp_path):
    require("python")
    completions = {
        "MBPP/502": "  return n % m\n",  # correct
        "MBPP/518": " import math\n return int(math.sqrt(num))\n",  # correct
        "MBPP/765": "\treturn 0\n",  # wrong answer
        "MBPP/912": "\twhile True:\n\t\tpass\n",  # never returns
        "MBPP/475": " return sorted(dict1.items(), key=lambda kv: -kv[1]\n",  # syntax error
    }
    results = evaluate(completions, "python", num_workers=2, limits=FAST)
    by_id = {r.task_id: r for r in results}
    assert set(by_id) == set(completions)
    assert [r.task_id for r in results] == sorted(by_id, key=lambda t: int(t.split("/")[1]))  # dataset order
    assert {t: r.status for t, r in by_id.items()} == {
        "MBPP/502": "passed", "MBPP/518": "passed", "MBPP/765": "failed", "MBPP/912": "timeout",
        "MBPP/475": "failed"}
    assert pass_at_1(results) == pytest.approx(2 / 5)
    assert "SyntaxError" in by_id["MBPP/475"].stderr_tail
    save_results(results, tmp_path / "r.jsonl")
    assert load_results(tmp_path / "r.jsonl") == results
    with pytest.raises(ValueError):
        evaluate({"MBPP/999999": ""}, "python")


def test_cli(tmp_path):
    require("python")
    require("javascript")
    rows = [{"task_id": "MBPP/502", "language": "python", "completion": "  return n % m\n"},
            {"task_id": "MBPP/765", "language": "python", "completion": "\treturn 0\n"},
            {"task_id": "MBJSP/502", "language": "javascript", "completion": "  return n % m;\n}\n"}]
    completions, out = tmp_path / "completions.jsonl", tmp_path / "results.jsonl"
    completions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = subprocess.run([sys.executable, "-m", "evals.pass_at_k", "--completions", str(completions),
                          "--out", str(out), "--timeout-s", "3"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["pass@1"] == {"javascript": 1.0, "python": 0.5}
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["task_id"], r["passed"]) for r in saved} == {("MBPP/502", True), ("MBPP/765", False),
                                                           ("MBJSP/502", True)}
