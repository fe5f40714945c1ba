"""guard/labeler.py: exact cut points on hand-written completions shaped like MBXP prompts."""
from __future__ import annotations

import json

import pytest

from evals.labeler import CutResult, find_cut, label_tokens, truncate

# Prompts in the shapes of the four MBXP files: each ends inside the opened entry point.
PY_PROMPT = ('\n\ndef sum_digits(n):\n  """\n  Write a function to add the digits of a number.\n'
             '  >>> sum_digits(123)\n  6\n  """\n')
JS_PROMPT = ('/**\n * * Write a function to add the digits of a number.\n *\n'
             ' * > sumDigits(123)\n * 6\n */\nfunction sumDigits(n) {\n')
GO_PROMPT = ('package main\n\nimport (\n\t"encoding/json"\n\t"reflect"\n)\n'
             '// Code should be written in Go/Golang\n// Write a function to add the digits of a number.\n'
             '// Examples:\n// >>> sum_digits(123)\n// >>> 6\nfunc sum_digits (n int) int {\n')
CPP_PROMPT = ('#include <bits/stdc++.h>\nusing namespace std;\n\n\n/**\n'
              ' * Write a function to add the digits of a number.\n * > sumDigits(123)\n * 6\n */\n'
              'int sumDigits(int n) {\n')
PROMPTS = {"python": (PY_PROMPT, "sum_digits"), "javascript": (JS_PROMPT, "sumDigits"),
           "go": (GO_PROMPT, "sum_digits"), "cpp": (CPP_PROMPT, "sumDigits")}

PY_BODY = "  total = 0\n  while n:\n    total += n % 10\n    n //= 10\n  return total\n"
JS_BODY = "  let total = 0;\n  for (const d of String(n)) {\n    total += Number(d);\n  }\n  return total;\n}\n"
GO_BODY = "\ttotal := 0\n\tfor n > 0 {\n\t\ttotal += n % 10\n\t\tn /= 10\n\t}\n\treturn total\n}\n"
CPP_BODY = "    int total = 0;\n    while (n > 0) {\n        total += n % 10;\n        n /= 10;\n    }\n    return total;\n}\n"
BODIES = {"python": PY_BODY, "javascript": JS_BODY, "go": GO_BODY, "cpp": CPP_BODY}

# What models append after the function: tests, a main, prose, markdown fences.
EXCESS = {
    "python": ["\nprint(sum_digits(123))\n", '\nif __name__ == "__main__":\n    print(sum_digits(5))\n',
               "```\n\nThis function's loop strips {one} digit (at a time).\n",
               "\n# Tests\nassert sum_digits(123) == 6\n", "\n\ndef unrelated(x):\n  return x\n"],
    "javascript": ["\nconsole.log(sumDigits(123));\n", "```\n\nHere's how it works: { it (loops.\n",
                   "\nfunction unrelated() {\n  return 1;\n}\nmodule.exports = sumDigits;\n"],
    "go": ["\nfunc main() {\n\tfmt.Println(sum_digits(123))\n}\n", "```\n\nThis isn't hard: { (\n"],
    "cpp": ["\nint main() {\n    cout << sumDigits(123) << endl;\n    return 0;\n}\n",
            "```\n\nExplanation: we're taking n % 10 {each} step.\n"],
}


def cut_of(language: str, completion: str, **kwargs) -> CutResult:
    prompt, entry_point = PROMPTS[language]
    return find_cut(language, prompt, completion, entry_point, **kwargs)


def assert_expected(language: str, expected: str, excess: str, **kwargs) -> CutResult:
    cut = cut_of(language, expected + excess, **kwargs)
    assert cut.is_parseable, cut.reason
    assert cut.reason == "ok"
    assert cut.cut_char == len(expected)
    assert truncate(expected + excess, cut) == expected
    return cut


@pytest.mark.parametrize("language,excess", [(lang, e) for lang, es in EXCESS.items() for e in es])
def test_cut_at_function_close_before_excess(language, excess):
    cut = assert_expected(language, BODIES[language], excess)
    assert cut.kept_helpers == ()


@pytest.mark.parametrize("language", list(PROMPTS))
def test_function_that_never_closes_is_unparseable(language):
    unfinished = {"python": "  total = 0\n  while n:\n    total += n % 10\n",
                  "javascript": "  let total = 0;\n  for (const d of String(n)) {\n    total += Number(d);\n  }\n",
                  "go": "\ttotal := 0\n\tfor n > 0 {\n\t\ttotal += n % 10\n",
                  "cpp": "    int total = 0;\n    while (n > 0) {\n"}[language]
    cut = cut_of(language, unfinished)
    assert not cut.is_parseable and cut.cut_char is None
    assert cut.reason == "entry point not closed"
    with pytest.raises(ValueError):
        truncate(unfinished, cut)


# ---------------------------------------------------------------- python specifics
def test_python_trailing_comments_and_blank_lines_are_excess():
    assert_expected("python", "  return n % 9\n", "  # no more lines\n\n\n# Tests\nassert sum_digits(9) == 9\n")


def test_python_inline_comment_on_last_line_is_kept():
    assert_expected("python", "  return n % 9  # digit root\n", "\nprint(1)\n")


def test_python_body_runs_to_the_end_closes_only_at_eos():
    assert cut_of("python", PY_BODY).reason == "entry point not closed"
    cut = cut_of("python", PY_BODY + "  # done\n", ends_at_eos=True)
    assert cut.is_parseable and truncate(PY_BODY + "  # done\n", cut) == PY_BODY


def test_python_nested_def_is_kept():
    body = "  def digit(i):\n    return int(i)\n\n  return sum(digit(c) for c in str(n))\n"
    assert_expected("python", body, "\nprint(sum_digits(1))\n")


def test_python_multiline_string_with_dedent_looking_line():
    body = '  text = """\nnot a dedent\n"""\n  return len(text) + n\n'
    assert_expected("python", body, "\nprint(sum_digits(2))\n")
    # ... also when the string is the last thing in the body.
    assert_expected("python", '  return """\ndef looks_like_code():\n"""\n', "\nprint(3)\n")


def test_python_called_helpers_after_are_kept_transitively():
    expected = ("  return add_all(digits(n))\n\n\ndef digits(n):\n  return [int(c) for c in str(n)]\n\n"
                "# sums a list\ndef add_all(xs):\n  return sum(xs)\n")
    cut = assert_expected("python", expected, "\n\nprint(sum_digits(12))\n\ndef digits2(n):\n  return n\n")
    assert cut.kept_helpers == ("digits", "add_all")


def test_python_helper_after_test_code_is_excess():
    expected = "  return digits(n)\n"
    assert_expected("python", expected, "\nprint(sum_digits(1))\n\ndef digits(n):\n  return n\n")


def test_python_redefinition_of_the_entry_point_is_excess():
    assert_expected("python", "  return 1\n", "\ndef sum_digits(n):\n  return 2\n")


def test_python_unfinished_helper_is_unparseable():
    cut = cut_of("python", "  return digits(n)\n\ndef digits(n):\n  return [int(c) for c in str(n)]\n")
    assert cut.reason == "helper not closed"


def test_python_unindented_body_is_unparseable():
    # An MBPP prompt with its docstring at column 0 leaves an empty function.
    prompt = 'def sum_digits(n):\n"""\nWrite a function.\n"""\n'
    cut = find_cut("python", prompt, " return n % 9\n\nprint(1)\n", "sum_digits")
    assert cut.reason == "entry point has a syntax error"


# ---------------------------------------------------------------- brace languages
def test_js_arrow_helper_is_kept():
    expected = "  return String(n).split('').map(toInt).reduce((a, b) => a + b, 0);\n}\n\nconst toInt = (c) => Number(c);\n"
    cut = assert_expected("javascript", expected, "\nconsole.log(sumDigits(12));\n")
    assert cut.kept_helpers == ("toInt",)


def test_js_unicode_before_cut_counts_characters():
    expected = '  const arrow = "é→";\n  return n % 9;\n}\n'
    assert_expected("javascript", expected, "console.log('✓');\n")


def test_fence_on_the_closing_line_is_excess():
    cut = assert_expected("javascript", "  return n % 9;\n}", "```\nThat's it.\n")
    assert cut.cut_char == len("  return n % 9;\n}")


def test_semicolon_and_comment_after_closing_brace_stay_on_the_line():
    assert_expected("javascript", "  return n % 9;\n}; // end of sumDigits\n", "console.log(1);\n")


def test_go_called_helper_kept_then_main_excess():
    expected = ("\treturn add(n % 10, n / 10)\n}\n\n// add adds two ints\n"
                "func add(a int, b int) int {\n\treturn a + b\n}\n")
    cut = assert_expected("go", expected, "\nfunc main() {\n\tfmt.Println(sum_digits(12))\n}\n")
    assert cut.kept_helpers == ("add",)


def test_go_code_on_the_closing_line_is_excess():
    assert_expected("go", "\treturn n % 9\n}", " func main() {}\n")


def test_cpp_template_helper_kept():
    expected = ("    return digitSum<int>(n);\n}\n\ntemplate <typename T>\nT digitSum(T n) {\n"
                "    return n == 0 ? 0 : n % 10 + digitSum(n / 10);\n}\n")
    cut = assert_expected("cpp", expected, "\nint main() {\n    return sumDigits(1);\n}\n")
    assert cut.kept_helpers == ("digitSum",)


def test_cpp_reference_return_type_entry_point():
    prompt = "#include <bits/stdc++.h>\nusing namespace std;\n\nvector<int>& sortInPlace(vector<int>& xs) {\n"
    completion = "    sort(xs.begin(), xs.end());\n    return xs;\n}\n\nint main() {}\n"
    cut = find_cut("cpp", prompt, completion, "sortInPlace")
    assert truncate(completion, cut) == "    sort(xs.begin(), xs.end());\n    return xs;\n}\n"


def test_cpp_syntax_error_inside_function_is_unparseable():
    cut = cut_of("cpp", "    int x = ;\n    return x +;\n}\n\nint main() {}\n")
    assert cut.reason == "entry point has a syntax error"


def test_missing_entry_point_and_unknown_language():
    assert cut_of("go", "\treturn 1\n}\n").is_parseable
    assert find_cut("go", GO_PROMPT, "\treturn 1\n}\n", "other_name").reason == "entry point not found"
    assert find_cut("rust", "fn f() {\n", "}\n", "f").reason == "unsupported language"


def test_cut_result_validates():
    with pytest.raises(ValueError):
        CutResult(cut_char=None, is_parseable=True, reason="ok")
    with pytest.raises(ValueError):
        CutResult(cut_char=-1, is_parseable=True, reason="ok")


# ---------------------------------------------------------------- token labels
@pytest.mark.parametrize("ends,cut,labels", [
    ([3, 6, 9], 6, [1, 1, 0]),          # token ending exactly at the cut is continue
    ([4, 8, 12], 6, [1, 1, 0]),         # token straddling the cut (starts at 4) is continue
    ([4, 6, 6, 9], 6, [1, 1, 0, 0]),    # an empty token at the cut begins the excess
    ([2, 2, 5], 4, [1, 1, 1]),          # an empty token before the cut is continue
    ([3, 6], 0, [0, 0]),                # nothing expected: all stop
    ([3, 6], 6, [1, 1]),                # nothing excess: all continue
    ([3, 7, 5, 9], 6, [1, 1, 0, 0]),    # shrinking prefix decode cannot flip labels back to 1
])
def test_label_tokens(ends, cut, labels):
    assert label_tokens(ends, cut) == labels


def test_label_tokens_rejects_negative_cut():
    with pytest.raises(ValueError):
        label_tokens([1, 2], -1)


def test_labels_from_cut_split_tokens_at_the_function_close():
    completion = JS_BODY + "\nconsole.log(sumDigits(1));\n"
    tokens = ["  let", " total", " = 0;\n", "  for (const d of String(n)) {\n", "    total += Number(d);\n",
              "  }\n", "  return total;\n", "}\n\n", "console", ".log(sumDigits(1));\n"]
    assert "".join(tokens) == completion
    ends = [sum(len(t) for t in tokens[:i + 1]) for i in range(len(tokens))]
    labels = label_tokens(ends, cut_of("javascript", completion).cut_char)
    # "}\n\n" straddles the cut (it holds the closing brace): the guard should stop at "console".
    assert labels == [1] * 8 + [0] * 2


# ---------------------------------------------------------------- real data
def test_canonical_solutions_truncate_back_to_themselves():
    """Each MBXP canonical solution + appended test code truncates back to the solution."""
    from evals.mbxp import FILES, data_dir

    appended = {"python": "\n\nprint('extra')\n", "javascript": "\n\nconsole.log('extra');\n",
                "cpp": "\n\nint main() {\n    return 0;\n}\n"}  # Go ships no canonical solutions
    for language, suffix in appended.items():
        path = data_dir() / FILES[language]
        rows = [json.loads(line) for line in path.open() if line.strip()]
        solved = [r for r in rows if r["canonical_solution"]]
        num_parseable = 0
        for row in solved:
            completion = row["canonical_solution"] + suffix
            cut = find_cut(language, row["prompt"], completion, row["entry_point"])
            if cut.is_parseable:
                num_parseable += 1
                assert truncate(completion, cut).rstrip() == row["canonical_solution"].rstrip(), row["task_id"]
                assert completion[cut.cut_char:].strip() == suffix.strip(), row["task_id"]
        # A handful of MBPP prompts are broken themselves (docstring at column 0).
        assert num_parseable >= 0.99 * len(solved), (language, num_parseable, len(solved))
