"""A packaged model's GGUF from its installed wheels: the part files, assembled and checked."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from models.errors import ChecksumError, ModelNotFoundError
from models.packaged import INSTALL_COMMAND, PackagedModel


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
