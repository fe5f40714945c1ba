"""CodeFast generation engine: continuous batching with GenGuard early termination."""
from engine.config import EngineConfig
from engine.engine import Engine, EngineDeadError, EngineStats, PromptError, SequenceError, StepError, StepEvent
from engine.params import SamplingParams
from engine.sequence import FinishReason, Result

__all__ = ["Engine", "EngineConfig", "EngineDeadError", "EngineStats", "FinishReason", "PromptError", "Result",
           "SamplingParams", "SequenceError", "StepError", "StepEvent"]
