"""Tokens that end generated code besides a model's own EOS (the Qwen2.5 family's names)."""
from __future__ import annotations

EXTRA_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")  # chat turn end and document end both stop code
