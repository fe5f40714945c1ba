"""Turns sequences into tensors, runs the model, returns one output per sequence.

Batched prefill of newly admitted prompts (left-padded) and batched one-token decode of every
running sequence over a shared KV cache (see kv_cache.py). GenGuard runs on the same [B, H] last
hidden states (after the final norm) that produce the logits, so it costs one tiny matmul a step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from engine import kv_cache
from engine.sampler import SamplingError, sample
from engine.sequence import Sequence
from guard.probe import GenGuard


@dataclass(frozen=True)
class RunnerOutput:
    token_id: int  # -1 when `error` is set
    p_stop: float | None  # guard's probability that this token is excess; None without a guard
    p_done: float | None = None  # ... that this token ends the expected code; None without a done head
    error: SamplingError | None = None  # this sequence alone failed: no token was drawn


class ModelRunner:
    def __init__(self, model: PreTrainedModel, guard: GenGuard | None, device: str = "cpu"):
        self.model = model
        # The backbone returns normed last hidden states; the head turns only the last position
        # into logits, so prefill never materialises [B, L, V] logits.
        self.backbone = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.guard = guard
        self.device = torch.device(device)
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, T] 1 = real token, 0 = left padding
        self.row_seq_ids: list[int] = []

    @property
    def num_rows(self) -> int:
        return len(self.row_seq_ids)

    @property
    def num_cache_bytes(self) -> int:
        return kv_cache.num_cached_bytes(self.cache)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[RunnerOutput]:
        token_lists = [s.prompt_ids + s.output_ids for s in seqs]
        length = max(len(t) for t in token_lists)
        pad_id = 0
        input_ids = torch.tensor([[pad_id] * (length - len(t)) + t for t in token_lists],
                                 device=self.device)
        mask = torch.tensor([[0] * (length - len(t)) + [1] * len(t) for t in token_lists],
                            device=self.device)
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                               past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        self.cache, self.mask = kv_cache.concat_rows(self.cache, self.mask, cache, mask)
        self.row_seq_ids += [s.seq_id for s in seqs]
        return self._outputs(hidden, seqs)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> list[RunnerOutput]:
        self._arrange_rows([s.seq_id for s in seqs])
        input_ids = torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.device)
        position_ids = torch.tensor([[s.num_tokens - 1] for s in seqs], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(seqs), 1)], dim=1)
        hidden = self.backbone(input_ids=input_ids, attention_mask=self.mask,
                               position_ids=position_ids, past_key_values=self.cache,
                               use_cache=True).last_hidden_state[:, -1]
        return self._outputs(hidden, seqs)

    def free(self, seq_ids: list[int]) -> None:
        """Release the cache rows of finished sequences."""
        gone = set(seq_ids)
        self._arrange_rows([i for i in self.row_seq_ids if i not in gone])

    def _arrange_rows(self, seq_ids: list[int]) -> None:
        if seq_ids == self.row_seq_ids:
            return
        if not seq_ids:
            self.cache, self.mask, self.row_seq_ids = None, None, []
            return
        row_of = {seq_id: row for row, seq_id in enumerate(self.row_seq_ids)}
        self.cache, self.mask = kv_cache.select_rows(self.cache, self.mask,
                                                     [row_of[i] for i in seq_ids])
        self.row_seq_ids = list(seq_ids)

    def _outputs(self, hidden: torch.Tensor, seqs: list[Sequence]) -> list[RunnerOutput]:
        logits = self.lm_head(hidden).float()
        token_ids = sample(logits, seqs)
        p_stops: list[float | None] = [None] * len(seqs)
        p_dones: list[float | None] = [None] * len(seqs)
        if self.guard is not None and any(s.params.use_guard for s in seqs):
            p_stops = self.guard.stop_probs(hidden).tolist()
            done = self.guard.done_probs(hidden)
            p_dones = p_dones if done is None else done.tolist()
        return [RunnerOutput(-1, p, d, t) if isinstance(t, SamplingError) else RunnerOutput(t, p, d)
                for t, p, d in zip(token_ids, p_stops, p_dones)]
