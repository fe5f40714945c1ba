"""Settings that keep Ray on this machine: local provider, loopback, no usage stats."""
from __future__ import annotations

import os
from pathlib import Path

RAY_LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # On 2 busy cores a starting Serve proxy can miss its 5 s readiness check three times and be
    # killed; give it (and later health checks) room. Read by the Serve controller at start.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}


def write_bootstrap_config() -> Path:
    """`provider: {type: local}` stops Ray from probing cloud metadata endpoints at start-up."""
    path = Path.home() / "ray_bootstrap_config.yaml"
    if not path.exists():
        path.write_text("provider: {type: local}\n")
    return path


def apply_local_env() -> None:
    for key, value in RAY_LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    write_bootstrap_config()


if __name__ == "__main__":
    apply_local_env()
    print(write_bootstrap_config())
