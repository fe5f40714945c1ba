"""Which floating-point type runs the model when the user asks for `auto` (the default).

bfloat16 halves memory traffic, but on a CPU without native bf16 instructions (AVX512_BF16, AMX,
or Arm's BF16) PyTorch emulates it and it is several times slower than float32 (figures in
docs/measurements-notes.md). So `auto` picks bf16 on a CPU only where the hardware has it; on a GPU, bf16 where supported.
"""
from __future__ import annotations

from pathlib import Path

DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags, Arm "Features"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first core's feature flags (Linux); empty where /proc/cpuinfo is unavailable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def resolve_dtype(dtype: str, device: str = "cpu", flags: frozenset[str] | None = None) -> str:
    """`auto` -> a concrete dtype name for `device`; any other valid name is returned unchanged."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"
    if device.startswith("mps"):
        return "float16"
    flags = cpu_flags() if flags is None else flags
    return "bfloat16" if flags & NATIVE_BF16_CPU_FLAGS else "float32"
