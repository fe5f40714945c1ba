"""Early / exact / late classification of a guard stop against the labeler's cut."""
import pytest

from evals.stop_errors import classify

PROMPT = "def add(a, b):\n"
FULL = "    return a + b\n\nprint(add(1, 2))\nassert add(2, 2) == 4\n"


@pytest.mark.parametrize("kept, outcome", [
    ("    return a + b\n", "exact"),
    ("    return a + b\n\n", "exact"),  # trailing whitespace does not count
    ("", "early"),
    ("    return a + b\n\nprint(add(1, 2))\n", "late"),
    ("    return a - b\n", "diverged"),
])
def test_classify(kept, outcome):
    baseline = {"completion": FULL, "finish_reason": "eos"}
    assert classify("python", PROMPT, "add", baseline, {"completion": kept}) == outcome


def test_unclosed_function_is_unparseable():
    baseline = {"completion": "    return (a +", "finish_reason": "length"}
    assert classify("python", PROMPT, "add", baseline, {"completion": ""}) == "unparseable"
