"""GenGuard's vLLM logits processor, driven step by step without an engine: each row's "model"
wants a fixed token stream, the guard columns carry a fixed probability schedule, and the
processor's output must stop exactly where the policy replay (`find_stop`) says, keep what it
says, and never let a guard column be sampled. The NumPy (CPU) and torch (GPU) paths must agree."""
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch


from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from guard.export import ExportError, GuardExport, MarkerKind, build_export, resolve_model_folder
from guard.policy import StopPolicy, find_stop
from guard.syntax import is_complete
from guard.probe import GenGuard
from guard.token_table import TABLE_FILE, TokenTable
from guard.vllm_contract import parse_guard_arg
from guard.vllm_processor import (DEVICE_PATH_ENV, TRACE_DIR_ENV, GenGuardLogitsProcessor, prompt_key,
                                  read_decoded, read_trace)
from models.tiny import TINY_MODEL_NAME, build_tiny_tokenizer

POLICY = StopPolicy(done_threshold=0.9, done_needs_blank_line=True, min_code_lines=1)
CODE = ["def f(x):\n    return x\n\ndef check():\n    assert f(1) == 1\n",
        "int f(int x) {\n  return x;\n}\n\nint main() {\n  return 0;\n}\n",
        "  total = 0\n  for i in xs:\n      total += i\n  return total\n\n\n\nprint(total)\n",
        "func f() {\n\tx := 1\n}\n\n// Test\nfunc main() {}\n"]


def tiny_export(tmp_path_factory, policy: StopPolicy):
    """The tiny model exported with a guard (random weights, a done head) under `policy`."""
    guard = GenGuard(64, TINY_MODEL_NAME, policy, has_done_head=True)
    out = tmp_path_factory.mktemp("export") / "tiny"
    source, name = resolve_model_folder(TINY_MODEL_NAME)
    build_export(source, name, guard, out)
    return out


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory, POLICY)


def make(export_dir, num_slots=8, device_path=False):
    cls = type("DevicePath", (GenGuardLogitsProcessor,), {"use_device_path": True}) if device_path \
        else GenGuardLogitsProcessor
    config = SimpleNamespace(model_config=SimpleNamespace(model=str(export_dir)),
                             scheduler_config=SimpleNamespace(max_num_seqs=num_slots))
    return cls(config, torch.device("cpu"), False)


def params(export, guard="on", temperature=0.0, min_tokens=0, language=None):
    extra_args = {"guard": guard} if language is None else {"guard": guard, "language": language}
    return SamplingParams(temperature=temperature, extra_args=extra_args, min_tokens=min_tokens,
                          stop_token_ids=list(export.marker_ids))


def schedules(rng, length, high=(0.6, 0.9, 0.99)):
    """Stop probabilities low in the expected part, high after a random point; done spikes."""
    cut = int(rng.integers(3, length))
    p_stop = np.where(np.arange(length) < cut, 0.05, rng.choice(list(high), size=length))
    p_done = np.where(rng.random(length) < 0.15, 0.97, 0.01)
    return p_stop, p_done


def simulate(processor, export, streams, p_stops, p_dones, rng, condense=True, guard="on", prompts=None,
             languages=None):
    """Greedy decoding where each row's model prefers its stream's next token. Returns every
    row's output ids (the marker last when the guard stopped it)."""
    vocab = export.vocab_size
    outputs = [[] for _ in streams]
    row_of = {r: r for r in range(len(streams))}  # stream -> batch row
    prompts = prompts or [[r] for r in row_of]
    languages = languages or [None] * len(streams)
    processor.update_state(BatchUpdate(len(streams), removed=[], moved=[], added=[
        (r, params(export, guard, language=languages[r]), prompts[r], outputs[r]) for r in row_of]))
    scale = export.logit_scale
    while row_of:
        live = sorted(row_of, key=row_of.get)
        logits = torch.from_numpy(rng.standard_normal((len(live), vocab), dtype=np.float32) * 0.1)
        for r in live:
            row, step = row_of[r], len(outputs[r])
            logits[row, streams[r][step]] = 5.0
            logits[row, export.stop_row] = float((np.log(p_stops[r][step] / (1 - p_stops[r][step]))
                                                  - export.stop_bias) * scale)
            logits[row, export.done_row] = float((np.log(p_dones[r][step] / (1 - p_dones[r][step]))
                                                  - export.done_bias) * scale)
        logits = processor.apply(logits)
        assert torch.isneginf(logits[:, export.stop_row]).all() and torch.isneginf(logits[:, export.done_row]).all()
        sampled = logits.argmax(dim=1).tolist()
        removed = []
        for r in live:
            token = sampled[row_of[r]]
            outputs[r].append(token)
            if token in export.marker_ids or len(outputs[r]) == len(streams[r]):
                removed.append(row_of.pop(r))
        moved = []
        if condense:  # vLLM fills holes with the last rows
            for hole in sorted(removed):
                last = max(row_of.values(), default=-1)
                if last > hole:
                    r = next(k for k, v in row_of.items() if v == last)
                    row_of[r] = hole
                    moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
        processor.update_state(BatchUpdate(len(row_of), removed=removed, added=[], moved=moved)
                               if removed or moved else None)
    return outputs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processor_stops_where_the_policy_replay_says(export_dir, seed):
    export = GuardExport.load(export_dir)
    table = TokenTable.load(export_dir / TABLE_FILE)
    tokenizer = build_tiny_tokenizer()
    rng = np.random.default_rng(seed)
    streams = [tokenizer(code, add_special_tokens=False)["input_ids"] for code in CODE * 2]
    p_stops, p_dones = zip(*(schedules(rng, len(s)) for s in streams))
    outputs = simulate(make(export_dir), export, streams, p_stops, p_dones, rng)
    texts = [[tokenizer.decode([t]) for t in s] for s in streams]
    num_stops = 0
    for stream, out, p_stop, p_done, token_texts in zip(streams, outputs, p_stops, p_dones, texts):
        expected = find_stop(list(p_stop), token_texts, POLICY, list(p_done))
        marker = out[-1] if out[-1] in export.marker_ids else None
        if expected is not None and expected[0] == len(stream) - 1 and marker is None:
            continue  # decided on the last token the length limit allows: vLLM ends on length
        if expected is None:
            assert marker is None and out == stream
            continue
        num_stops += 1
        assert marker is not None, f"the replay stops at {expected}, the processor did not"
        assert out[:-1] == stream[:len(out) - 1]  # no token but the marker was changed
        kept = export.kept_ids(out, marker, table.arrays["is_line_end"])
        assert (export.stop_index(out, marker), len(kept)) == expected
        if export.marker_kind(marker) is MarkerKind.DROP_OPEN:  # decided before emitting
            assert export.stop_index(out, marker) == len(out) - 1
    assert num_stops >= 4


GATED = replace(POLICY, syntax_gate=True, syntax_gate_max_lines=2)
# (prompt, completion, language): lists and bodies the gate must not cut open
GATED_CODE = [
    ("def f(x):\n", "    t = [\n        1,\n        2,\n    ]\n    return t\n\nprint(f(1))\n", "python"),
    ("int f(int x) {\n", "  int a[] = {\n    1,\n  };\n  return a[0];\n}\n\nint main() {}\n", "cpp"),
    ("def g(xs):\n", "    # sum\n    # them\n    return sum(\n        xs)\n\n\n\nprint(g([1]))\n", "python"),
    ("func f() int {\n", "\tx := []int{\n\t\t1,\n\t}\n\treturn x[0]\n}\n\nfunc main() {}\n", "go"),
    # a stub: complete only where the policy lets a closed empty body through
    ("func h() int {\n", "\t// Your code here\n}\n\nfunc main() {\n\th()\n}\n", "go"),
]
GATED_STUB = replace(GATED, syntax_gate_allows_stub=True)


@pytest.fixture(scope="module", params=[GATED, GATED_STUB], ids=["strict", "stubs-pass"])
def gated_export_dir(tmp_path_factory, request):
    return tiny_export(tmp_path_factory, request.param)


@pytest.mark.parametrize("device_path", [False, True])
def test_gated_processor_stops_where_the_gated_replay_says(gated_export_dir, device_path):
    export = GuardExport.load(gated_export_dir)
    assert export.policy.syntax_gate
    policy = export.policy
    table = TokenTable.load(gated_export_dir / TABLE_FILE)
    tokenizer = build_tiny_tokenizer()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    num_refused = num_stops = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        prompts = [encode(p) for p, _, _ in GATED_CODE]
        streams = [encode(c) for _, c, _ in GATED_CODE]
        languages = [language for _, _, language in GATED_CODE]
        # values no sum of which ties with a threshold (a tie is decided by float rounding)
        p_stops, p_dones = zip(*(schedules(rng, len(s), (0.65, 0.93, 0.991)) for s in streams))
        outputs = simulate(make(gated_export_dir, device_path=device_path), export, streams, p_stops,
                           p_dones, rng, prompts=prompts, languages=languages)
        for (prompt, _, language), stream, out, p_stop, p_done in zip(GATED_CODE, streams, outputs,
                                                                   p_stops, p_dones):
            token_texts = [tokenizer.decode([t]) for t in stream]
            check = lambda n, s=stream, p=prompt, lang=language: is_complete(  # noqa: E731
                lang, p, tokenizer.decode(s[:n]), policy.syntax_gate_allows_stub)
            expected = find_stop(list(p_stop), token_texts, policy, list(p_done), is_complete=check)
            ungated = find_stop(list(p_stop), token_texts, POLICY, list(p_done))
            num_refused += ungated is not None and expected != ungated
            marker = out[-1] if out[-1] in export.marker_ids else None
            if expected is not None and expected[0] == len(stream) - 1 and marker is None:
                continue
            if expected is None:
                assert marker is None and out == stream
                continue
            num_stops += 1
            assert marker is not None and out[:-1] == stream[:len(out) - 1]
            kept = export.kept_ids(out, marker, table.arrays["is_line_end"])
            assert (export.stop_index(out, marker), len(kept)) == expected
    assert num_stops >= 4 and num_refused >= 2  # the gate changed some stops, and was followed


def test_device_path_makes_the_same_logits_as_the_numpy_path(export_dir):
    export = GuardExport.load(export_dir)
    tokenizer = build_tiny_tokenizer()
    streams = [tokenizer(code, add_special_tokens=False)["input_ids"] for code in CODE]
    rng = np.random.default_rng(5)
    p_stops, p_dones = zip(*(schedules(rng, len(s)) for s in streams))
    host = simulate(make(export_dir), export, streams, p_stops, p_dones, np.random.default_rng(9))
    device = simulate(make(export_dir, device_path=True), export, streams, p_stops, p_dones,
                      np.random.default_rng(9))
    assert host == device
    assert any(out[-1] in export.marker_ids for out in host)


def test_device_path_env_runs_the_gpu_code_on_a_cpu(export_dir, monkeypatch):
    """`benchmarks.vllm_exactness --device-path` checks the GPU code inside a real vLLM engine on a
    CPU through this variable, read when the engine makes the processor."""
    assert make(export_dir).logits_on_host
    monkeypatch.setenv(DEVICE_PATH_ENV, "1")
    processor = make(export_dir)
    assert not processor.logits_on_host and not processor.is_host  # POLICY has no gate: votes on the device
    assert isinstance(processor.ints, torch.Tensor)


def test_device_path_writes_one_logit_per_decided_row(export_dir):
    """Greedy rows on the device path: a row whose token is decided (a forced marker, or a
    line-start stop pre-decided either way) differs from its logits in one place, the chosen token;
    every other row only in the guard columns. No row is masked: a pass over the vocabulary is what
    a step costs on a GPU."""
    export = GuardExport.load(export_dir)
    tokenizer = build_tiny_tokenizer()
    streams = [tokenizer(code, add_special_tokens=False)["input_ids"] for code in CODE]
    rng = np.random.default_rng(5)
    p_stops, p_dones = zip(*(schedules(rng, len(s)) for s in streams))
    processor = make(export_dir, device_path=True)
    apply, num_decided = processor.apply, []

    def checked_apply(logits):
        before = logits.clone()
        after = apply(logits)
        changed = before != after
        changed[:, export.first_guard_row:] = False
        is_decided = after.max(dim=1).values > 1e29
        assert (changed.sum(dim=1) <= 1).all() and not (changed.any(dim=1) & ~is_decided).any()
        num_decided.append(int(is_decided.sum()))
        return after
    processor.apply = checked_apply
    outputs = simulate(processor, export, streams, p_stops, p_dones, np.random.default_rng(9))
    assert any(out[-1] in export.marker_ids for out in outputs) and sum(num_decided) >= 1


class HostReads:
    """Counts, per processor step, the tensor reads that make the host wait for the device
    (`.cpu()`, `.item()`, `.tolist()`, truth tests): on a GPU each is a sync. (`.numpy()` of a
    GPU tensor raises; it comes after `.cpu()`.) Also lists the copies from the host that would
    wait on a GPU: `torch.as_tensor` / `torch.tensor` made on a device, and `.to(device)` of a host
    tensor without `non_blocking` (torch synchronizes the stream after such a copy)."""
    METHODS = ("cpu", "item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch, processor):
        self.per_step, self.blocking_copies, self.is_inside = [], [], False
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                if self.is_inside:
                    self.per_step[-1] += 1
                return _original(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)
        for name in ("as_tensor", "tensor"):
            original = getattr(torch, name)

            def made(*args, _original=original, _name=name, **kwargs):
                if self.is_inside and kwargs.get("device") is not None:
                    self.blocking_copies.append(f"torch.{_name}")
                return _original(*args, **kwargs)
            monkeypatch.setattr(torch, name, made)
        original_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            moves = kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args)
            if self.is_inside and moves and not kwargs.get("non_blocking") and tensor.device.type == "cpu":
                self.blocking_copies.append("Tensor.to")
            return original_to(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, "to", to)
        apply = processor.apply

        def counted_apply(logits):
            self.per_step.append(0)
            self.is_inside = True
            try:
                return apply(logits)
            finally:
                self.is_inside = False
        processor.apply = counted_apply


def test_device_path_waits_for_the_device_only_for_the_syntax_gate(export_dir, tmp_path_factory, monkeypatch):
    """Ungated, the device path never reads a tensor back. Gated, the votes live on the host: each
    step reads the guard columns once, and a step that decides a line-start stop before sampling
    reads those rows once more. Neither makes a copy to the device that waits."""
    tokenizer = build_tiny_tokenizer()
    gated_dir = tiny_export(tmp_path_factory, GATED)
    for folder, most in ((export_dir, 0), (gated_dir, 2)):
        export = GuardExport.load(folder)
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        streams = [encode(c) for _, c, _ in GATED_CODE]
        rng = np.random.default_rng(3)
        p_stops, p_dones = zip(*(schedules(rng, len(s), (0.65, 0.93, 0.991)) for s in streams))
        processor = make(folder, device_path=True)
        reads = HostReads(monkeypatch, processor)
        outputs = simulate(processor, export, streams, p_stops, p_dones, rng,
                           prompts=[encode(p) for p, _, _ in GATED_CODE],
                           languages=[language for _, _, language in GATED_CODE])
        assert any(out[-1] in export.marker_ids for out in outputs)  # it stopped rows
        assert len(reads.per_step) > 10 and max(reads.per_step) == most
        if most:
            assert min(reads.per_step) == 1
        assert reads.blocking_copies == []  # every copy to the device goes without waiting
        monkeypatch.undo()


def test_observed_and_unguarded_requests_are_never_stopped(export_dir):
    export = GuardExport.load(export_dir)
    tokenizer = build_tiny_tokenizer()
    streams = [tokenizer(code, add_special_tokens=False)["input_ids"] for code in CODE]
    sure = [np.full(len(s), 0.99) for s in streams]
    never_done = [np.full(len(s), 0.01) for s in streams]
    for guard in ("observe", "off"):
        outputs = simulate(make(export_dir), export, streams, sure, never_done, np.random.default_rng(0), guard=guard)
        assert outputs == streams
    # The same probabilities with the guard on stop every one of them.
    outputs = simulate(make(export_dir), export, streams, sure, never_done, np.random.default_rng(0))
    assert all(out[-1] in export.marker_ids for out in outputs)


@pytest.mark.parametrize("device_path", [False, True])
def test_sampled_rows_give_the_marker_the_code_tokens_mass(export_dir, device_path):
    export = GuardExport.load(export_dir)
    processor = make(export_dir, num_slots=1, device_path=device_path)
    output: list[int] = []
    processor.update_state(BatchUpdate(1, removed=[], moved=[], added=[(0, params(export, temperature=0.7), [1], output)]))
    logits = torch.zeros(1, export.vocab_size)
    logits[0, export.stop_row] = float((np.log(0.99 / 0.01) - export.stop_bias) * export.logit_scale)
    first_line = build_tiny_tokenizer()("d\n", add_special_tokens=False)["input_ids"]
    processor.apply(logits.clone())  # prefill: p_stop of the first token is known
    output.append(first_line[0])  # a first code line, so that min_code_lines allows the next stop
    processor.apply(logits.clone())
    output.append(first_line[1])
    before = torch.zeros(1, export.vocab_size)
    before[0, export.stop_row] = logits[0, export.stop_row]
    after = processor.apply(before.clone())[0]
    table = TokenTable.load(export_dir / TABLE_FILE).arrays
    code = ~table["is_whitespace"]
    code[list(export.eos_token_ids)] = False
    code[export.first_guard_row:] = False
    assert torch.isneginf(after[torch.from_numpy(code)]).all()
    expected = 0.7 * torch.logsumexp(before[0, torch.from_numpy(code)] / 0.7, dim=0)
    assert after[export.marker_id(MarkerKind.DROP_OPEN)] == pytest.approx(float(expected), rel=1e-5)
    whitespace = torch.from_numpy(table["is_whitespace"][:export.vocab_size])
    assert (after[whitespace] == 0).all()  # whitespace keeps its own chance


def test_min_tokens_holds_a_stop_back(export_dir):
    export = GuardExport.load(export_dir)
    processor = make(export_dir, num_slots=1)
    output: list[int] = []
    processor.update_state(BatchUpdate(1, removed=[], moved=[], added=[(0, params(export, min_tokens=4), [1], output)]))
    sure = torch.zeros(1, export.vocab_size)
    sure[0, export.stop_row] = float((np.log(0.999 / 0.001) - export.stop_bias) * export.logit_scale)
    forced = []
    for token in build_tiny_tokenizer()("x\ny\nz", add_special_tokens=False)["input_ids"]:
        logits = processor.apply(sure.clone())
        forced.append(int(logits[0].argmax()) in export.marker_ids)
        output.append(token)
    assert forced[:4] == [False] * 4 and forced[4]


def test_parked_requests_keep_their_votes_and_lost_ones_turn_the_guard_off(export_dir):
    export = GuardExport.load(export_dir)
    processor = make(export_dir, num_slots=2)
    output: list[int] = []
    processor.update_state(BatchUpdate(1, removed=[], moved=[], added=[(0, params(export), [1], output)]))
    processor.apply(torch.zeros(1, export.vocab_size))
    output.append(build_tiny_tokenizer()("a", add_special_tokens=False)["input_ids"][0])
    processor.apply(torch.zeros(1, export.vocab_size))
    votes_before = processor.ints[:, 0].copy()
    processor.update_state(BatchUpdate(0, removed=[0], added=[], moved=[]))  # not scheduled for a step
    processor.update_state(BatchUpdate(1, removed=[], moved=[], added=[(1, params(export), [1], output)]))
    assert processor.is_guarded[1] and (processor.ints[:, 1] == votes_before).all()
    stranger = [1, 2, 3]  # joins with output we never saw: no honest votes
    processor.update_state(BatchUpdate(2, removed=[], moved=[], added=[(0, params(export), [2], stranger)]))
    assert not processor.is_guarded[0] and processor.num_lost_requests == 1


def test_bad_settings_and_missing_exports_fail_loudly(tmp_path, export_dir):
    assert parse_guard_arg("off") is False and parse_guard_arg(None) is True and parse_guard_arg("0.7") == 0.7
    for bad in ("maybe", 1.5, 0, "1"):
        with pytest.raises(ValueError, match="guard"):
            GenGuardLogitsProcessor.validate_params(SamplingParams(extra_args={"guard": bad}))
    with pytest.raises(ExportError, match="python -m guard.export"):
        make(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "genguard_vllm.json").write_text("{not json")
    with pytest.raises(ExportError, match="not a valid GenGuard export"):
        GuardExport.load(broken)


def test_decode_records_follow_rows_through_removal_reuse_condense_and_swap(export_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(TRACE_DIR_ENV, str(tmp_path))  # read when the processor is made
    export = GuardExport.load(export_dir)
    processor = make(export_dir, num_slots=4)
    outputs = {name: [] for name in "abcde"}
    prompt = {name: [i + 1] for i, name in enumerate("abcde")}
    modes = {"a": "on", "b": "off", "c": "observe", "d": "on", "e": "off"}

    def added(index, name):
        return (index, params(export, guard=modes[name]), prompt[name], outputs[name])

    processor.update_state(BatchUpdate(4, removed=[], moved=[], added=[added(i, n) for i, n in enumerate("abcd")]))
    for name, num in zip("abcd", (3, 5, 7, 2)):
        outputs[name].extend([7] * num)
    # b left, its row went to e (no removal listed); a left, d's row slid down into it (condense).
    processor.update_state(BatchUpdate(3, removed=[], moved=[(3, 0, MoveDirectionality.UNIDIRECTIONAL)],
                                       added=[added(1, "e")]))
    outputs["d"].append(7)
    processor.update_state(BatchUpdate(3, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)]))
    outputs["e"].extend([7] * 4)
    processor.update_state(BatchUpdate(0, removed=[0, 1, 2], added=[], moved=[]))
    decoded = read_decoded(tmp_path)
    assert decoded == {(prompt_key(prompt[n]), modes[n]): num
                       for n, num in zip("abcde", (3, 5, 7, 3, 4))}
    assert read_trace(tmp_path) == {} and read_trace(tmp_path, mode="on") == {}  # no step records mixed in


def test_a_guard_that_nothing_would_end_is_off_and_says_so(export_dir, caplog):
    processor = make(export_dir, num_slots=2)
    # ignore_eos takes the export's EOS ids, the markers, out of the stops; the caller did not
    # name them in stop_token_ids.
    processor.update_state(BatchUpdate(2, removed=[], moved=[], added=[
        (0, SamplingParams(ignore_eos=True, extra_args={"guard": "on"}), [1], []),
        (1, SamplingParams(ignore_eos=True), [1], [])]))  # no setting: nothing asked, nothing said
    assert not processor.is_guarded[:2].any()
    warnings = [r.getMessage() for r in caplog.records if r.name == "guard.vllm_processor"]
    assert len(warnings) == 1 and "GenGuard is off for a request that asks for it" in warnings[0]
