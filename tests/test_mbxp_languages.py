"""Java, TypeScript, PHP, Ruby and C# in the harness: MBXP's own canonical solutions pass as
MXEval builds their programs, a missing toolchain is an `error` that names it, and the stop words
leave a canonical solution runnable. (Wrong answers, compile errors and memory hogs per language
are in tests/test_sandbox.py.)
"""
from __future__ import annotations

import pytest

from evals import toolchains
from evals.mbxp import build_program, load_problems, split_problems
from evals.pass_at_k import evaluate, pass_at_1
from evals.sandbox import Limits, run_program
from evals.stop_words import STOP_WORDS, finish_completion
from evals.toolchains import toolchain_missing

NEW_LANGUAGES = ("java", "typescript", "php", "ruby", "csharp")
NUM_CANONICAL = 20
FEWER = {"java": 10}  # a JVM start and a javac per program
LIMITS = Limits(timeout_s=10, cpu_s=5, memory_mb=256)


def require(language: str) -> None:
    reason = toolchain_missing(language)
    if reason:
        pytest.skip(f"{language} toolchain missing: {reason}")


def first_canonical(language: str, count: int = NUM_CANONICAL):
    problems = split_problems(load_problems(language), "train")
    return [p for p in problems if p.canonical_solution][:count]


@pytest.mark.parametrize("language", NEW_LANGUAGES)
def test_canonical_solutions_of_the_first_train_problems_pass(language):
    require(language)
    problems = first_canonical(language, FEWER.get(language, NUM_CANONICAL))
    results = evaluate({p.task_id: p.canonical_solution for p in problems}, language, limits=LIMITS)
    failures = {r.task_id: (r.status, r.stderr_tail[-300:]) for r in results if not r.passed}
    if language == "typescript":
        # Half of MBTSP's canonical solutions are cut off mid-function upstream; those must be
        # syntax errors (tsc still emits code for them, where the open function swallows the
        # test and "passes"), and the rest must pass.
        results = [r for r in results if r.status != "compile_error"]
        assert len(results) >= NUM_CANONICAL // 3
    assert pass_at_1(results) >= 0.9, failures


def test_typescript_runs_as_mxeval_compiles_it():
    """tsc --target es5 as MXEval runs it: type errors do not stop a run and `const` is `var`."""
    require("typescript")
    problem = next(p for p in load_problems("typescript") if p.task_id == "MBTSP/502")
    typed_wrong = "  const r: string = n % m;\n  r = n % m;\n  return r;\n}\n"
    [result] = evaluate({problem.task_id: typed_wrong}, "typescript", limits=LIMITS)
    assert result.passed, result.stderr_tail
    [unclosed] = evaluate({problem.task_id: "  return n % m;\n"}, "typescript", limits=LIMITS)
    assert unclosed.status == "compile_error" and "'}' expected" in unclosed.stderr_tail


@pytest.mark.parametrize("language", NEW_LANGUAGES)
def test_a_missing_tool_is_an_error_that_names_it(language, monkeypatch, tmp_path):
    row = toolchains.TOOLCHAINS[language]
    monkeypatch.setattr(toolchains, "TOOL_PATH", str(tmp_path))  # nothing found there
    result = run_program(language, "anything\n", LIMITS)
    assert result.status == "error" and row.tools[0] in result.stderr and "not found" in result.stderr
    assert result.returncode is None  # nothing ran


def test_a_missing_node_module_is_an_error_that_names_it(monkeypatch, tmp_path):
    require("typescript")
    monkeypatch.setattr(toolchains, "NODE_MODULE_DIRS", (str(tmp_path),))
    result = run_program("typescript", "console.log(1);\n", LIMITS)
    assert result.status == "error" and "typescript" in result.stderr


# What a model writes after the function when nothing stops it.
RUNS_ON = {"java": "\n\nclass Helper {\n}\n", "typescript": "\n\n// usage\nconsole.log(1);\n",
           "php": "\n\nfunction helper() {\n}\n", "ruby": "\n\ndef helper\nend\n",
           "csharp": "\n    }\n}\n"}


@pytest.mark.parametrize("language", NEW_LANGUAGES)
def test_stop_words_give_back_the_canonical_solution(language):
    """A completion that runs on past a canonical solution is cut back to exactly that solution
    (with the closing brace the stop removed put back), which passes."""
    require(language)
    [problem] = first_canonical(language, 1)
    completion = problem.canonical_solution.rstrip("\n") + RUNS_ON[language]
    cut = min((i for i in (completion.find(w) for w in STOP_WORDS[language]) if i >= 0), default=None)
    assert cut is not None
    finished = finish_completion(language, completion[:cut], stopped_by_word=True)
    assert finished.strip() == problem.canonical_solution.strip()
    assert run_program(language, build_program(problem, finished), LIMITS).passed
