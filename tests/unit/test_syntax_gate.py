"""The syntax gate: the parser's verdict per language, the gate's rule (refuse, go on, bounded
delay), and our engine stopping where the gated policy replay says."""
import math

import pytest

from engine import SamplingParams
from evals.mbxp import load_problems, split_problems
from guard.policy import GateState, StopPolicy, find_stop, gate_parse, gate_step
from guard.syntax import LANGUAGES, gate_check, guess_language, incomplete_reason, is_complete
from tests.helpers import constant_guard, tiny_engine

PROMPTS = {
    "python": 'def to_roman(n):\n    """Roman numerals."""\n',
    "javascript": "function add(a, b) {\n",
    "go": "package main\n\nfunc add(a int, b int) int {\n",
    "cpp": "#include <vector>\nusing namespace std;\nint add(int a, int b) {\n",
}
COMPLETE = {
    "python": "    table = [\n        ('d', 500),\n        ('c', 100),\n    ]\n    return table\n",
    "javascript": "  // sum\n  return a + b;\n}\n",
    "go": "\treturn a + b\n}\n",
    "cpp": "  return a + b;\n}\n",
}
INCOMPLETE = {  # what the guard cut in the issue: an open list; a body of comments only
    "python": ["    table = [\n        ('d', 500),\n", "    # one\n", "    s = 'open\n",
               "    if n == 2:\n", "    x = 1\n    for i in x:\n        # later\n"],
    "javascript": ["  return a + b;\n", "  // only a comment\n}\n", "  const s = [1,\n"],
    "go": ["\treturn a + b\n", "\t// nothing yet\n}\n"],
    "cpp": ["  return a + b;\n", "  // nothing yet\n}\n", "  int x = (a +\n"],
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_complete_code_passes_and_open_or_empty_bodies_are_refused(language):
    prompt = PROMPTS[language]
    assert incomplete_reason(language, prompt, COMPLETE[language]) is None
    assert not is_complete(language, prompt, "")  # the prompt alone: no statement, or an open block
    for kept in INCOMPLETE[language]:
        assert not is_complete(language, prompt, kept), kept


def test_a_docstring_or_comments_are_not_a_statement():
    prompt = PROMPTS["python"]
    assert incomplete_reason("python", prompt, "    # one\n    # two\n") == \
        "the function the prompt opened has no statement yet"
    assert is_complete("python", prompt, "    # one\n    pass\n")
    # Later top-level code after a complete function is complete too (what a late stop keeps).
    assert is_complete("python", prompt, "    return 1\n\nprint(to_roman(3))\n")


STUBS = {  # the model's whole answer at times: a body closed with only a comment in it
    "javascript": "  // Your code here\n}\n",
    "go": "\t// Your code here\n}\n",
    "cpp": "  // Your code here\n}\n",
}


@pytest.mark.parametrize("language", sorted(STUBS))
def test_a_closed_stub_passes_only_where_the_policy_allows_stubs(language):
    prompt, stub = PROMPTS[language], STUBS[language]
    assert not is_complete(language, prompt, stub)
    assert is_complete(language, prompt, stub, allows_stub=True)
    # still refused with stubs allowed: an open body, an open bracket
    assert not is_complete(language, prompt, stub.rstrip("}\n") + "\n", allows_stub=True)
    assert not is_complete(language, prompt, "  int x = (a +\n", allows_stub=True)


def test_python_bodies_never_close_so_a_comment_only_body_stays_refused():
    prompt = PROMPTS["python"]
    assert not is_complete("python", prompt, "    # Your code here\n", allows_stub=True)
    assert not is_complete("python", prompt, "    # Your code here\n\nprint(1)\n", allows_stub=True)


def test_gate_check_binds_the_policy_language_and_prompt():
    prompt, stub = PROMPTS["go"], STUBS["go"]
    decode = {1: stub, 2: "\treturn a + b\n"}.get
    assert gate_check(StopPolicy(), "go", prompt, decode) is None  # no gate: find_stop needs no check
    strict = gate_check(StopPolicy(syntax_gate=True), None, prompt, decode)  # language told from the prompt
    assert not strict(1) and not strict(2)
    stubs = gate_check(StopPolicy(syntax_gate=True, syntax_gate_allows_stub=True), "go", prompt, decode)
    assert stubs(1)
    ungated = gate_check(StopPolicy(syntax_gate=True), None, "hello", decode)  # no language: every stop passes
    assert ungated(1) and ungated(2)


@pytest.mark.parametrize("allows_stub", [False, True])
def test_our_engine_parses_with_the_policys_stub_rule(monkeypatch, allows_stub):
    import guard.syntax

    seen = []

    def spy(language, prompt, kept, stub_rule=False):
        seen.append(stub_rule)
        return False

    monkeypatch.setattr(guard.syntax, "is_complete", spy)
    policy = StopPolicy(line_start_threshold=0.9, max_blank_lines=0, syntax_gate=True,
                        syntax_gate_allows_stub=allows_stub)
    engine = tiny_engine(guard=constant_guard(10.0, policy))
    engine.generate(["int main() {\n"], SamplingParams(max_new_tokens=20, ignore_eos=True, language="cpp"))
    assert seen and set(seen) == {allows_stub}


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_language_is_told_from_train_split_prompts(language):
    problems = split_problems(load_problems(language), "train")[:200]
    assert [guess_language(p.prompt) for p in problems] == [language] * len(problems)
    assert guess_language("hello world") is None


# Languages with no grammar here: their prompts were told as Python or JavaScript, and the
# gate then refused the right stop with the wrong parser.
@pytest.mark.parametrize("language", ["java", "typescript", "php", "ruby"])
def test_a_prompt_in_a_language_with_no_grammar_is_unknown(language):
    problems = split_problems(load_problems(language), "train")[:100]
    assert {guess_language(p.prompt) for p in problems} == {None}


@pytest.mark.parametrize("prompt", [
    "import kotlin.math.abs\n\n/** Sum of digits. */\nfun sumDigits(n: Int): Int {\n",
    "object Main {\n  /** Sum of digits. */\n  def sumDigits(n: Int): Int = {\n",
    "use std::collections::HashMap;\n\n/// Sum of digits.\nfn sum_digits(n: u64) -> u64 {\n",
    "import Foundation\n\n/// Sum of digits.\nfunc sumDigits(_ n: Int) -> Int {\n",
    "Write a function that returns the sum of the digits of n.",
])
def test_prompts_no_grammar_parses_cleanly_are_unknown(prompt):
    assert guess_language(prompt) is None


def test_any_language_name_is_accepted_and_one_with_no_grammar_goes_ungated(caplog):
    from guard.syntax import gate_language

    prompt = "def f(x):\n"
    assert gate_language("python", prompt) == "python"
    assert gate_language(None, prompt) == "python"
    with caplog.at_level("WARNING", logger="guard.syntax"):
        assert gate_language("kotlin", prompt) is None
        assert gate_language("kotlin", prompt) is None
    assert [r.getMessage() for r in caplog.records].count(
        "GenGuard's syntax gate has no grammar for language 'kotlin'; its stops go ungated "
        f"(grammars: {', '.join(LANGUAGES)})") == 1
    assert gate_check(POLICY, "kotlin", prompt, lambda n: "x = [")(3) is True  # no gate: passes
    assert SamplingParams(language="kotlin").language == "kotlin"


POLICY = StopPolicy(syntax_gate=True, syntax_gate_max_lines=2)


def test_gate_step_refuses_goes_on_and_gives_up_after_the_bounded_delay():
    calls = []

    def never(n):
        calls.append(n)
        return False

    gate, allowed = gate_step(GateState(), False, True, 3, POLICY, never)
    assert allowed is False and calls == [] and gate == GateState()  # no stop proposed: no parse
    gate, allowed = gate_step(gate, True, False, 3, POLICY, never)
    assert not allowed and gate.num_refusals == 1 and gate.num_lines_since_refusal == 0
    gate, allowed = gate_step(gate, True, False, 3, POLICY, never)  # same kept text: no new parse
    assert not allowed and calls == [3] and gate.num_refusals == 2
    for _ in range(2):  # two line ends after the first refusal
        gate, allowed = gate_step(gate, False, True, 5, POLICY, never)
    assert gate.num_lines_since_refusal == 2
    gate, allowed = gate_step(gate, True, False, 7, POLICY, never)
    assert allowed and calls == [3]  # past the delay: the stop goes through unparsed
    assert gate_step(GateState(), True, False, 3, StopPolicy(), never)[1]  # gate off


def test_gate_parse_remembers_the_last_answer_either_way():
    calls = []

    def parse(n):
        calls.append(n)
        return n >= 5

    gate, answer = gate_parse(GateState(), 5, parse)
    assert answer and calls == [5]
    gate, answer = gate_parse(gate, 5, parse)  # asked again (before sampling, then at the fold)
    assert answer and calls == [5] and gate.num_refusals == 0
    gate, allowed = gate_step(gate, True, False, 5, POLICY, parse)  # the stop goes through unparsed
    assert allowed and calls == [5]
    gate, allowed = gate_step(GateState(), True, False, 3, POLICY, parse)
    assert not allowed and calls == [5, 3] and gate.last_num_kept == 3
    gate, answer = gate_parse(gate, 6, parse)  # another text: parsed
    assert answer and calls == [5, 3, 6]


def test_find_stop_waits_for_the_open_list_to_close():
    prompt = PROMPTS["python"]
    texts = ["    table", " = [\n", "        ('d', 500),\n", "        ('c'", ", 100),\n", "    ]\n",
             "    return", " table\n", "\n", "print", "(1)\n"]
    # The guard is sure at the start of `('c', 100),` and from `print` on.
    p_stops = [0.0, 0.0, 0.0, 0.99, 0.99, 0.0, 0.0, 0.0, 0.0, 0.99, 0.99]
    ungated = find_stop(p_stops, texts, StopPolicy())
    assert ungated == (3, 3)  # cut inside the list: unparseable
    check = lambda n: is_complete("python", prompt, "".join(texts[:n]))  # noqa: E731
    assert find_stop(p_stops, texts, POLICY, is_complete=check) == (9, 9)
    with pytest.raises(ValueError, match="is_complete"):
        find_stop(p_stops, texts, POLICY)
    # Code that never parses: two line ends after the first refusal (`('c', 100),` and `]`), the
    # gate stops refusing, and the next stop the rules propose goes through unparsed.
    assert find_stop(p_stops, texts, POLICY, is_complete=lambda n: False) == (9, 9)
    longer = StopPolicy(syntax_gate=True, syntax_gate_max_lines=8)
    assert find_stop(p_stops, texts, longer, is_complete=lambda n: False) is None


def test_engine_stops_where_the_gated_replay_says():
    policy = StopPolicy(line_start_threshold=0.9, max_blank_lines=0, min_code_lines=1,
                        syntax_gate=True, syntax_gate_max_lines=3)
    sure = constant_guard(10.0, policy)  # p_stop = sigmoid(20) on every token
    p_sure = 1 / (1 + math.exp(-20.0))
    prompts = ["def f(x):\n", "int main() {\n", "def g(items):\n    total = 0\n"]
    languages = ["python", "cpp", "python"]
    free = tiny_engine().generate(prompts, SamplingParams(max_new_tokens=60, ignore_eos=True))
    gated = tiny_engine(guard=sure)
    num_refusals = 0
    for prompt, language, f in zip(prompts, languages, free):
        result = gated.generate([prompt], SamplingParams(max_new_tokens=60, ignore_eos=True,
                                                          language=language))[0]
        texts = [gated.tokenizer.decode(f.token_ids[:i + 1]) for i in range(len(f.token_ids))]
        token_texts = [t[len(texts[i - 1]) if i else 0:] for i, t in enumerate(texts)]
        expected = find_stop([p_sure] * len(token_texts), token_texts, policy, is_complete=lambda n: is_complete(
            language, prompt, gated.tokenizer.decode(f.token_ids[:n])))
        if expected is None:
            assert result.finish_reason == "length" and result.token_ids == f.token_ids
        else:
            assert result.finish_reason == "guard"
            assert (result.guard_stop_index, len(result.token_ids)) == expected
            assert result.token_ids == f.token_ids[:expected[1]]
        num_refusals += result.num_gate_refusals
    assert num_refusals > 0  # a random model writes no complete code: the gate refused


def test_sampling_params_refuse_a_language_that_is_not_a_name():
    for language in ("", 3, "x" * 65):
        with pytest.raises(ValueError, match="language"):
            SamplingParams(language=language)
