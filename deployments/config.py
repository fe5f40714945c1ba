"""What a Serve application runs: its engine (a BackendSpec) and its Serve options. ServeConfig
is CodeFast's app (app.py), LLMAppConfig the Ray Serve LLM app's (llm_app.py); both read one flat
`args:` mapping, the engine's fields among them.

Validated once at the edge (construction), so a bad `serve run` config or CLI flag fails before
anything is deployed; here, without Ray Serve LLM's imports. The HTTP request bodies live in
protocol.py (Pydantic); this is not one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from backends.spec import BackendSpec, config_from_args
from deployments.finish_reasons import GUARD_STOP_REASON

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
    engine: BackendSpec = BackendSpec()  # what each replica runs; its fields are flat `args:` keys
    # Serve options. None = derived: 2x slots lets a finished slot be refilled from the engine's
    # own queue at the next step instead of waiting for a proxy round trip.
    max_ongoing_requests: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float | None = None  # None: max_num_seqs (a full batch per replica)
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.engine, BackendSpec):
            raise ValueError(f"engine must be a BackendSpec, got {type(self.engine).__name__}")
        max_num_seqs = self.engine.max_num_seqs
        if self.max_ongoing_requests is None:
            object.__setattr__(self, "max_ongoing_requests", 2 * max_num_seqs)
        check_capacity(self.max_ongoing_requests, max_num_seqs)
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas},"
                             f" {self.max_replicas}")
        if self.target_ongoing_requests is None:
            object.__setattr__(self, "target_ongoing_requests", float(max_num_seqs))
        if not 0 < self.target_ongoing_requests <= self.max_ongoing_requests:
            raise ValueError(f"target_ongoing_requests must be in (0, max_ongoing_requests ="
                             f" {self.max_ongoing_requests}], got {self.target_ongoing_requests}:"
                             " a larger target could never be reached and autoscaling would never act")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")

    @classmethod
    def from_args(cls, args: dict) -> "ServeConfig":
        """From a `serve run` config's `args:` mapping: the engine's fields (BackendSpec) and the
        Serve options, all flat; unknown keys are an error, not ignored.

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
        return config_from_args(cls, flat, BackendSpec())

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

    def as_dict(self) -> dict:
        return asdict(self)


# What the LLM app's engine runs unless `args:` say otherwise: vLLM, CPU, a bounded context.
LLM_APP_ENGINE = BackendSpec(backend="vllm", max_num_seqs=16, device="cpu", max_model_len=8192)
# Spec fields only our backends read (Ray Serve LLM runs this app's engine): set to anything but
# LLM_APP_ENGINE's value, they fail the build, saying why.
UNUSED_SPEC_FIELDS = {
    "backend": "Ray Serve LLM always runs vLLM; deployments/config.yaml serves either backend",
    "num_threads": "it sets torch's threads in our backends' process, which Ray Serve LLM does not run",
    "gpu_memory_utilization": "each replica owns its GPU, and vLLM takes its default share of it",
    "wedge_timeout_s": "it is our backends' watchdog; Ray Serve LLM checks the engine's health itself",
}


@dataclass(frozen=True)
class LLMAppConfig:
    """The `args:` of `serve run deployments/config.vllm.yaml` (validated before anything deploys):
    the engine's BackendSpec fields and the app's own below, flat."""

    engine: BackendSpec = LLM_APP_ENGINE  # device: "cpu" or "gpu" (= "cuda")
    model_id: str | None = None  # the name clients use; None: the model's own name
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: int | None = None  # None: max_num_seqs
    max_ongoing_requests: int | None = None  # None: 2x max_num_seqs
    num_cpus: float = 1.0  # CPU only: the engine's share; the replica's actor (vLLM's frontend) takes 1 more
    # "stop": finish_reason "stop" with stop_reason "guard" after a guard stop (OpenAI's values);
    # "guard": finish_reason "guard", for clients written against it.
    guard_finish_reason: str = "stop"

    def __post_init__(self) -> None:
        if not isinstance(self.engine, BackendSpec):
            raise ValueError(f"engine must be a BackendSpec, got {type(self.engine).__name__}")
        for name, why in UNUSED_SPEC_FIELDS.items():
            value, fixed = getattr(self.engine, name), getattr(LLM_APP_ENGINE, name)
            if value != fixed:
                raise ValueError(f"{name} stays {fixed!r} in the LLM app ({why}); got {value!r}")
        if self.engine.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {self.engine.device!r}")
        if self.guard_finish_reason not in ("stop", GUARD_STOP_REASON):
            raise ValueError(f"guard_finish_reason must be 'stop' or {GUARD_STOP_REASON!r},"
                             f" got {self.guard_finish_reason!r}")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.engine.max_num_seqs:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_num_seqs"
                             f" ({self.engine.max_num_seqs}): a replica would never fill its batch")

    @classmethod
    def from_args(cls, args: dict) -> "LLMAppConfig":
        return config_from_args(cls, args, LLM_APP_ENGINE)
