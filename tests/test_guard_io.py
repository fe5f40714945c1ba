"""GenGuard files: save/load round trip, clear errors, shipped-guard lookup."""
import json

import pytest
import torch

from guard.policy import PolicyKind, StopPolicy
from safetensors.torch import save_file

from guard.probe import META_FILE, WEIGHTS_FILE, GenGuard, GuardFileError, GuardMismatchError
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
    "policy unknown field": (lambda d: _edit_meta(d, policy={"stop_thresold": 0.5}), META_FILE, "'policy'"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_guard_gets_one_clear_error_naming_the_file_and_field(tmp_path, damage):
    GenGuard(64, "codefast/tiny-random").save(tmp_path)
    apply, file_name, detail = DAMAGES[damage]
    apply(tmp_path)
    with pytest.raises(GuardFileError) as info:
        GenGuard.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path / file_name) in message and detail in message, message
    assert "\n" not in message  # one line
