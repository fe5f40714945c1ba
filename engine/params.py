"""Per-request generation settings, validated once at the edge (construction)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# What a request may name as its language (guard/syntax.py holds the one rule).
from guard.syntax import language_name_error

# A seed is a signed 64-bit integer: what every RNG we hand it to (torch, numpy, vLLM) accepts.
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 63) - 1
# Below this temperature sampling is greedy: logits / temperature would overflow float32 (a
# temperature of 1e-300 is 0 in float32) and the probabilities become NaN.
MIN_SAMPLING_TEMPERATURE = 1e-5

@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    temperature == 0 (or below MIN_SAMPLING_TEMPERATURE) means greedy. `seed` (a signed 64-bit
    int) makes sampling reproducible per request, independent of which other requests share the batch. `use_guard` switches GenGuard off for this request only;
    `guard_threshold` overrides the guard's stop threshold for this request. `language` (any
    name) is the code's language for the guard's syntax gate, which parses those with a grammar
    (guard.syntax.LANGUAGES) and leaves others ungated; None: told from the prompt, and a prompt
    whose language cannot be told goes ungated.
    """

    max_new_tokens: int = 300
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    use_guard: bool = True
    guard_threshold: float | None = None
    ignore_eos: bool = False
    language: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not MIN_SEED <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in [{MIN_SEED}, {MAX_SEED}] (int64), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if self.guard_threshold is not None and not 0 < self.guard_threshold < 1:
            raise ValueError(f"guard_threshold must be in (0, 1), got {self.guard_threshold}")
        if (error := language_name_error(self.language)) is not None:
            raise ValueError(error)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE
