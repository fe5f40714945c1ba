"""GenGuard stop rules, case by case (pure functions, no model)."""
import pytest

from guard.policy import PolicyKind, StopPolicy, VoteState, count_blank_lines, find_stop, update_votes

# The plain end-of-line vote; the line-start rule has tests of its own below.
LINE = StopPolicy(kind=PolicyKind.LINE, stop_threshold=0.5, max_blank_lines=3,
                  line_start_threshold=None, line_keep_threshold=None)


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


def test_sure_first_token_of_a_line_stops_at_once():
    policy = StopPolicy(line_start_threshold=0.9)
    decisions = run_line([0.95, 0.2, 0.2], "def check():\n", policy=policy)
    assert [d.is_stop for d in decisions] == [True, False, False]
    assert not decisions[0].is_line_end  # mid-line: the output processor drops the partial line


def test_line_start_rule_needs_a_sure_vote_on_the_first_token_only():
    policy = StopPolicy(line_start_threshold=0.9)
    # Not sure enough on the first token: the line's end decides (here: a majority, so stop).
    assert [d.is_stop for d in run_line([0.85, 0.9, 0.9], "x\n", policy=policy)] == [False, False, True]
    # A sure vote later in the line is only a vote (tokens like `_re|peated` spike mid-line).
    assert not any(d.is_stop for d in run_line([0.1, 0.99, 0.1], "    total_repeated\n", policy=policy))
    # The first token of the *next* line decides again.
    first = run_line([0.1, 0.1], "    return x\n", policy=policy)
    assert update_votes(first[-1].state, 0.97, None, policy).is_stop


def test_indentation_does_not_start_a_line():
    # `        }`: the guard is unsure on the indentation before a nested brace, sure on the brace.
    policy = StopPolicy(line_start_threshold=0.7, line_keep_threshold=0.001)
    indent = update_votes(VoteState(), 0.85, None, policy, is_whitespace=True)
    assert not indent.is_stop and not indent.state.is_line_kept
    brace = update_votes(indent.state, 0.0001, "        }\n", policy)
    assert not brace.is_stop and not brace.state.is_line_started  # reset for the next line
    # The first code token after indentation is the one that decides.
    indent = update_votes(VoteState(), 0.0001, None, policy, is_whitespace=True)
    assert update_votes(indent.state, 0.99, None, policy).is_stop


def test_keep_rule_overrides_the_line_majority():
    policy = StopPolicy(line_start_threshold=0.7, line_keep_threshold=0.001)
    # `    return "All tuples have same length";`: a sure first token, then prose-like votes.
    decisions = run_line([0.0005, 0.9, 0.9, 0.9, 0.4], 'return "All tuples"\n', policy=policy)
    assert not any(d.is_stop for d in decisions)
    without_keep = StopPolicy(line_start_threshold=0.7, line_keep_threshold=None)
    assert run_line([0.0005, 0.9, 0.9, 0.9, 0.4], 'return "All tuples"\n', policy=without_keep)[-1].is_stop


def test_line_start_rule_respects_a_stricter_request_threshold_and_can_be_disabled():
    policy = StopPolicy(line_start_threshold=0.9)
    assert not update_votes(VoteState(), 0.95, None, policy, stop_threshold=0.97).is_stop
    assert update_votes(VoteState(), 0.98, None, policy, stop_threshold=0.97).is_stop
    assert not update_votes(VoteState(), 0.99, None, LINE).is_stop
    assert not update_votes(VoteState(), 0.0, None, LINE).state.is_line_kept
    assert update_votes(VoteState(), 0.0, None, StopPolicy()).state.is_line_kept
    token = StopPolicy(kind="token", num_consecutive=2, line_start_threshold=0.9)
    assert not update_votes(VoteState(), 0.99, None, token).is_stop


def test_line_start_window_averages_the_first_code_tokens():
    # `func main() {`: `func` alone is unsure (a helper or the test driver?), ` main` is sure.
    window = StopPolicy(line_start_threshold=0.7, line_start_window=2)
    assert [d.is_stop for d in run_line([0.45, 1.0, 1.0], "func main()\n", policy=window)][:2] == [False, True]
    single = StopPolicy(line_start_threshold=0.7, line_start_window=1)
    # With a window of one, only the line's end can stop it (a majority here).
    assert [d.is_stop for d in run_line([0.45, 1.0, 1.0], "func main()\n", policy=single)] == [False, False, True]
    # Past the window a late sure token is only a vote; indentation is not counted.
    indent = update_votes(VoteState(), 0.9, None, window, is_whitespace=True)
    decisions = [update_votes(indent.state, 0.2, None, window)]
    decisions.append(update_votes(decisions[-1].state, 0.3, None, window))
    decisions.append(update_votes(decisions[-1].state, 1.0, None, window))
    assert not any(d.is_stop for d in decisions)
    # A kept line (sure first token) is never stopped by the window.
    kept = StopPolicy(line_start_threshold=0.7, line_keep_threshold=0.001, line_start_window=3)
    assert not any(d.is_stop for d in run_line([0.0005, 1.0, 1.0], "return 'x'\n", policy=kept))


def test_done_rule_stops_after_a_kept_line_end_and_keeps_it():
    policy = StopPolicy(done_threshold=0.9)
    last = update_votes(VoteState(), 0.0, "}\n", policy, p_done=0.95)
    assert last.is_stop and last.keeps_line and last.is_line_end
    assert not update_votes(VoteState(), 0.0, "}\n", policy, p_done=0.5).is_stop
    # Only at a line end: mid-line the done head is not consulted.
    assert not update_votes(VoteState(), 0.0, None, policy, p_done=0.99).is_stop
    # A line the votes stop is dropped, done or not; a guard without a done head never fires it.
    voted = run_line([0.9, 0.9], "x\n", policy=StopPolicy(line_start_threshold=None, done_threshold=0.9))
    assert voted[-1].is_stop and not voted[-1].keeps_line
    assert not update_votes(VoteState(), 0.0, "}\n", policy, p_done=None).is_stop
    assert not update_votes(VoteState(), 0.0, "}\n", StopPolicy(), p_done=0.99).is_stop


def test_done_rule_can_wait_for_a_line_end_that_opens_a_blank_line():
    # A Python body line that only looks final (`print(sum)` before the `return`) ends in one
    # newline; the finished unit's last line ends in a merged `\n\n`.
    policy = StopPolicy(done_threshold=0.9, done_needs_blank_line=True)
    assert not update_votes(VoteState(), 0.0, "    print(sum)\n", policy, p_done=0.99).is_stop
    last = update_votes(VoteState(), 0.0, "    return sum\n\n", policy, p_done=0.99)
    assert last.is_stop and last.keeps_line
    assert update_votes(VoteState(), 0.0, "}\n  \n", policy, p_done=0.99).is_stop  # spaces on the blank line
    assert not update_votes(VoteState(), 0.0, "    return sum\n\n", policy, p_done=0.5).is_stop
    # Off (the default): a single newline is enough.
    assert update_votes(VoteState(), 0.0, "    print(sum)\n", StopPolicy(done_threshold=0.9), p_done=0.99).is_stop
    # The blank line it opens still counts toward the blank-line rule.
    assert last.state.num_blank_lines == 1


def test_find_stop_reports_what_each_rule_keeps():
    texts = ["  return x", "\n", "print", "(1)", "\n"]
    policy = StopPolicy(line_start_threshold=0.7, done_threshold=0.9)
    # Line-start stop on `print`: the tokens before its line are kept.
    assert find_stop([0.1, 0.1, 0.95, 0.9, 0.9], texts, policy) == (2, 2)
    # Done stop on the first line end: that line is kept whole.
    assert find_stop([0.1, 0.1, 0.95, 0.9, 0.9], texts, policy, [0.0, 0.97, 0.0, 0.0, 0.0]) == (1, 2)
    assert find_stop([0.1] * 5, texts, policy, [0.5] * 5) is None


def test_min_code_lines_keeps_the_first_line_whatever_the_votes():
    policy = StopPolicy(line_start_threshold=0.7, min_code_lines=1)
    # A body that opens with a comment the probe takes for excess: no stop on that line...
    first = run_line([0.99, 0.99, 0.99], "  # Check the input\n", policy=policy)
    assert not any(d.is_stop for d in first)
    assert first[-1].state.num_code_lines == 1
    # ...but the same votes on the next line stop at its first token.
    second = run_line([0.99, 0.99, 0.99], "def check():\n", policy=policy, state=first[-1].state)
    assert second[0].is_stop and not second[0].is_line_end
    # Without the minimum the first line is cut at once (an empty answer).
    assert run_line([0.99, 0.99, 0.99], "  # Check the input\n",
                    policy=StopPolicy(line_start_threshold=0.7))[0].is_stop


def test_min_code_lines_does_not_count_blank_lines():
    policy = StopPolicy(line_start_threshold=0.7, min_code_lines=1, max_blank_lines=0)
    blank = update_votes(VoteState(), 0.99, "\n", policy, is_whitespace=True)
    assert not blank.is_stop and blank.state.num_code_lines == 0
    assert not run_line([0.99, 0.99], "# Test\n", policy=policy, state=blank.state)[-1].is_stop


def test_min_code_lines_lets_the_done_rule_keep_the_first_line():
    # The done rule keeps the line it fires on, so that line counts toward the minimum.
    assert update_votes(VoteState(), 0.0, "  return x\n", StopPolicy(done_threshold=0.9, min_code_lines=1),
                        p_done=0.95).is_stop
    assert not update_votes(VoteState(), 0.0, "  return x\n",
                            StopPolicy(done_threshold=0.9, min_code_lines=2), p_done=0.95).is_stop
    token = StopPolicy(kind="token", num_consecutive=1, min_code_lines=1, max_blank_lines=0)
    assert not update_votes(VoteState(), 0.99, None, token).is_stop
    assert update_votes(VoteState(num_code_lines=1), 0.99, None, token).is_stop


def test_find_stop_with_min_code_lines_keeps_an_opening_comment():
    texts = ["  #", " Check", "\n", "  return", " x", "\n", "#", " Test", "\n"]
    p_stops = [0.99, 0.99, 0.99, 0.0, 0.0, 0.0, 0.99, 0.99, 0.99]
    policy = StopPolicy(line_start_threshold=0.7, min_code_lines=1)
    assert find_stop(p_stops, texts, StopPolicy(line_start_threshold=0.7)) == (0, 0)
    assert find_stop(p_stops, texts, policy) == (6, 6)


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
                                    {"kind": "sentence"}, {"line_start_threshold": 0.0},
                                    {"line_start_threshold": 1.5}, {"line_keep_threshold": 1.0},
                                    {"line_start_window": 0}, {"done_threshold": 0.0},
                                    {"done_threshold": 1.2}, {"min_code_lines": -1},
                                    {"line_start_threshold": 0.5, "line_keep_threshold": 0.6}])
def test_bad_policy_is_rejected(kwargs):
    with pytest.raises(ValueError):
        StopPolicy(**kwargs)


# ---- one rule set, three kinds of numbers -------------------------------------------------------
_TEXTS = ["def", " f", "(x", "):", "\n", "    ", "return", " x", "\n\n", "  ", "}\n", "\n  \n", "#", " test",
          "print", "(1)", ")\n\n\n", "\t", "", "\n    ", "a\nb", "\n\nx"]
_POLICIES = [StopPolicy(), LINE, StopPolicy(done_threshold=0.9, done_needs_blank_line=True, min_code_lines=1),
             StopPolicy(kind="token", num_consecutive=2), StopPolicy(line_keep_threshold=None, max_blank_lines=2),
             StopPolicy(done_threshold=0.5, keep_stop_line=True, line_start_window=1)]


def _random_stream(rng, length):
    texts = [_TEXTS[rng.integers(len(_TEXTS))] for _ in range(length)]
    p_stops = [float(x) for x in rng.choice([0.0005, 0.2, 0.6, 0.85, 0.99], size=length)]
    p_dones = [float(x) for x in rng.choice([0.0, 0.6, 0.95], size=length)]
    return texts, p_stops, p_dones


@pytest.mark.parametrize("policy", _POLICIES)
def test_batch_fold_on_numpy_and_torch_equals_the_scalar_fold_and_the_line_text_fold(policy):
    """fold_batch (the vLLM processor's path) on NumPy and on torch, fold_token (our engine's)
    and update_votes given the whole line's text all take the same decisions, token by token."""
    import numpy as np
    import torch

    from guard.policy import VoteArrays, fold_batch, fold_token, token_feature_table, token_features

    rng = np.random.default_rng(0)
    num_rows, length = 16, 60
    streams = [_random_stream(rng, length) for _ in range(num_rows)]
    thresholds = np.array([0.5 if i % 3 else 0.8 for i in range(num_rows)])
    table = token_feature_table(_TEXTS)
    text_index = {text: i for i, text in enumerate(_TEXTS)}
    votes_np = VoteArrays.zeros(num_rows)
    votes_torch = VoteArrays.zeros(num_rows, xp=torch, device="cpu")
    scalar = [VoteState() for _ in range(num_rows)]
    line_text_states = [VoteState() for _ in range(num_rows)]
    line_texts = [""] * num_rows
    for step in range(length):
        ids = np.array([text_index[streams[r][0][step]] for r in range(num_rows)])
        p_stop = np.array([streams[r][1][step] for r in range(num_rows)])
        p_done = np.array([streams[r][2][step] for r in range(num_rows)])
        tokens_np = type(token_features(""))(**{name: table[name][ids] for name in table})
        votes_np, stop_np, keep_np = fold_batch(votes_np, p_stop, p_done, tokens_np, policy, thresholds)
        tokens_t = type(tokens_np)(**{name: torch.as_tensor(value) for name, value in vars(tokens_np).items()})
        votes_torch, stop_t, keep_t = fold_batch(votes_torch, torch.as_tensor(p_stop), torch.as_tensor(p_done),
                                                 tokens_t, policy, torch.as_tensor(thresholds))
        for r in range(num_rows):
            text = streams[r][0][step]
            decision = fold_token(scalar[r], p_stop[r], token_features(text), policy, thresholds[r], p_done[r])
            scalar[r] = decision.state
            line_texts[r] += text
            by_line = update_votes(line_text_states[r], p_stop[r], line_texts[r] if "\n" in text else None,
                                   policy, thresholds[r], is_whitespace=bool(text) and not text.strip(),
                                   p_done=p_done[r])
            line_text_states[r] = by_line.state
            if "\n" in text:
                line_texts[r] = ""
            assert (decision.is_stop, decision.keeps_line) == (bool(stop_np[r]), bool(keep_np[r]))
            assert (decision.is_stop, decision.keeps_line) == (bool(stop_t[r]), bool(keep_t[r]))
            assert (by_line.is_stop, by_line.keeps_line) == (decision.is_stop, decision.keeps_line)
            assert votes_np.row(r) == decision.state
            assert votes_torch.row(r) == decision.state


def test_token_features_split_a_token_at_its_newlines():
    from guard.policy import token_features

    assert token_features(")\n\n").is_line_end and not token_features(")\n\n").is_head_blank
    assert token_features(")\n\n").num_middle == 1 and token_features(")\n\n").is_all_middle_blank
    mixed = token_features("\nx\n\n")  # pieces: "", "x", "", ""
    assert (mixed.num_middle, mixed.is_all_middle_blank, mixed.num_trailing_blank_middle) == (2, False, 1)
    assert token_features("    ").is_whitespace and not token_features("").is_whitespace
    assert token_features("").is_blank_text and not token_features("x").is_blank_text
