"""GenGuard files: save/load round trip, clear errors, shipped-guard lookup."""
import json

import pytest
import torch

from guard.policy import PolicyKind, StopPolicy
from safetensors.torch import load_file, save_file

from guard.export import META_FILE as EXPORT_META_FILE
from guard.export import ExportError, GuardExport, build_export
from guard.probe import (META_FILE, SHIPPED_DIR, WEIGHTS_FILE, GenGuard, GuardFileError, GuardMismatchError,
                         shipped_guard_dir)
from tests.helpers import tiny_engine


def test_guard_round_trips_weights_policy_and_metadata(tmp_path):
    guard = GenGuard(64, "codefast/tiny-random", StopPolicy(kind="token", stop_threshold=0.7),
                     metadata={"report": {"token_accuracy": 0.9}})
    torch.nn.init.normal_(guard.linear.weight)
    guard.save(tmp_path)
    loaded = GenGuard.load(tmp_path)
    assert torch.equal(loaded.linear.weight, guard.linear.weight)
    assert loaded.policy.kind is PolicyKind.TOKEN and loaded.policy.stop_threshold == 0.7
    assert loaded.model_name == "codefast/tiny-random"
    assert loaded.metadata["report"]["token_accuracy"] == 0.9
    hidden = torch.randn(3, 64)
    assert torch.allclose(loaded.stop_probs(hidden), guard.stop_probs(hidden))
    tiny_engine(guard=loaded)  # loads into the engine of the model it belongs to


def test_loading_a_missing_guard_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=META_FILE):
        GenGuard.load(tmp_path / "nowhere")


def test_metadata_that_disagrees_with_weights_is_rejected(tmp_path):
    GenGuard(64).save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["hidden_size"] = 896
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(GuardMismatchError, match="hidden size 896"):
        GenGuard.load(tmp_path)


def test_done_head_round_trips_and_format_1_guards_still_load(tmp_path):
    guard = GenGuard(64, "codefast/tiny-random", StopPolicy(done_threshold=0.8), has_done_head=True)
    torch.nn.init.normal_(guard.done_linear.weight)
    guard.save(tmp_path / "v2")
    loaded = GenGuard.load(tmp_path / "v2")
    hidden = torch.randn(3, 64)
    assert loaded.policy.done_threshold == 0.8
    assert torch.allclose(loaded.done_probs(hidden), guard.done_probs(hidden))
    # A format-1 guard (stop head only) loads without a done head.
    GenGuard(64).save(tmp_path / "v1")
    meta = json.loads((tmp_path / "v1" / META_FILE).read_text())
    meta["format_version"] = 1
    (tmp_path / "v1" / META_FILE).write_text(json.dumps(meta))
    old = GenGuard.load(tmp_path / "v1")
    assert old.done_linear is None and old.done_probs(hidden) is None
    meta["format_version"] = 3
    (tmp_path / "v1" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unsupported guard format 3"):
        GenGuard.load(tmp_path / "v1")


def _edit_meta(guard_dir, **changes):
    meta = json.loads((guard_dir / META_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    (guard_dir / META_FILE).write_text(json.dumps(meta))


def _edit_policy(guard_dir, **changes):
    meta = json.loads((guard_dir / META_FILE).read_text())
    _edit_meta(guard_dir, policy={**meta["policy"], **changes})


def _edit_tensor(guard_dir, name, value):
    state = load_file(str(guard_dir / WEIGHTS_FILE))
    state[name].view(-1)[0] = value
    save_file(state, str(guard_dir / WEIGHTS_FILE))


DAMAGES = {
    # name: (how the folder is damaged, the file the error must name, what else it must say)
    "weights empty": (lambda d: (d / WEIGHTS_FILE).write_bytes(b""), WEIGHTS_FILE, "safetensors"),
    "weights garbage": (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x07" * 300), WEIGHTS_FILE, "safetensors"),
    "weights truncated": (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-40]),
                          WEIGHTS_FILE, "safetensors"),
    "no stop head": (lambda d: save_file({"bias": torch.zeros(2)}, str(d / WEIGHTS_FILE)), WEIGHTS_FILE, "'weight'"),
    "meta not json": (lambda d: (d / META_FILE).write_text('{"hidden_size": 64,'), META_FILE, "JSON"),
    "meta not an object": (lambda d: (d / META_FILE).write_text("[64]"), META_FILE, "object"),
    "no hidden_size": (lambda d: _edit_meta(d, hidden_size=None), META_FILE, "'hidden_size'"),
    "hidden_size not a number": (lambda d: _edit_meta(d, hidden_size="big"), META_FILE, "'hidden_size'"),
    "policy unknown field": (lambda d: _edit_meta(d, policy={"stop_thresold": 0.5}), META_FILE,
                             "'policy.stop_thresold'"),
    # The policy's schema: a string is no bool ("false" is truthy), nor a number, nor NaN.
    "keep_stop_line a string": (lambda d: _edit_policy(d, keep_stop_line="false"), META_FILE,
                                "'policy.keep_stop_line'"),
    "syntax_gate a string": (lambda d: _edit_policy(d, syntax_gate="no"), META_FILE, "'policy.syntax_gate'"),
    "threshold a string": (lambda d: _edit_policy(d, stop_threshold="0.5"), META_FILE, "'policy.stop_threshold'"),
    "threshold NaN": (lambda d: _edit_policy(d, stop_threshold=float("nan")), META_FILE, "'policy.stop_threshold'"),
    "threshold inf": (lambda d: _edit_policy(d, done_threshold=float("inf")), META_FILE, "'policy.done_threshold'"),
    "threshold out of range": (lambda d: _edit_policy(d, stop_threshold=1.5), META_FILE, "'policy.stop_threshold'"),
    "count a fraction": (lambda d: _edit_policy(d, num_consecutive=2.5), META_FILE, "'policy.num_consecutive'"),
    "count a bool": (lambda d: _edit_policy(d, min_code_lines=True), META_FILE, "'policy.min_code_lines'"),
    "count null": (lambda d: _edit_policy(d, max_blank_lines=None), META_FILE, "'policy.max_blank_lines'"),
    "count negative": (lambda d: _edit_policy(d, syntax_gate_max_lines=-1), META_FILE,
                       "'policy.syntax_gate_max_lines'"),
    "unknown kind": (lambda d: _edit_policy(d, kind="sentence"), META_FILE, "'policy.kind'"),
    "keep above start": (lambda d: _edit_policy(d, line_keep_threshold=0.9), META_FILE,
                         "'policy.line_keep_threshold'"),
    "policy not an object": (lambda d: _edit_meta(d, policy="line"), META_FILE, "'policy'"),
    # Required sections: none falls back to a default without a word.
    "no policy": (lambda d: _edit_meta(d, policy=None), META_FILE, "'policy' is missing"),
    "no model": (lambda d: _edit_meta(d, model=None), META_FILE, "'model' is missing"),
    "no format_version": (lambda d: _edit_meta(d, format_version=None), META_FILE, "'format_version' is missing"),
    "format_version a string": (lambda d: _edit_meta(d, format_version="2"), META_FILE, "'format_version'"),
    "model not a string": (lambda d: _edit_meta(d, model=7), META_FILE, "'model'"),
    # A NaN bias makes every p_stop NaN, which never votes stop: the guard would be silently off.
    "bias NaN": (lambda d: _edit_tensor(d, "bias", float("nan")), WEIGHTS_FILE, "'bias' holds NaN"),
    "weight inf": (lambda d: _edit_tensor(d, "weight", float("inf")), WEIGHTS_FILE, "'weight' holds NaN"),
    "done bias NaN": (lambda d: _edit_tensor(d, "done_bias", float("nan")), WEIGHTS_FILE, "'done_bias' holds NaN"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_guard_gets_one_clear_error_naming_the_file_and_field(tmp_path, damage):
    GenGuard(64, "codefast/tiny-random", has_done_head=True).save(tmp_path)
    apply, file_name, detail = DAMAGES[damage]
    apply(tmp_path)
    with pytest.raises(GuardFileError) as info:
        GenGuard.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path / file_name) in message and detail in message, message
    assert "\n" not in message  # one line


@pytest.mark.parametrize("guard_dir", sorted(SHIPPED_DIR.iterdir()), ids=lambda path: path.name)
def test_every_shipped_guard_meets_the_schema(guard_dir):
    guard = GenGuard.load(guard_dir)
    assert shipped_guard_dir(guard.model_name) == guard_dir
    assert StopPolicy.from_json(json.loads((guard_dir / META_FILE).read_text())["policy"]) == guard.policy


def _export_meta(policy_json):
    export = GuardExport(model_name="m", guard_sha256="0" * 64, stop_row=10, done_row=11,
                         marker_ids=(12, 13, 14), logit_scale=1.0, stop_bias=0.0, done_bias=0.0,
                         policy=StopPolicy(), eos_token_ids=(1,), num_tokenizer_ids=10, vocab_size=15)
    return {**export.to_json(), "policy": policy_json}


@pytest.mark.parametrize("change, field", [({"keep_stop_line": "false"}, "'policy.keep_stop_line'"),
                                           ({"syntax_gate": "no"}, "'policy.syntax_gate'"),
                                           ({"stop_threshold": float("nan")}, "'policy.stop_threshold'"),
                                           ({"stop_thresold": 0.5}, "'policy.stop_thresold'"),
                                           (None, "'policy' must be a JSON object")])
def test_an_export_is_held_to_the_same_policy_schema(tmp_path, change, field):
    meta = _export_meta(None if change is None else {**StopPolicy().to_json(), **change})
    (tmp_path / EXPORT_META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ExportError) as info:
        GuardExport.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path / EXPORT_META_FILE) in message and field in message and "\n" not in message, message
    (tmp_path / EXPORT_META_FILE).write_text(json.dumps(_export_meta(StopPolicy().to_json())))
    assert GuardExport.load(tmp_path).policy == StopPolicy()


def test_an_export_refuses_a_guard_with_nan_weights(tmp_path):
    guard = GenGuard(64, "codefast/tiny-random")
    with torch.no_grad():
        guard.linear.bias[0] = float("nan")
    with pytest.raises(GuardFileError, match="'bias' holds NaN"):
        build_export(tmp_path / "model", guard.model_name, guard, tmp_path / "export")
    assert not (tmp_path / "export").exists()
