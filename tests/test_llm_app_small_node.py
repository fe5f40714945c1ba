"""The shipped CPU config of the Ray Serve LLM app (deployments/config.vllm.yaml), under `serve run`
on a Ray node of 2 CPUs: it becomes ready, says so on /health only then, lists its model only
then, and serves a completion that the openai package's types accept. Only the HTTP port is
changed (a free one), so that the test runs beside anything on :8000."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from scripts.ray_local import RAY_LOCAL_ENV
from tests.conftest import REPO_ROOT
from tests.helpers import free_port

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.default_model]
NODE_CPUS = 2
READY_TIMEOUT_S = 600
POLL_S = 3


def cli(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def env() -> dict:
    return {**os.environ, **RAY_LOCAL_ENV, "VLLM_HOST_IP": "127.0.0.1", "PYTHONPATH": str(REPO_ROOT),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def stop(process: subprocess.Popen, sig: int, timeout_s: float) -> None:
    """Signal one process we started; its group only if it outlives the timeout."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def small_node(tmp_path_factory):
    """`serve run` of the shipped config against a head started with 2 CPUs (its own temp
    folder, stopped by signalling it: `ray stop` would stop every Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: socket paths are capped
    log_dir = tmp_path_factory.mktemp("small-node")
    gcs = f"127.0.0.1:{free_port()}"
    port = free_port()
    config = yaml.safe_load((REPO_ROOT / "deployments/config.vllm.yaml").read_text())
    config["http_options"]["port"] = port
    config_path = log_dir / "config.vllm.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head_log, serve_log = open(log_dir / "head.log", "w"), open(log_dir / "serve.log", "w")
    head = subprocess.Popen(
        [cli("ray"), "start", "--head", "--block", "--port", gcs.rsplit(":", 1)[1], "--num-cpus", str(NODE_CPUS),
         "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--include-dashboard", "false",
         "--ray-client-server-port", str(free_port()), "--temp-dir", temp_dir],
        cwd=REPO_ROOT, env=env(), start_new_session=True, stdout=head_log, stderr=subprocess.STDOUT)
    served = None
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([cli("ray"), "status", "--address", gcs], env=env(), capture_output=True).returncode:
            assert head.poll() is None and time.monotonic() < deadline, (log_dir / "head.log").read_text()[-2000:]
            time.sleep(1)
        served = subprocess.Popen([cli("serve"), "run", "--address", gcs, str(config_path)], cwd=REPO_ROOT,
                                  env=env(), start_new_session=True, stdout=serve_log, stderr=subprocess.STDOUT)
        yield f"http://127.0.0.1:{port}", served, log_dir / "serve.log"
    finally:
        if served is not None:
            stop(served, signal.SIGINT, 60)  # serve run deletes its application on Ctrl-C
        stop(head, signal.SIGTERM, 60)
        head_log.close()
        serve_log.close()
        import shutil
        shutil.rmtree(temp_dir, ignore_errors=True)


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=30)
    except httpx.HTTPError:  # the proxy is not up yet
        return None


def test_the_shipped_cpu_config_serves_on_a_2_cpu_node(small_node):
    from openai.types import Completion

    url, served, log_path = small_node
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        # Where Ray cannot place a replica, this is where it ends (Serve only warns, every 30 s).
        assert served.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        models = get(f"{url}/v1/models")
        health = get(f"{url}/health")
        is_listed = models is not None and models.status_code == 200 and models.json()["data"]
        if health is not None and health.status_code == 200:
            break
        # Not serving yet: no model is advertised, and /health says 503 once it answers at all.
        assert not is_listed, models.json()
        assert health is None or health.status_code in (404, 503), (health.status_code, health.text)
        time.sleep(POLL_S)
    (card,) = get(f"{url}/v1/models").json()["data"]
    body = {"model": card["id"], "prompt": "def add(a, b):\n", "max_tokens": 16, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    (choice,) = Completion.model_validate(response.json()).choices
    assert choice.text and choice.finish_reason in ("stop", "length")
