"""Our Serve app (deployments/app.py) on the vLLM backend: the same API as on our engine, the app
never branching on the backend. Tiny model, a guard sure that every token is excess."""
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from deployments.config import ServeConfig
from guard.policy import StopPolicy
from models.tiny import TINY_MODEL_NAME
from tests.helpers import constant_guard
from tests.test_llm_app import SURE_STOP_LOGIT

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
APP_NAME = "codefast-vllm-backend-test"


@pytest.fixture(scope="module")
def url(serve_port, tmp_path_factory):
    from ray import serve

    from deployments.serve_cli import start_server

    guard_dir = tmp_path_factory.mktemp("sure-guard")
    constant_guard(SURE_STOP_LOGIT, StopPolicy(min_code_lines=0)).save(guard_dir)
    config = ServeConfig.from_args(dict(backend="vllm", model=TINY_MODEL_NAME, guard=str(guard_dir), max_num_seqs=4,
                                        dtype="float32", kv_cache_gib=1, num_cpus=1))
    with ThreadPoolExecutor(1) as pool:
        url = pool.submit(start_server, config, "127.0.0.1", serve_port, APP_NAME).result(600)
    yield url
    serve.delete(APP_NAME)


def test_app_on_vllm_stops_on_the_guard_and_reports_it(url):
    models = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]
    assert models["backend"] == "vllm" and models["has_guard"]
    body = {"prompt": "def f(x):\n", "max_tokens": 16, "temperature": 0}
    on = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
    assert (on["choices"][0]["finish_reason"], on["choices"][0]["stop_reason"]) == ("stop", "guard")
    assert on["choices"][0]["text"].strip() == ""
    off = httpx.post(f"{url}/v1/completions", json={**body, "guard": "off"}, timeout=120).json()
    assert off["choices"][0]["finish_reason"] == "length" and off["usage"]["completion_tokens"] == 16
    # A per-request threshold above the guard's certainty (0.99) lets it run; one below stops it.
    loose, strict = (httpx.post(f"{url}/v1/completions", json={**body, "guard": threshold}, timeout=120).json()
                     for threshold in (0.995, 0.9))
    assert loose["choices"][0]["finish_reason"] == "length" and loose["choices"][0]["text"] == off["choices"][0]["text"]
    assert (strict["choices"][0]["finish_reason"], strict["choices"][0]["stop_reason"]) == ("stop", "guard")
    deltas = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        deltas = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert deltas[-1] == "data: [DONE]" and '"finish_reason":"stop","stop_reason":"guard"' in "".join(deltas).replace(" ", "")
    assert httpx.get(f"{url}/health", timeout=60).status_code == 200
    assert httpx.get(f"{url}/v1/stats", timeout=60).json()["num_guard_stops"] >= 2
