"""GenGuard stop rules, case by case (pure functions, no model)."""
import pytest

from guard.policy import PolicyKind, StopPolicy, VoteState, count_blank_lines, update_votes

LINE = StopPolicy(kind=PolicyKind.LINE, stop_threshold=0.5, max_blank_lines=3)


def run_line(p_stops, line_text, policy=LINE, state=VoteState(), threshold=None):
    """Feed one line: every token but the last is inside the line, the last one ends it."""
    decisions = []
    for i, p in enumerate(p_stops):
        is_last = i == len(p_stops) - 1
        decision = update_votes(state, p, line_text if is_last else None, policy, threshold)
        state = decision.state
        decisions.append(decision)
    return decisions


def test_line_majority_stop_stops_at_line_end_only():
    decisions = run_line([0.9, 0.9, 0.1], "print(f(1))\n")
    assert [d.is_stop for d in decisions] == [False, False, True]
    assert decisions[-1].is_line_end


def test_line_tie_continues():
    decisions = run_line([0.9, 0.1, 0.9, 0.1], "x = 1\n")
    assert not decisions[-1].is_stop


def test_line_minority_continues_and_votes_reset_per_line():
    first = run_line([0.9, 0.1, 0.1], "    return x\n")
    assert not first[-1].is_stop
    assert first[-1].state.num_line_stop_votes == 0 and first[-1].state.num_line_continue_votes == 0
    second = run_line([0.9, 0.9, 0.2], "assert f(1) == 2\n", state=first[-1].state)
    assert second[-1].is_stop


def test_threshold_decides_the_vote():
    strict = StopPolicy(stop_threshold=0.8)
    assert not run_line([0.7, 0.7, 0.7], "y\n", policy=strict)[-1].is_stop
    assert run_line([0.7, 0.7, 0.7], "y\n", policy=StopPolicy(stop_threshold=0.6))[-1].is_stop
    # A per-request threshold overrides the policy's.
    assert run_line([0.7, 0.7, 0.7], "y\n", policy=strict, threshold=0.6)[-1].is_stop


def test_token_voting_needs_consecutive_stop_votes():
    policy = StopPolicy(kind="token", num_consecutive=3, max_blank_lines=0)
    state, stops = VoteState(), []
    for p in [0.9, 0.9, 0.1, 0.9, 0.9, 0.9]:
        decision = update_votes(state, p, None, policy)
        state = decision.state
        stops.append(decision.is_stop)
    assert stops == [False, False, False, False, False, True]


def test_token_voting_ignores_line_majority():
    policy = StopPolicy(kind="token", num_consecutive=5, max_blank_lines=0)
    assert not run_line([0.9, 0.9, 0.1], "z\n", policy=policy)[-1].is_stop


def test_blank_line_rule_stops_after_three_empty_lines():
    state, stops = VoteState(), []
    for line in ["    return x\n", "\n", "  \n", "\n"]:
        decision = update_votes(state, 0.0, line, LINE)
        state = decision.state
        stops.append(decision.is_stop)
    assert stops == [False, False, False, True]


def test_blank_line_run_is_broken_by_code_and_counts_multi_newline_tokens():
    assert count_blank_lines(2, "x = 1\n") == 0
    # A token like "\n\n\n" right after code completes the code line and two empty ones.
    assert count_blank_lines(0, "return y\n\n\n") == 2
    # Text after the last newline belongs to the next line, not counted yet.
    assert count_blank_lines(2, "\n    ") == 3


def test_blank_line_rule_can_be_disabled():
    policy = StopPolicy(max_blank_lines=0)
    assert not update_votes(VoteState(num_blank_lines=10), 0.0, "\n", policy).is_stop


@pytest.mark.parametrize("kwargs", [{"stop_threshold": 0.0}, {"stop_threshold": 1.0},
                                    {"num_consecutive": 0}, {"max_blank_lines": -1},
                                    {"kind": "sentence"}])
def test_bad_policy_is_rejected(kwargs):
    with pytest.raises(ValueError):
        StopPolicy(**kwargs)
