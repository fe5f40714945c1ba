"""`dtype="auto"`: bf16 only where the hardware runs it natively, float32 otherwise."""
from __future__ import annotations

import pytest
import torch

from engine import EngineConfig
from engine.dtypes import cpu_flags, resolve_dtype
from engine.model_loading import load_model
from models.tiny import TINY_MODEL_NAME


@pytest.mark.parametrize("flags, expected", [
    (frozenset({"avx", "avx2", "fma"}), "float32"),  # AVX2-only x86: bf16 would be emulated
    (frozenset({"avx2", "avx512f", "avx512_bf16"}), "bfloat16"),
    (frozenset({"avx512f", "amx_bf16", "amx_tile"}), "bfloat16"),
    (frozenset({"fp", "asimd", "bf16"}), "bfloat16"),  # Arm
    (frozenset(), "float32"),  # unknown CPU: the safe choice
])
def test_auto_on_cpu_follows_native_bf16_support(flags, expected):
    assert resolve_dtype("auto", "cpu", flags=flags) == expected


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_an_explicit_dtype_is_kept_whatever_the_cpu(dtype):
    assert resolve_dtype(dtype, "cpu", flags=frozenset()) == dtype


def test_unknown_dtype_is_refused_at_the_edge():
    with pytest.raises(ValueError, match="dtype must be one of auto"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="fp8")


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_default_config_loads_the_model_in_the_resolved_dtype():
    assert EngineConfig().dtype == "auto"
    loaded = load_model(TINY_MODEL_NAME, dtype="auto")
    expected = getattr(torch, resolve_dtype("auto", "cpu"))
    assert next(loaded.model.parameters()).dtype == expected
