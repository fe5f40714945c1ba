"""Moves sequences between waiting, running and finished, and refills free slots.

Knows nothing of tensors, HTTP or Ray. Prefill has priority: when a slot is free and a prompt is
waiting, the next step prefills the admitted prompts; otherwise it decodes every running sequence.
"""
from __future__ import annotations

from collections import deque

from engine.config import EngineConfig
from engine.sequence import FinishReason, Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.max_num_seqs = config.max_num_seqs
        self.max_prefill_tokens = config.max_prefill_tokens
        self.refill_slots = config.refill_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_free_slots(self) -> int:
        return self.max_num_seqs - len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Pick the sequences of the next step; returns (sequences, is_prefill)."""
        # Without refill (static batching) a new batch starts only once the previous one is empty.
        can_admit = self.waiting and self.num_free_slots > 0 and (self.refill_slots or not self.running)
        if can_admit:
            admitted = self._admit()
            self.running.extend(admitted)
            return admitted, True
        return list(self.running), False

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        max_len = 0
        while self.waiting and len(admitted) < self.num_free_slots:
            seq = self.waiting[0]
            padded_tokens = max(max_len, seq.num_tokens) * (len(admitted) + 1)
            # The first prompt always goes in, so one long prompt cannot block the queue.
            if admitted and padded_tokens > self.max_prefill_tokens:
                break
            max_len = max(max_len, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            admitted.append(self.waiting.popleft())
        return admitted

    def pop_finished(self) -> list[Sequence]:
        """Remove finished sequences from the running batch so they are gone by the next step."""
        finished = [s for s in self.running if s.is_finished]
        if finished:
            self.running = [s for s in self.running if not s.is_finished]
        return finished

    def abort(self, request_id: str) -> Sequence | None:
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.finish(FinishReason.ABORT)
                return seq
        for seq in self.running:
            if seq.request_id == request_id and not seq.is_finished:
                seq.finish(FinishReason.ABORT)  # leaves the batch at the next pop_finished
                return seq
        return None
