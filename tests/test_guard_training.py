"""Guard building on a tiny random model: feature alignment, training, round trip into the engine."""
import numpy as np
import pytest
import torch

from engine import SamplingParams
from guard_training.features import done_ends_opening_blank_line, done_labels, extract_features, token_char_ends
from guard.policy import StopPolicy
from guard.probe import GenGuard
from guard_training.train import TrainConfig, ideal_stop_line, simulate_stop_line, split_by_sample, train_guard
from models.tiny import build_tiny_model_and_tokenizer
from tests.helpers import tiny_engine


def test_features_are_the_hidden_states_the_engine_votes_with():
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    prompts = ["def f(x):\n", "int main() {\n  return 0;"]
    samples = []
    for prompt, n in zip(prompts, (7, 4)):
        ids = tiny_engine().generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].token_ids
        samples.append({"prompt": prompt, "completion_ids": ids, "labels": [1] * (n - 2) + [0, 0]})
    arrays = extract_features(model, tokenizer, samples, batch_size=2)
    assert arrays["features"].shape == (11, 64)
    assert arrays["labels"].tolist() == [1] * 5 + [0, 0] + [1, 1, 0, 0]
    assert arrays["sample_index"].tolist() == [0] * 7 + [1] * 4
    # Token i's feature is the last hidden state at the position that produced token i.
    sample = samples[1]
    ids = tokenizer(sample["prompt"])["input_ids"] + sample["completion_ids"]
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    expected = hidden[len(ids) - 5:len(ids) - 1].numpy()
    np.testing.assert_allclose(arrays["features"][7:].astype(np.float32), expected, atol=2e-2)


def test_token_char_ends_follow_the_decoded_text():
    _, tokenizer = build_tiny_model_and_tokenizer()
    ids = tokenizer("ab\ncd")["input_ids"]
    assert token_char_ends(tokenizer, ids) == [1, 2, 3, 4, 5]


def test_training_converges_on_a_separable_set():
    rng = np.random.default_rng(0)
    num_samples, per_sample, hidden = 40, 30, 16
    labels = np.tile(np.r_[np.ones(18), np.zeros(12)], num_samples).astype(np.int8)
    direction = rng.normal(size=hidden)
    features = rng.normal(size=(len(labels), hidden)) + np.outer(labels * 2 - 1, direction) * 1.5
    sample_ids = np.repeat(np.arange(num_samples), per_sample)
    is_val = split_by_sample(sample_ids, 0.2, seed=0)
    assert not set(sample_ids[is_val]) & set(sample_ids[~is_val])  # whole samples only
    guard, report = train_guard(features.astype(np.float32), labels, is_val, hidden)
    assert report["val"]["token_accuracy"] > 0.95
    assert report["val"]["stop_precision"] > 0.9 and report["val"]["stop_recall"] > 0.9


def test_simulated_stop_line_matches_the_line_vote():
    texts = ["  return x", "\n", "print", "(f(1))", "\n"]
    p_stops = [0.1, 0.1, 0.9, 0.9, 0.9]
    assert simulate_stop_line(p_stops, texts, StopPolicy()) == 1
    assert simulate_stop_line([0.1] * 5, texts, StopPolicy()) is None


def test_ideal_stop_line_is_the_first_excess_line_as_the_vote_counts_lines():
    texts = ["  return x", "\n", "print", "(f(1))", "\n"]
    # The cut falls after "  return x\n": a perfect vote stops on line 1, where the vote above does.
    assert ideal_stop_line(texts, [1, 1, 0, 0, 0]) == 1 == simulate_stop_line([0.1, 0.1, 0.9, 0.9, 0.9],
                                                                               texts, StopPolicy())
    assert ideal_stop_line(texts, [1, 0, 0, 0, 0]) == 0  # the newline itself already excess
    assert ideal_stop_line(texts, [1] * 5) is None  # nothing excess: a perfect guard never stops


def test_trained_guard_round_trips_into_the_engine(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(200, 64)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int8)
    guard, _ = train_guard(features, labels, np.arange(200) % 5 == 0, 64, model_name="codefast/tiny-random")
    guard.save(tmp_path)
    engine = tiny_engine(guard=GenGuard.load(tmp_path))
    result = engine.generate(["def f(x):\n"], SamplingParams(max_new_tokens=20))[0]
    assert result.finish_reason in {"eos", "length", "guard"}
    assert engine.guard.metadata == {}


def test_done_labels_mark_the_last_expected_line_end():
    completion = "  return x\n\ndef check():\n  pass\n"
    tokens = ["  return", " x", "\n\n", "def", " check", "():\n", "  pass", "\n"]
    ends = [len("".join(tokens[:i + 1])) for i in range(len(tokens))]
    cut = completion.index("def")
    labels = [1, 1, 1, 0, 0, 0, 0, 0]
    # Only the expected line end with nothing but whitespace before the cut is "done".
    assert done_labels(completion, ends, labels, cut) == [-1, -1, 1, -1, -1, -1, -1, -1]
    two_lines = "  y = 1\n  return y\n"
    tokens = ["  y", " = 1", "\n", "  return", " y", "\n"]
    ends = [len("".join(tokens[:i + 1])) for i in range(len(tokens))]
    # Nothing is excess (the cut is the end): the last line end is done, the first is not.
    assert done_labels(two_lines, ends, [1] * 6, len(two_lines)) == [-1, -1, 0, -1, -1, 1]


def test_done_ends_opening_blank_line_reads_the_whole_line_end():
    def sample(tokens, done):
        text = "".join(tokens)
        return {"completion": text, "char_ends": [len("".join(tokens[:i + 1])) for i in range(len(tokens))],
                "done_labels": done}
    merged = sample(["  return", " x", "\n\n", "def"], [-1, -1, 1, -1])
    # A lone "\n" token ends the code line: it opens no blank line, though its own text is empty
    # before the newline; the blank line comes with the next token, too late for the rule.
    split = sample(["  y", "\n", "  return", " y", "\n", "\n"], [-1, 0, -1, -1, 1, -1])
    assert done_ends_opening_blank_line([merged]) == (1, 1)
    assert done_ends_opening_blank_line([split]) == (0, 1)
    assert done_ends_opening_blank_line([merged, split]) == (1, 2)


def test_done_head_learns_a_separable_line_end_signal():
    rng = np.random.default_rng(1)
    num_samples, per_sample, hidden = 40, 30, 16
    labels = np.tile(np.r_[np.ones(18), np.zeros(12)], num_samples).astype(np.int8)
    done = np.full(len(labels), -1, dtype=np.int8)
    done[np.arange(len(labels)) % 3 == 0] = 0  # some expected line ends ...
    done[np.arange(num_samples) * per_sample + 17] = 1  # ... and the last one of each sample
    done[labels == 0] = -1
    direction = rng.normal(size=hidden)
    features = rng.normal(size=(len(labels), hidden)) + np.outer(done == 1, direction) * 3.0
    is_val = split_by_sample(np.repeat(np.arange(num_samples), per_sample), 0.2, seed=0)
    config = TrainConfig(batch_size=32, learning_rate=3e-2)  # ~250 line ends: enough steps to converge
    guard, report = train_guard(features.astype(np.float32), labels, is_val, hidden, config, done_labels=done)
    assert report["done_head"]["val_precision"] > 0.8 and report["done_head"]["val_recall"] > 0.8
    # The shipped head itself (not only the report) tells the line ends apart.
    p_done = guard.done_probs(torch.from_numpy(features[is_val]).float()).numpy()
    assert p_done[done[is_val] == 1].mean() > 0.5 > p_done[done[is_val] == 0].mean()
    # Without done labels there is no done head.
    assert train_guard(features.astype(np.float32), labels, is_val, hidden)[0].done_linear is None


def test_sampling_takes_the_train_prompts_from_the_offset(tmp_path):
    from evals.mbxp import load_problems, split_problems
    from guard_training.sampling import SamplingPlan, read_jsonl, sample_language

    plan = SamplingPlan(per_language=2, offset=3, temperatures=(0.0, 0.7), max_new_tokens=2)
    from backends.codefast import CodefastBackend

    backend = CodefastBackend(tiny_engine())
    try:
        rows = read_jsonl(sample_language(backend, "python", plan, tmp_path, log=lambda line: None))
    finally:
        backend.shutdown()
    expected = [p.task_id for p in split_problems(load_problems("python"), "train")[3:5]]
    assert [r["task_id"] for r in rows] == expected * 2
    assert [r["temperature"] for r in rows] == [0.0, 0.0, 0.7, 0.7]
    assert all(len(r["completion_ids"]) <= 2 for r in rows)
    with pytest.raises(ValueError):
        SamplingPlan(offset=-1)


def test_sampling_backend_auto_prefers_vllm_for_real_models():
    import importlib.util

    from guard_training.build import sampling_backend

    has_vllm = importlib.util.find_spec("vllm") is not None
    assert sampling_backend("auto", "qwen2.5-coder-1.5b") == ("vllm" if has_vllm else "codefast")
    assert sampling_backend("auto", "codefast/tiny-random") == "codefast"
    assert sampling_backend("codefast", "default") == "codefast"


def test_build_runs_every_step_for_any_model_from_existing_samples(tmp_path):
    """The pipeline has no per-model branch: the tiny model goes through label, features, train
    and save as a real one does (samples written here: the tiny model writes no code)."""
    import json

    from evals.mbxp import load_problems, split_problems
    from guard.probe import GenGuard
    from guard_training.build import main
    from guard_training.sampling import write_jsonl_atomic
    from models.tiny import TINY_MODEL_NAME

    _, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    problems = [p for p in split_problems(load_problems("python"), "train") if p.canonical_solution][:12]
    rows = []
    for problem in problems:
        completion = problem.canonical_solution.rstrip() + f"\n\n\nprint({problem.entry_point}(1))\nassert True\n"
        rows.append({"task_id": problem.task_id, "language": "python", "entry_point": problem.entry_point,
                     "temperature": 0.0, "prompt": problem.prompt, "completion": completion,
                     "completion_ids": tokenizer.encode(completion, add_special_tokens=False),
                     "finish_reason": "length"})
    (tmp_path / "samples").mkdir()
    write_jsonl_atomic(tmp_path / "samples" / "python.jsonl", rows)
    main(["build", "--model", TINY_MODEL_NAME, "--languages", "python", "--per-language", "12",
          "--out", str(tmp_path)])
    counts = json.loads((tmp_path / "labeled" / "python.counts.json").read_text())
    assert counts["labeled"] >= 10, counts
    guard = GenGuard.load(tmp_path / "guard")
    assert guard.model_name == TINY_MODEL_NAME and (tmp_path / "features" / "python.npz").is_file()
    assert guard.metadata["training"]["num_train_tokens"] > 0
