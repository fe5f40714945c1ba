"""One engine protocol, two backends: ours (any HF causal LM) and vLLM (GenGuard in a logits
processor). Serve deployments and Data jobs hold a `GenerationBackend` and never branch on which."""
from backends.protocol import BACKEND_NAMES, EngineDeadError, GenerationBackend, ModelInfo
from backends.spec import BackendSpec, build_backend

__all__ = ["BACKEND_NAMES", "BackendSpec", "EngineDeadError", "GenerationBackend", "ModelInfo",
           "build_backend"]
