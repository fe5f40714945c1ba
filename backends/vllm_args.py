"""vLLM's engine arguments for a BackendSpec, the same for every way we start vLLM: our backend
(backends/vllm.py), Ray Serve LLM (deployments/llm_app.py) and Ray Data LLM (jobs/ray_data_llm.py).

No torch or vLLM import at module level: Ray Data LLM's and Ray Serve LLM's drivers build these
without loading an engine's stack (guard/vllm_contract.py says why).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from backends.spec import VLLM_CPU_EXECUTOR, VLLM_CPU_EXECUTOR_ENV, BackendSpec
from guard.vllm_contract import PROCESSOR_PATH

GIB = 1 << 30
LOOPBACK_ENV = {"VLLM_HOST_IP": "127.0.0.1"}  # keep vLLM's own sockets on loopback
# What a Ray worker running an engine needs besides: the model is a local folder, and the
# tokenizer's threads would compete with the engine's.
RAY_WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class VllmEngineArgs:
    """What starts one vLLM engine on `served_folder(spec)`: its engine kwargs, its environment."""

    kwargs: dict  # AsyncEngineArgs(model=folder, **kwargs), or Ray LLM's `engine_kwargs`
    env: dict  # read by vLLM when it builds its config, in the engine's process


def served_folder(spec: BackendSpec) -> tuple[Path, str]:
    """(the folder vLLM serves for `spec`, the model's name): with a guard, its export (built once
    per node, on first use)."""
    from guard.export import GuardExport, export_folder_for, resolve_model_folder

    if spec.guard is None:
        return resolve_model_folder(spec.model)
    folder = export_folder_for(spec.model, spec.guard)
    return folder, GuardExport.load(folder).model_name


def vllm_engine_args(spec: BackendSpec, *, picks_executor: bool = True) -> VllmEngineArgs:
    """vLLM's engine kwargs and environment for `spec`. `picks_executor`: on CPU, run the model in
    the engine's own process (backends/spec.py says why); False where the caller's framework
    decides (Ray Serve LLM forces its own choice)."""
    from engine.dtypes import resolve_dtype

    device = spec.resolved_device()
    kwargs = {"max_num_seqs": spec.max_num_seqs, "dtype": resolve_dtype(spec.dtype, device),
              "enforce_eager": spec.enforce_eager if spec.enforce_eager is not None else device == "cpu",
              "seed": 0}
    if spec.max_model_len is not None:  # else vLLM's: the model's own context
        kwargs["max_model_len"] = spec.max_model_len
    if spec.guard is not None:
        kwargs["logits_processors"] = [PROCESSOR_PATH]
    env = dict(LOOPBACK_ENV)
    if device == "cpu":  # an explicit KV size; vLLM then skips its reserve-92%-of-RAM check
        kwargs["kv_cache_memory_bytes"] = spec.kv_cache_gib * GIB
        if picks_executor:
            kwargs["distributed_executor_backend"] = VLLM_CPU_EXECUTOR
            env |= VLLM_CPU_EXECUTOR_ENV
    return VllmEngineArgs(kwargs, env)
