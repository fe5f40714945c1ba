"""Per-request generation settings, validated once at the edge (construction)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    temperature == 0 means greedy. `seed` makes sampling reproducible per request, independent of
    which other requests share the batch. `use_guard` switches GenGuard off for this request only;
    `guard_threshold` overrides the guard's stop threshold for this request.
    """

    max_new_tokens: int = 300
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    use_guard: bool = True
    guard_threshold: float | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if self.guard_threshold is not None and not 0 < self.guard_threshold < 1:
            raise ValueError(f"guard_threshold must be in (0, 1), got {self.guard_threshold}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
