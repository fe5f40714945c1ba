"""The policy replay used to choose stop policies predicts exactly where the engine stops."""
import torch

from benchmarks.policy_sweep import replay_policy, replay_stop_words, score_tokens
from engine import SamplingParams
from guard.features import token_char_ends
from guard.policy import StopPolicy
from guard.probe import GenGuard
from tests.helpers import TINY_HIDDEN_SIZE, tiny_engine

PROMPTS = ["def f(x):\n", "int main() {\n", "x = [1, 2,\n", "// test\n", "print(1)\n", "a\nb\n"]


def random_guard(policy: StopPolicy, seed: int) -> GenGuard:
    guard = GenGuard(TINY_HIDDEN_SIZE, "codefast/tiny-random", policy)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        guard.linear.weight.data.normal_(0, 0.5)
    return guard


def test_replay_matches_the_engine_token_for_token():
    # Every newline-holding token ends a line in the engine; the tiny tokenizer has one per byte,
    # so lines are short and the line-start rule, the keep rule and line votes all get exercised.
    policy = StopPolicy(line_start_threshold=0.6, line_keep_threshold=0.2, max_blank_lines=0)
    engine = tiny_engine(guard=random_guard(policy, seed=3))
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=40, ignore_eos=True, use_guard=False))
    guarded = engine.generate(PROMPTS, params)
    num_stops = 0
    for prompt, full, stopped in zip(PROMPTS, free, guarded):
        ids = full.token_ids
        texts = [engine.tokenizer.decode(ids[:i + 1]) for i in range(len(ids))]
        stop = replay_policy(texts, score_tokens(engine, prompt, ids), policy)
        if stopped.finish_reason == "guard":
            num_stops += 1
            assert stop == (stopped.num_generated_tokens, len(stopped.token_ids))
            assert stopped.token_ids == ids[:len(stopped.token_ids)]
        else:
            assert stop is None and stopped.token_ids == ids
    assert 0 < num_stops < len(PROMPTS)  # both outcomes are compared


def test_replay_stop_words_counts_tokens_up_to_the_word():
    tokens = ["    ", "return", " x", "\n\n", "def", " test", "():\n"]
    text = "".join(tokens)
    char_ends = [len("".join(tokens[:i + 1])) for i in range(len(tokens))]
    # "\ndef " is complete only once " test" is generated: the engine would have decoded 6 tokens.
    assert replay_stop_words(text, char_ends, ("\ndef ", "\n#")) == (6, "    return x\n")
    assert replay_stop_words(text, char_ends, ("\nclass ",)) is None
