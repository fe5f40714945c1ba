"""CodeFast generation engine: continuous batching with GenGuard early termination.

Names resolve on first use (PEP 562): `from engine.params import SamplingParams` or
`from engine.errors import PromptError` must not import torch and transformers with the Engine
(engine/errors.py says why)."""
from __future__ import annotations

import importlib

_MODULE_OF = {"Engine": "engine.engine", "EngineStats": "engine.engine", "EngineConfig": "engine.config",
              "EngineDeadError": "engine.errors", "PromptError": "engine.errors",
              "SequenceError": "engine.errors", "StepError": "engine.errors",
              "SamplingParams": "engine.params", "FinishReason": "engine.sequence",
              "Result": "engine.sequence", "StepEvent": "engine.sequence"}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
