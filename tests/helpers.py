"""Small builders shared by tests: a tiny engine and hand-set guards."""
from __future__ import annotations

import torch

from engine import Engine, EngineConfig
from engine.tiny import TINY_MODEL_NAME, build_tiny_model_and_tokenizer
from guard.policy import StopPolicy
from guard.probe import GenGuard

TINY_HIDDEN_SIZE = 64


def constant_guard(p_stop_logit: float, policy: StopPolicy, hidden_size: int = TINY_HIDDEN_SIZE) -> GenGuard:
    """A guard that ignores the hidden state: positive logit -> always votes stop."""
    guard = GenGuard(hidden_size, TINY_MODEL_NAME, policy)
    with torch.no_grad():
        guard.linear.weight.zero_()
        guard.linear.bias.copy_(torch.tensor([p_stop_logit, -p_stop_logit]))
    return guard


def tiny_engine(guard: GenGuard | None = None, **config_kwargs) -> Engine:
    model, tokenizer = build_tiny_model_and_tokenizer(seed=0)
    config = EngineConfig(dtype="float32", **{"max_num_seqs": 4, **config_kwargs})
    return Engine(model, tokenizer, guard, config, model_name=TINY_MODEL_NAME)
