"""The policy replay used to choose stop policies predicts exactly where the engine stops."""
import pytest
import torch

from engine import SamplingParams
from evals.replay import replay_policy, replay_stop_words
from evals.scored_samples import score_tokens
from guard.policy import StopPolicy
from guard.probe import GenGuard
from tests.helpers import TINY_HIDDEN_SIZE, tiny_engine

PROMPTS = ["def f(x):\n", "int main() {\n", "x = [1, 2,\n", "// test\n", "print(1)\n", "a\nb\n"]


def random_guard(policy: StopPolicy, seed: int, has_done_head: bool = False) -> GenGuard:
    guard = GenGuard(TINY_HIDDEN_SIZE, "codefast/tiny-random", policy, has_done_head=has_done_head)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        guard.linear.weight.data.normal_(0, 0.5)
        if has_done_head:
            guard.done_linear.weight.data.normal_(0, 0.5)
            guard.done_linear.bias.data.fill_(3.0)  # mostly sure: most kept line ends stop
    return guard


@pytest.mark.parametrize("has_done_head,min_code_lines", [(False, 0), (True, 0), (True, 1)])
def test_replay_matches_the_engine_token_for_token(has_done_head, min_code_lines):
    # Every newline-holding token ends a line in the engine; the tiny tokenizer has one per byte,
    # so lines are short and the line-start rule, the keep rule, line votes and (with a done
    # head) the done rule all get exercised.
    policy = StopPolicy(line_start_threshold=0.6, line_keep_threshold=0.2, max_blank_lines=0,
                        line_start_window=2, done_threshold=0.6 if has_done_head else None,
                        min_code_lines=min_code_lines)
    engine = tiny_engine(guard=random_guard(policy, seed=3, has_done_head=has_done_head))
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=40, ignore_eos=True, use_guard=False))
    guarded = engine.generate(PROMPTS, params)
    num_stops = num_done_stops = 0
    for prompt, full, stopped in zip(PROMPTS, free, guarded):
        ids = full.token_ids
        texts = [engine.tokenizer.decode(ids[:i + 1]) for i in range(len(ids))]
        p_stops, p_dones = score_tokens(engine, prompt, ids)
        assert (p_dones is not None) == has_done_head
        stop = replay_policy(texts, p_stops, policy, p_dones)
        if stopped.finish_reason == "guard":
            num_stops += 1
            kept_text = engine.tokenizer.decode(stopped.token_ids)
            assert sum(bool(line.strip()) for line in kept_text.split("\n")) >= min_code_lines
            assert stop == (stopped.num_generated_tokens, len(stopped.token_ids))
            num_done_stops += stop[0] == stop[1]  # only the done rule keeps the line it fires on
            assert stopped.token_ids == ids[:len(stopped.token_ids)]
        else:
            assert stop is None and stopped.token_ids == ids
    assert 0 < num_stops < len(PROMPTS)  # both outcomes are compared
    assert (num_done_stops > 0) == has_done_head


def test_replay_stop_words_counts_tokens_up_to_the_word():
    tokens = ["    ", "return", " x", "\n\n", "def", " test", "():\n"]
    text = "".join(tokens)
    char_ends = [len("".join(tokens[:i + 1])) for i in range(len(tokens))]
    # "\ndef " is complete only once " test" is generated: the engine would have decoded 6 tokens.
    assert replay_stop_words(text, char_ends, ("\ndef ", "\n#")) == (6, "    return x\n")
    assert replay_stop_words(text, char_ends, ("\nclass ",)) is None


def test_guard_margins_average_a_lines_first_code_tokens_like_the_policy():
    from evals.line_starts import line_start_means

    tokens = ["  ", "return", " x", "\n\n", "print", "(f", "(1", "))\n"]
    texts = ["".join(tokens[:i + 1]) for i in range(len(tokens))]
    sample = {"texts": texts, "p_stop": [0.9, 0.1, 0.3, 0.0, 0.8, 1.0, 0.6, 0.2]}
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    rows = [(round(mean, 6), n, is_expected, text) for mean, n, is_expected, text in line_start_means(sample, labels)]
    # Whitespace tokens (the indentation, the newline) neither count nor start the window, and a
    # new line starts a new window: the first line has two code tokens, the second three and more.
    assert rows == [(0.1, 1, True, "return"), (0.2, 2, True, "return x"),
                    (0.8, 1, False, "print"), (0.9, 2, False, "print(f"), (0.8, 3, False, "print(f(1")]
