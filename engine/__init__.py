"""CodeFast generation engine: continuous batching with GenGuard early termination."""
from engine.config import EngineConfig
from engine.engine import Engine, EngineStats, PromptError, StepEvent
from engine.params import SamplingParams
from engine.sequence import FinishReason, Result

__all__ = ["Engine", "EngineConfig", "EngineStats", "FinishReason", "PromptError", "Result",
           "SamplingParams", "StepEvent"]
