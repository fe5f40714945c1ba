"""The vLLM adapter (backends/vllm_args.py, backends/vllm_output.py) and the hold-back rule it
shares with our engine (engine/holdback.py), on made-up vLLM outputs over the tiny model's export:
no engine starts."""
import pytest

from backends.spec import BackendSpec
from backends.vllm_args import vllm_engine_args
from backends.vllm_output import (Completion, StreamedCompletion, VllmOutputs, drop_logprobs, finish_reason,
                                  logprob_entries, pack_logprobs, parse_sse, to_sse)
from engine.holdback import HoldBack
from guard.export import MarkerKind
from guard.policy import StopPolicy

KEPT, DROPPED = "    return x\n", "print("  # a stop at a line's start drops the open line


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> VllmOutputs:
    from guard.export import build_export, resolve_model_folder
    from guard.probe import GenGuard
    from models.tiny import TINY_MODEL_NAME

    out = tmp_path_factory.mktemp("export") / "tiny"
    source, name = resolve_model_folder(TINY_MODEL_NAME)
    build_export(source, name, GenGuard(64, TINY_MODEL_NAME, StopPolicy(), has_done_head=True), out)
    return VllmOutputs.load(out)


def encode(outputs: VllmOutputs, text: str) -> list[int]:
    return outputs.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_vllms_finish_reads_as_our_engines():
    assert [finish_reason("stop", None), finish_reason("stop", 7), finish_reason("stop", "\n\n"),
            finish_reason("length", None), finish_reason("abort", None), finish_reason(None, None)] == \
        ["eos", "eos", "stop", "length", "abort", "eos"]


def test_a_guard_stop_keeps_the_closed_lines_and_counts_the_rest(outputs):
    ids = encode(outputs, KEPT + DROPPED)
    for kind, kept_text in ((MarkerKind.DROP_OPEN, KEPT), (MarkerKind.KEEP, KEPT + DROPPED)):
        marker = outputs.export.marker_id(kind)
        kept = outputs.finished(ids + [marker], KEPT + DROPPED, "stop", marker)
        assert (kept.text, kept.finish_reason, kept.is_guard_stop) == (kept_text, "guard", True)
        assert kept.token_ids == encode(outputs, kept_text) and kept.num_generated == len(ids) + 1
        assert kept.num_cut == len(ids) + 1 - len(kept.token_ids) and kept.num_dropped == kept.num_cut - 1
    # An echoed prompt in front of vLLM's text stays; only the completion's part is replaced.
    marker = outputs.export.marker_id(MarkerKind.DROP_OPEN)
    assert outputs.finished(ids + [marker], "def f(x):\n" + KEPT + DROPPED, "stop", marker).text == "def f(x):\n" + KEPT


def test_the_cap_ends_a_completion_whose_extra_step_the_guard_did_not_use(outputs):
    ids = encode(outputs, KEPT + DROPPED)
    cap = len(ids) - 1  # vLLM was allowed one step more than the request's own max tokens
    kept = outputs.finished(ids, KEPT + DROPPED, "length", None, cap=cap)
    assert (kept.finish_reason, kept.token_ids, kept.is_guard_stop) == ("length", ids[:cap], False)
    assert kept.text == outputs.decode(ids[:cap]) and kept.num_dropped == 1
    # A stop decided on the last allowed token's vote is a guard stop; a marker past it is not.
    marker = outputs.export.marker_id(MarkerKind.DROP_ENDED)
    assert outputs.finished(ids[:cap] + [marker], "", "stop", marker, cap=cap).finish_reason == "guard"
    assert outputs.finished(ids + [marker], "", "stop", marker, cap=cap).finish_reason == "length"
    plain = outputs.finished(ids, KEPT + DROPPED, "stop", "\n\n", cap=len(ids))
    assert plain == Completion(ids, KEPT + DROPPED, "stop", len(ids))


def test_a_guarded_stream_holds_back_the_line_a_later_stop_can_drop(outputs):
    stream = StreamedCompletion.start(outputs, guarded=True)
    ids, sent = encode(outputs, KEPT + DROPPED), []
    for i, token_id in enumerate(ids):
        stream.add([token_id], outputs.decode(ids[:i + 1]), [{"token": i}])
        num_sent = stream.num_sent_ids
        delta = stream.safe_delta()
        # The logprobs go with the ids they belong to, whichever step brought them.
        assert [e["token"] for e in delta.logprobs] == list(range(num_sent, num_sent + len(delta.token_ids)))
        sent.append(delta)
        # The newest token's line end is not yet safe: the processor decides on it one step later.
        assert stream.sent_text == (KEPT if i > len(encode(outputs, KEPT)) - 1 else "")
    marker = outputs.export.marker_id(MarkerKind.DROP_OPEN)
    stream.add([marker], stream.text)
    final = stream.final_delta(outputs.finished(stream.token_ids, stream.text, "stop", marker))
    assert "".join(d.text for d in sent + [final]) == KEPT and final.token_ids == []
    assert [i for d in sent + [final] for i in d.token_ids] == encode(outputs, KEPT)


def test_a_stream_never_sends_a_stop_strings_start_nor_takes_back_what_it_sent(outputs):
    stream = StreamedCompletion.start(outputs, guarded=False, stop=["END"])
    stream.add(encode(outputs, "ab\nE"), "ab\nE")
    assert stream.safe_delta().text == "ab"  # "\nE" could be where a stop string begins
    stream.add(encode(outputs, "x"), "ab\nEx")
    assert stream.safe_delta().text == "\n"  # "Ex" still could
    stream.add([], "zz")  # a text that does not extend what was sent: nothing more is sent
    assert stream.safe_delta().text == "" and stream.sent_text == "ab\n"


def test_our_engine_and_vllm_hold_back_by_the_same_rule(outputs):
    ids = encode(outputs, "a\nb\nc")
    engine, vllm = HoldBack(outputs.is_line_end), HoldBack(outputs.is_line_end, guard_lag=1)
    assert engine.safe_token_end(ids) == 4 and vllm.safe_token_end(ids) == 4
    assert engine.safe_token_end(ids[:4]) == 4 and vllm.safe_token_end(ids[:4]) == 2
    assert HoldBack().safe_token_end(ids) == len(ids)  # no guard: no line to hold
    assert HoldBack(stop=("xyz",)).safe_text("abcdef", "abcdef") == "abcd"
    assert HoldBack(stop=("xyz",)).safe_text("ab", "abcdef") == "ab"  # whole lines, far from the end
    assert HoldBack().safe_text("ab\ufffd", "ab\ufffd") == "ab"  # a character whose bytes have not all come


def test_logprobs_split_per_token_pack_back_and_drop_from_the_end():
    from types import SimpleNamespace

    chunk = {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{"a": -1.0}, {"b": -2.0}],
             "text_offset": [0, 1]}
    entries = logprob_entries(chunk, is_chat=False)
    assert entries[1] == {"tokens": "b", "token_logprobs": -2.0, "top_logprobs": {"b": -2.0}, "text_offset": 1}
    assert pack_logprobs(entries, is_chat=False) == chunk
    assert logprob_entries({"content": [{"token": "a"}]}, is_chat=True) == [{"token": "a"}]
    assert logprob_entries(None, is_chat=True) is None
    response = SimpleNamespace(tokens=["a", "b", "c"], token_logprobs=[-1.0] * 3, content=None)
    drop_logprobs(response, 2)
    assert response.tokens == ["a"] and response.token_logprobs == [-1.0] and response.content is None


def test_a_streamed_chunk_parses_from_and_back_to_vllms_sse():
    chunk = {"choices": [{"index": 0, "text": "x"}]}
    assert parse_sse(to_sse(chunk)) == chunk
    assert [parse_sse(item) for item in ("data: [DONE]\n\n", "data: {nope", 'data: {"error": 1}\n\n', None)] == \
        [None] * 4


def test_engine_arguments_are_built_once_for_every_caller():
    cpu = vllm_engine_args(BackendSpec(backend="vllm", guard="default", device="cpu", max_num_seqs=4,
                                       dtype="float32", kv_cache_gib=2, max_model_len=512))
    assert cpu.kwargs == {"max_num_seqs": 4, "dtype": "float32", "enforce_eager": True, "seed": 0,
                          "max_model_len": 512, "logits_processors": ["guard.vllm_processor:GenGuardLogitsProcessor"],
                          "kv_cache_memory_bytes": 2 << 30, "distributed_executor_backend": "uni"}
    assert cpu.env == {"VLLM_HOST_IP": "127.0.0.1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    serve = vllm_engine_args(BackendSpec(backend="vllm", guard=None, device="cpu"), picks_executor=False)
    assert "distributed_executor_backend" not in serve.kwargs and "logits_processors" not in serve.kwargs
    assert serve.env == {"VLLM_HOST_IP": "127.0.0.1"} and "max_model_len" not in serve.kwargs
    gpu = vllm_engine_args(BackendSpec(backend="vllm", device="cuda", dtype="bfloat16", enforce_eager=True))
    assert gpu.kwargs["enforce_eager"] and "kv_cache_memory_bytes" not in gpu.kwargs
    assert "distributed_executor_backend" not in gpu.kwargs and gpu.env == {"VLLM_HOST_IP": "127.0.0.1"}
