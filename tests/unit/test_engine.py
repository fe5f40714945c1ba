"""Engine behaviour on a tiny random model: continuous batching, exactness, stops, streaming."""
import pytest
import torch

from engine import PromptError, SamplingParams, StepError
from engine import sampler as sampler_module
from engine.params import MAX_SEED, MIN_SEED
from engine.sampler import SamplingError, sample
from engine.sequence import Sequence
from guard.policy import StopPolicy, count_blank_lines
from guard.probe import GenGuard, GuardMismatchError
from models.tiny import build_tiny_model_and_tokenizer
from tests.helpers import TINY_HIDDEN_SIZE, constant_guard, tiny_engine

PROMPTS = ["def add(a, b):\n", "x = 1\n", "import os\nprint(os.getcwd())\n", "hello",
           "class Stack:\n    def __init__(self):\n", "#"]


def test_slot_refill_finishes_mixed_lengths_in_fewer_steps():
    lengths = [2, 30, 3, 30, 2, 30]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    continuous, static = tiny_engine(max_num_seqs=2), tiny_engine(max_num_seqs=2, refill_slots=False)
    results_c = continuous.generate(PROMPTS, params)
    results_s = static.generate(PROMPTS, params)
    assert [r.num_generated_tokens for r in results_c] == lengths
    assert [r.token_ids for r in results_c] == [r.token_ids for r in results_s]
    assert continuous.stats.num_steps < static.stats.num_steps
    # Static batching waits for the longest sequence of each pair: 3 pairs x 30 tokens.
    assert static.stats.num_steps == 90
    assert continuous.stats.max_decode_batch_size == 2


def test_greedy_matches_hf_generate_on_mixed_length_batch():
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    max_new_tokens = 12
    engine = tiny_engine(max_num_seqs=3)  # fewer slots than prompts: exercises refill too
    results = engine.generate(PROMPTS, SamplingParams(max_new_tokens=max_new_tokens))
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    prompt_len = batch["input_ids"].shape[1]
    for row, result in enumerate(results):
        expected = [t for t in out[row, prompt_len:].tolist() if t != tokenizer.pad_token_id]
        assert result.token_ids == expected, f"prompt {row} differs"


def test_guard_stopped_sequence_leaves_batch_at_next_step():
    guard = constant_guard(10.0, StopPolicy(kind="token", num_consecutive=3, max_blank_lines=0))
    engine = tiny_engine(guard=guard)
    guarded = SamplingParams(max_new_tokens=20, ignore_eos=True)
    free = SamplingParams(max_new_tokens=6, ignore_eos=True, use_guard=False)
    results = engine.generate(["def f(x):\n", "y = 2\n"], [guarded, free])
    assert results[0].finish_reason == "guard" and results[0].num_generated_tokens == 3
    assert results[1].finish_reason == "length" and results[1].num_generated_tokens == 6
    # prefill (token 1), decode (token 2), decode (token 3 -> stop); from then on one row only.
    assert list(engine.stats.step_batches) == [(True, 2), (False, 2), (False, 2),
                                               (False, 1), (False, 1), (False, 1)]
    assert engine.stats.num_guard_stops == 1
    assert engine.runner.num_rows == 0 and engine.runner.cache is None


def test_guard_drops_the_stop_line_unless_asked_to_keep_it():
    drop = tiny_engine(guard=constant_guard(10.0, StopPolicy(kind="token", num_consecutive=2)))
    keep = tiny_engine(guard=constant_guard(
        10.0, StopPolicy(kind="token", num_consecutive=2, keep_stop_line=True)))
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    dropped, kept = drop.generate(["z = 3"], params)[0], keep.generate(["z = 3"], params)[0]
    assert dropped.num_generated_tokens == kept.num_generated_tokens == 2
    assert len(kept.token_ids) == 2 and kept.num_dropped_tokens == 0
    # No line ended before the stop, so the whole excess line (both tokens) is dropped.
    assert dropped.token_ids == [] and dropped.text == "" and dropped.num_dropped_tokens == 2


def test_line_start_rule_stops_on_the_first_token_and_drops_it():
    sure = tiny_engine(guard=constant_guard(10.0, StopPolicy(line_start_threshold=0.9, max_blank_lines=0)))
    # p_stop = sigmoid(20) ~ 1: the first generated token starts a line and is sure enough.
    result = sure.generate(["z = 3\n"], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    assert result.finish_reason == "guard" and result.num_generated_tokens == 1
    assert result.text == "" and result.num_dropped_tokens == 1
    # A vote that is a stop vote but not sure enough waits for the line's end.
    unsure = tiny_engine(guard=constant_guard(0.5, StopPolicy(line_start_threshold=0.9, max_blank_lines=0)))
    result = unsure.generate(["z = 3\n"], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    assert result.finish_reason != "guard" or result.num_generated_tokens > 1


def sure_done_guard(policy: StopPolicy) -> GenGuard:
    """A stop head that never votes stop and a done head sure everywhere (p_done ~ 1)."""
    guard = constant_guard(-10.0, policy)
    guard.done_linear = torch.nn.Linear(TINY_HIDDEN_SIZE, 1)
    with torch.no_grad():
        guard.done_linear.weight.zero_()
        guard.done_linear.bias.fill_(10.0)
    return guard


def test_done_head_stops_after_the_first_line_end_and_keeps_the_line():
    # The stop head never votes stop; the done head is sure everywhere, but only a line end
    # consults it: the sequence ends right after its first line, which is kept.
    engine = tiny_engine(guard=sure_done_guard(StopPolicy(max_blank_lines=0, done_threshold=0.9)))
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompts = ["int main() {\n", "print(1)\n", "def f(x):\n"]  # the tiny model ends a line in the first two
    free = tiny_engine().generate(prompts, params)
    done = engine.generate(prompts, params)
    lines_ended = 0
    for f, d in zip(free, done):
        newline_at = [i for i in range(len(f.token_ids))
                      if "\n" in engine.tokenizer.decode(f.token_ids[i:i + 1])]
        if newline_at:
            lines_ended += 1
            assert d.finish_reason == "guard" and d.token_ids == f.token_ids[:newline_at[0] + 1]
            assert d.num_dropped_tokens == 0 and d.text.endswith("\n")
        else:
            assert d.finish_reason == "length" and d.token_ids == f.token_ids
    assert 0 < lines_ended < len(prompts)


def test_done_rule_waiting_for_a_blank_line_ignores_single_line_ends():
    engine = tiny_engine(guard=sure_done_guard(
        StopPolicy(max_blank_lines=0, done_threshold=0.9, done_needs_blank_line=True)))
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompts = ["int main() {\n", "print(1)\n", "def f(x):\n"]
    free = tiny_engine().generate(prompts, params)
    done = engine.generate(prompts, params)
    num_single_line_ends = 0
    for f, d in zip(free, done):
        texts = [engine.tokenizer.decode(f.token_ids[i:i + 1]) for i in range(len(f.token_ids))]
        line_start, expected_stop = 0, None
        for i, text in enumerate(texts):
            if "\n" in text:
                if count_blank_lines(0, "".join(texts[line_start:i + 1])) > 0:
                    expected_stop = i
                    break
                num_single_line_ends += 1
                line_start = i + 1
        if expected_stop is None:
            assert d.finish_reason == "length" and d.token_ids == f.token_ids
        else:
            assert d.finish_reason == "guard" and d.token_ids == f.token_ids[:expected_stop + 1]
    # The same sure done head stops at the first line end without the requirement (test above).
    assert num_single_line_ends > 0


def test_indentation_and_newline_tokens_are_classified_from_the_vocabulary():
    processor = tiny_engine().processor
    ids = {text: processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.tokenize(text))[0]
           for text in (" ", "\t", "\n", "x", "}")}
    assert {ids[" "], ids["\t"], ids["\n"]} <= processor.whitespace_token_ids
    assert ids["x"] not in processor.whitespace_token_ids and ids["}"] not in processor.whitespace_token_ids
    assert ids["\n"] in processor.newline_token_ids and ids[" "] not in processor.newline_token_ids


def test_guard_that_never_votes_stop_changes_nothing():
    guard = constant_guard(-10.0, StopPolicy(max_blank_lines=0))
    params = SamplingParams(max_new_tokens=15)
    with_guard = tiny_engine(guard=guard).generate(PROMPTS, params)
    without = tiny_engine().generate(PROMPTS, params)
    assert [r.token_ids for r in with_guard] == [r.token_ids for r in without]


def test_guard_hidden_size_mismatch_is_a_clear_error():
    with pytest.raises(GuardMismatchError, match="hidden size 128"):
        tiny_engine(guard=GenGuard(128, "other-model"))


def test_stop_string_truncates_text_and_finishes():
    engine = tiny_engine()
    reference = engine.generate(["def add(a, b):\n"], SamplingParams(max_new_tokens=20))[0]
    stop = reference.text[5:7]
    result = engine.generate(["def add(a, b):\n"], SamplingParams(max_new_tokens=20, stop=[stop]))[0]
    assert result.finish_reason == "stop"
    assert result.text == reference.text[:reference.text.find(stop)]


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    alone = tiny_engine().generate(["hello"], params)[0]
    with_company = tiny_engine().generate(
        ["x = 1\n", "hello", "#"],
        [SamplingParams(max_new_tokens=5, temperature=1.0), params, SamplingParams(max_new_tokens=3)])[1]
    assert alone.token_ids == with_company.token_ids
    other_seed = tiny_engine().generate(["hello"], SamplingParams(
        max_new_tokens=12, temperature=0.8, top_p=0.9, seed=8, ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids


def test_abort_frees_slot_and_cache_rows():
    engine = tiny_engine()
    params = SamplingParams(max_new_tokens=50, ignore_eos=True)
    engine.add_request("a = 1", params, request_id="keep")
    engine.add_request("b = 2", params, request_id="drop")
    engine.step()
    engine.step()
    assert engine.runner.num_rows == 2
    engine.abort("drop")
    engine.step()
    assert engine.num_running == 1 and engine.runner.num_rows == 1
    assert list(engine.stats.step_batches)[-1] == (False, 1)


def test_stream_deltas_add_up_to_final_text():
    engine = tiny_engine()
    events = list(engine.stream("def add(a, b):\n", SamplingParams(max_new_tokens=25)))
    assert events[-1].is_finished and all(not e.is_finished for e in events[:-1])
    assert "".join(e.text_delta for e in events) == events[-1].result.text
    assert engine.num_running == 0


def test_stream_holds_back_the_line_the_guard_may_drop():
    guard = constant_guard(10.0, StopPolicy(kind="token", num_consecutive=4, max_blank_lines=0))
    engine = tiny_engine(guard=guard)
    events = list(engine.stream("q = 1", SamplingParams(max_new_tokens=10, ignore_eos=True)))
    # The whole output was one unfinished line, dropped at the stop: nothing may have been sent.
    assert "".join(e.text_delta for e in events) == "" == events[-1].result.text


@pytest.mark.parametrize("prompt, message", [("", "empty"), (123, "string"), ("x" * 600, "context")])
def test_bad_prompts_are_rejected_before_queueing(prompt, message):
    engine = tiny_engine()
    with pytest.raises(PromptError, match=message):
        engine.add_request(prompt, SamplingParams())
    assert not engine.has_unfinished()


def test_length_is_capped_by_context():
    engine = tiny_engine(max_model_len=40)
    result = engine.generate(["y" * 30], SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert result.finish_reason == "length" and result.num_prompt_tokens + result.num_generated_tokens == 40


# ---- bad values and failures stay with their own request ----------------------------------------
@pytest.mark.parametrize("field, value", [("seed", MAX_SEED + 1), ("seed", 2**64), ("seed", MIN_SEED - 1),
                                          ("seed", True), ("seed", 1.5), ("temperature", float("nan")),
                                          ("temperature", float("inf")), ("top_p", float("nan"))])
def test_sampling_params_refuse_values_no_rng_can_take(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    SamplingParams(seed=MAX_SEED), SamplingParams(seed=MIN_SEED)  # the int64 ends are fine


def test_a_tiny_positive_temperature_decodes_greedily():
    engine = tiny_engine()
    greedy, tiny = engine.generate(["def f():", "def f():"], [SamplingParams(max_new_tokens=8),
                                                              SamplingParams(max_new_tokens=8, temperature=1e-300)])
    assert tiny.token_ids == greedy.token_ids and tiny.finish_reason == "length"


def test_a_sequence_whose_processing_raises_fails_alone():
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    expected = tiny_engine().generate(PROMPTS[:3], params)
    engine = tiny_engine()
    process = engine.processor.process

    def process_or_fail(seq, output):
        if seq.prompt == PROMPTS[1] and seq.num_output_tokens == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        process(seq, output)

    engine.processor.process = process_or_fail
    results = engine.generate(PROMPTS[:3], params)
    assert results[1].finish_reason == "error" and "UnicodeDecodeError" in results[1].error
    assert [r.token_ids for r in (results[0], results[2])] == [expected[0].token_ids, expected[2].token_ids]
    assert engine.stats.num_failed_sequences == 1 and engine.runner.num_rows == 0


def test_a_failed_decode_fails_its_batch_and_the_engine_goes_on():
    engine = tiny_engine()
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    for prompt in PROMPTS[:2]:
        engine.add_request(prompt, params)
    engine.step()  # prefill: two cache rows
    decode = engine.runner.decode
    engine.runner.decode = lambda seqs: (_ for _ in ()).throw(RuntimeError("CUDA error: device-side assert"))
    with pytest.raises(StepError, match="device-side assert") as info:
        engine.step()
    assert [e.result.finish_reason for e in info.value.events] == ["error", "error"]
    assert not engine.has_unfinished() and engine.runner.num_rows == 0 and engine.runner.cache is None
    engine.runner.decode = decode
    (again,) = engine.generate([PROMPTS[0]], params)
    assert again.finish_reason == "length" and again.num_generated_tokens == 5


def test_nan_logits_fail_only_that_sampled_row():
    seqs = [Sequence(prompt="p", prompt_ids=[1], params=SamplingParams(temperature=t, seed=s))
            for t, s in ((0.0, None), (0.9, None), (0.9, 3), (0.9, None))]
    logits = torch.randn(4, 10)
    logits[3] = float("nan")
    token_ids = sample(logits, seqs)
    assert isinstance(token_ids[3], SamplingError) and "NaN" in str(token_ids[3])
    assert all(isinstance(t, int) and 0 <= t < 10 for t in token_ids[:3])


def test_a_prompt_the_tokenizer_cannot_take_is_a_prompt_error(monkeypatch):
    engine = tiny_engine()
    with pytest.raises(PromptError, match="U\\+D800, a lone surrogate"):
        engine.add_request("x = '\ud800'", SamplingParams())

    def refuse(*args, **kwargs):
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")

    monkeypatch.setattr(engine, "tokenizer", refuse)
    with pytest.raises(PromptError, match="cannot be tokenized: TypeError"):
        engine.add_request("x = 1", SamplingParams())
    assert not engine.has_unfinished()


# ---- the sampler on any device ---------------------------------------------------------------
def test_seeded_generators_are_made_on_the_logits_device_and_unseeded_rows_drawn_at_once(monkeypatch):
    made_on, num_draws = [], []
    generator, multinomial = torch.Generator, torch.multinomial

    def recording_generator(device="cpu"):
        made_on.append(torch.device(device))
        return generator(device=device)

    def counting_multinomial(*args, **kwargs):
        num_draws.append(1)
        return multinomial(*args, **kwargs)

    monkeypatch.setattr(sampler_module.torch, "Generator", recording_generator)
    monkeypatch.setattr(sampler_module.torch, "multinomial", counting_multinomial)
    params = [SamplingParams(temperature=0.8)] * 5 + [SamplingParams(temperature=0.8, seed=1, top_p=0.5),
                                                      SamplingParams(temperature=0.8, seed=2)]
    seqs = [Sequence(prompt="p", prompt_ids=[1], params=p) for p in params]
    logits = torch.randn(len(seqs), 32)
    first = sample(logits, seqs)
    assert made_on == [logits.device] * 2  # one generator per seeded sequence, where the logits are
    assert len(num_draws) == 1 + 2  # all unseeded rows in one draw, each seeded row alone
    # A seeded sequence draws the same tokens from the same logits, whatever else is in the batch.
    fresh = [Sequence(prompt="p", prompt_ids=[1], params=params[6])]
    assert sample(logits[6:], fresh) == first[6:]
