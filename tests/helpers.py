"""Small builders shared by tests: a tiny engine and hand-set guards."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from engine import Engine, EngineConfig
from guard.policy import StopPolicy
from guard.probe import GenGuard
from models.tiny import TINY_MODEL_NAME, build_tiny_model_and_tokenizer
from tests.conftest import REPO_ROOT

TINY_HIDDEN_SIZE = 64
ENGINE_STACK = ("torch", "transformers", "vllm")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_stack_imported_by(code: str) -> list[str]:
    """Which of torch / transformers / vLLM a fresh interpreter holds after running `code` (an
    import list). Processes that only move rows or requests must not load them: each costs a new
    process seconds of CPU and hundreds of MiB."""
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(','.join("
                           f"m for m in {ENGINE_STACK!r} if m in sys.modules))"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    last_line = (done.stdout.strip().splitlines() or [""])[-1]  # vLLM logs to stdout as it loads
    return [name for name in last_line.split(",") if name]


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
