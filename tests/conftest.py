"""Shared fixtures. Ray starts once per test session, on 127.0.0.1, only if a test asks for it."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

from scripts.ray_local import RAY_LOCAL_ENV, apply_local_env  # noqa: E402

apply_local_env()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole run (4 logical CPUs: Serve + Data actors deadlock on 2)."""
    import ray

    if ray.is_initialized():  # a library call earlier in the run started a default Ray (the host's CPUs)
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": RAY_LOCAL_ENV}, log_to_driver=False,
             ignore_reinit_error=True)
    yield ray
    try:  # the Serve instance of `serve_url`, if a test started it
        from ray import serve
        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_session):
    """One Serve instance (controller and HTTP proxy on a free loopback port) for the run. Each
    test module deploys its app there and deletes it when done; stopping and restarting Serve for
    each module cost 10-15 s here."""
    from ray import serve

    from tests.helpers import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="session")
def serve_url(serve_port):
    return f"http://127.0.0.1:{serve_port}"
