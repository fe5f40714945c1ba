"""Our own engine (engine/) behind the backend protocol: the reference backend for any HF model."""
from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import Future

from backends.protocol import GenerationBackend, ModelInfo
from backends.spec import BackendSpec
from engine import Engine, EngineConfig, SamplingParams, StepEvent
from engine.async_engine import DEFAULT_WEDGE_TIMEOUT_S, AsyncEngine


class CodefastBackend(GenerationBackend):
    def __init__(self, engine: Engine, wedge_timeout_s: float = DEFAULT_WEDGE_TIMEOUT_S):
        self.engine = engine
        # AsyncEngine holds the health logic (dead loop, failing steps, wedged step) and publishes
        # the stats the protocol promises never block on a running step.
        self.aengine = AsyncEngine(engine, wedge_timeout_s=wedge_timeout_s)
        self.info = ModelInfo(model_name=engine.model_name, max_model_len=engine.max_model_len,
                              has_guard=engine.guard is not None, backend="codefast")

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> "CodefastBackend":
        config = EngineConfig(max_num_seqs=spec.max_num_seqs, dtype=spec.dtype,
                              device=spec.resolved_device(), max_model_len=spec.max_model_len)
        return cls(Engine.from_pretrained(spec.model, guard=spec.guard, config=config),
                   wedge_timeout_s=spec.wedge_timeout_s)

    def encode_prompt(self, prompt: str, params: SamplingParams) -> list[int]:
        # Outside AsyncEngine's lock on purpose: encoding only reads the tokenizer (no
        # padding/truncation state is set), as the engine thread's decoding does.
        return self.engine.encode_prompt(prompt, params)

    def stream(self, prompt: str, params: SamplingParams,
               request_id: str | None = None) -> AsyncIterator[StepEvent]:
        return self.aengine.stream(prompt, params, request_id)

    def submit(self, prompt: str, params: SamplingParams, request_id: str | None = None) -> Future:
        return self.aengine.submit(prompt, params, request_id)

    def stats(self) -> dict:
        return self.aengine.stats()

    def check_health(self) -> None:
        self.aengine.check_health()

    def shutdown(self) -> None:
        self.aengine.shutdown()
