"""What one CodeFast Serve application runs: model, guard, engine capacity and Serve options.

Validated once at the edge (construction), so a bad `serve run` config or CLI flag fails before
anything is deployed. The HTTP request bodies live in protocol.py (Pydantic); this is not one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from backends.spec import BackendSpec
_NESTED_ARGS = {"autoscaling_config": ("min_replicas", "max_replicas", "target_ongoing_requests"),
                "ray_actor_options": ("num_cpus", "num_gpus")}


def check_capacity(max_ongoing_requests: int, max_num_seqs: int) -> None:
    """Serve must let at least as many requests into a replica as the engine has batch slots,
    else slots stay empty while requests queue in the proxy and batching never fills up."""
    if max_ongoing_requests < max_num_seqs:
        raise ValueError(f"max_ongoing_requests ({max_ongoing_requests}) must be >= the engine's"
                         f" max_num_seqs ({max_num_seqs}): a replica would never fill its batch")


@dataclass(frozen=True)
class ServeConfig:
    backend: str = "codefast"  # "codefast" (our engine, any HF causal LM) or "vllm"
    model: str = "default"  # a packaged model ("default", "qwen2.5-coder-1.5b"), "codefast/tiny-random", or a local HF folder
    guard: str | None = "default"  # "default" (the guard shipped for the model), None/"none", or a folder
    max_num_seqs: int = 8  # engine batch slots per replica
    dtype: str = "auto"
    device: str = "auto"  # auto: cuda when the replica got a GPU, else cpu
    # Serve options. None = derived: 2x slots lets a finished slot be refilled from the engine's
    # own queue at the next step instead of waiting for a proxy round trip.
    max_ongoing_requests: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float | None = None  # None: max_num_seqs (a full batch per replica)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    enforce_eager: bool | None = None  # vLLM only; None: eager on CPU, compiled on GPU
    kv_cache_gib: int = 4  # vLLM on CPU only: KV cache size in whole GiB
    wedge_timeout_s: float = 300.0  # a step (or, on vLLM, silence) this long: the replica is unhealthy

    def __post_init__(self) -> None:
        if self.guard is not None and not isinstance(self.guard, str):
            raise ValueError(f"guard must be 'default', 'none' or a folder path, got {self.guard!r}")
        object.__setattr__(self, "guard", self.backend_spec().guard)  # validates the engine fields
        if self.max_ongoing_requests is None:
            object.__setattr__(self, "max_ongoing_requests", 2 * self.max_num_seqs)
        check_capacity(self.max_ongoing_requests, self.max_num_seqs)
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas},"
                             f" {self.max_replicas}")
        if self.target_ongoing_requests is None:
            object.__setattr__(self, "target_ongoing_requests", float(self.max_num_seqs))
        if not 0 < self.target_ongoing_requests <= self.max_ongoing_requests:
            raise ValueError(f"target_ongoing_requests must be in (0, max_ongoing_requests ="
                             f" {self.max_ongoing_requests}], got {self.target_ongoing_requests}:"
                             " a larger target could never be reached and autoscaling would never act")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")

    @classmethod
    def from_args(cls, args: dict) -> "ServeConfig":
        """From a `serve run` config's `args:` mapping; unknown keys are an error, not ignored.

        Serve options may be nested as Serve spells them (`autoscaling_config: {min_replicas, ...}`,
        `ray_actor_options: {num_cpus, num_gpus}`): given here rather than as a `deployments:`
        override, they are validated with the engine settings before anything is deployed.
        """
        flat = dict(args)
        for section, keys in _NESTED_ARGS.items():
            nested = flat.pop(section, None) or {}
            unknown = sorted(set(nested) - set(keys))
            if unknown:
                raise ValueError(f"unsupported {section} keys {unknown}; supported: {list(keys)}")
            flat.update(nested)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"unknown application args {unknown}; known: {sorted(known)}")
        return cls(**flat)

    def deployment_options(self) -> dict:
        """Options for `Deployment.options(...)`."""
        return {
            "max_ongoing_requests": self.max_ongoing_requests,
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            },
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }

    def backend_spec(self) -> BackendSpec:
        return BackendSpec(backend=self.backend, model=self.model, guard=self.guard,
                           max_num_seqs=self.max_num_seqs, dtype=self.dtype, device=self.device,
                           enforce_eager=self.enforce_eager, kv_cache_gib=self.kv_cache_gib,
                           wedge_timeout_s=self.wedge_timeout_s)

    def as_dict(self) -> dict:
        return asdict(self)
