"""Engine-wide settings (one per engine instance)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.dtypes import DTYPE_NAMES


@dataclass(frozen=True)
class EngineConfig:
    """Capacity and numerics of one engine.

    `max_num_seqs` is the slot budget: how many sequences decode together. `refill_slots=False`
    turns continuous batching off (a new batch starts only when the whole previous batch is done),
    which is what static-batch `generate` does; kept for benchmarks and tests.
    """

    max_num_seqs: int = 8
    max_model_len: int | None = None  # None: the model's own context length
    max_prefill_tokens: int = 4096  # cap on padded prompt tokens admitted in one prefill step
    dtype: str = "auto"  # auto: bf16 where the hardware has it, else float32 (engine/dtypes.py)
    device: str = "cpu"
    refill_slots: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
