"""Next-token choice per sequence: greedy, or temperature + top-p with a per-request seed."""
from __future__ import annotations

import torch

from engine.sequence import Sequence


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sorted_probs, sorted_ids = probs.sort(descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays in).
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [B, V] (float32) -> one token id per sequence."""
    token_ids = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        params = seq.params
        if params.is_greedy:
            continue
        probs = torch.softmax(logits[row] / params.temperature, dim=-1)
        probs = _top_p_filter(probs, params.top_p)
        if seq.generator is None and params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        token_ids[row] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return token_ids
