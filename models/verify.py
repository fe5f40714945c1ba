"""Is a model folder whole? Its recorded checksums (the manifest) and whether its files parse.

A cache records its own checksums when it is built (MANIFEST_FILE). Every load checks them
cheaply: file sizes, small files whole, and NUM_SAMPLES evenly spaced blocks of each large file,
so truncation and any damaged run longer than size / (NUM_SAMPLES - 1) bytes are caught;
`--prepare` hashes every byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

MANIFEST_FILE = "codefast-manifest.json"  # in a packaged model's cache: its files' checksums
MANIFEST_FORMAT = 1
NUM_SAMPLES = 256  # blocks hashed per large file at load
SAMPLE_BYTES = 16 * 1024
FULLY_HASHED_BYTES = 8 << 20  # files up to this size are hashed whole at every load


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


def unparsable_file(folder: Path) -> str | None:
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
