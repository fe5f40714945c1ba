"""Next-token choice per sequence: greedy, or temperature + top-p with a per-request seed.

The whole batch is sampled with tensor ops on the logits' device: one softmax and one top-p
filter for every sampled row, one multinomial draw for the rows without a seed. A seeded row
draws alone, from a generator of its own made on that same device (PyTorch refuses a CPU
generator for CUDA tensors), so its tokens do not depend on which requests share the batch.

A row whose probabilities are not a distribution (NaN or inf from the model, nothing left after
filtering) fails that sequence alone: the others of the step go on.
"""
from __future__ import annotations

import torch

from engine.sequence import Sequence


class SamplingError(RuntimeError):
    """One sequence's next token could not be drawn; only that sequence fails."""


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs [N, V], top_p [N]: keep per row the smallest prefix whose mass reaches top_p (the
    token that crosses it stays in)."""
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs)


def _generator(seq: Sequence, device: torch.device) -> torch.Generator:
    if seq.generator is None or seq.generator.device != device:
        seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)
    return seq.generator


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int | SamplingError]:
    """logits [B, V] (float32) -> per sequence a token id, or the SamplingError that fails it."""
    token_ids: list[int | SamplingError] = logits.argmax(dim=-1).tolist()
    rows = [row for row, seq in enumerate(seqs) if not seq.params.is_greedy]
    if not rows:
        return token_ids
    device = logits.device
    params = [seqs[row].params for row in rows]
    temperatures = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
    probs = torch.softmax(logits[rows] / temperatures[:, None], dim=-1)
    top_ps = torch.tensor([p.top_p for p in params], device=device, dtype=probs.dtype)
    if bool((top_ps < 1.0).any()):
        probs = torch.where((top_ps < 1.0)[:, None], _top_p_filter(probs, top_ps), probs)
    is_valid = (torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)).tolist()
    unseeded = [i for i, p in enumerate(params) if p.seed is None and is_valid[i]]
    if unseeded:
        drawn = torch.multinomial(probs[unseeded], 1).squeeze(-1).tolist()
        for i, token_id in zip(unseeded, drawn):
            token_ids[rows[i]] = token_id
    for i, p in enumerate(params):
        row = rows[i]
        if not is_valid[i]:
            token_ids[row] = SamplingError(
                f"no valid next-token distribution (temperature {p.temperature}, top_p {p.top_p}):"
                " the model produced NaN or infinite logits")
        elif p.seed is not None:
            generator = _generator(seqs[row], device)
            token_ids[row] = int(torch.multinomial(probs[i], 1, generator=generator))
    return token_ids
