"""GenGuard on Ray Serve LLM (deployments/llm_app.py): vLLM's OpenAI server with the guard inside,
over HTTP. The tiny model (in vLLM's CPU-compatible variant) with a guard sure that everything is
excess (p_stop 0.99 on every token, no minimum code): every guarded completion stops on its first
code token, before emitting it, so its text is empty and its finish reason is `guard`; a request
with the guard off, or above the guard's certainty, runs to its length."""
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from deployments.llm_app import LLMAppConfig, LocalModelCallback, build_app, build_llm_config
from engine.tiny import TINY_MODEL_NAME
from guard.policy import StopPolicy
from tests.helpers import constant_guard
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
APP_NAME = "codefast-llm-test"
DEPLOY_TIMEOUT_S = 600
HTTP_TIMEOUT_S = 120
SURE_STOP_LOGIT = 2.3  # softmax([2.3, -2.3])[0] = 0.99


@pytest.fixture(scope="module")
def sure_guard(tmp_path_factory):
    guard_dir = tmp_path_factory.mktemp("sure-guard")
    constant_guard(SURE_STOP_LOGIT, StopPolicy(min_code_lines=0)).save(guard_dir)
    return str(guard_dir)


@pytest.fixture(scope="module")
def url(serve_url, sure_guard):
    from ray import serve

    config = LLMAppConfig(model=TINY_MODEL_NAME, guard=sure_guard, max_num_seqs=4, kv_cache_gib=1,
                          max_model_len=512, dtype="float32")
    with ThreadPoolExecutor(1) as pool:  # serve.run has no timeout of its own
        pool.submit(serve.run, build_app(config), name=APP_NAME, route_prefix="/").result(DEPLOY_TIMEOUT_S)
    yield serve_url
    serve.delete(APP_NAME)


def post(url, path, body):
    return httpx.post(f"{url}{path}", json=body, timeout=HTTP_TIMEOUT_S)


def model_id(url) -> str:
    return httpx.get(f"{url}/v1/models", timeout=HTTP_TIMEOUT_S).json()["data"][0]["id"]


def test_completion_ends_with_finish_reason_guard_and_keeps_no_excess(url):
    body = {"model": model_id(url), "prompt": "def f(x):\n", "max_tokens": 32, "temperature": 0}
    guarded = post(url, "/v1/completions", body).json()
    (choice,) = guarded["choices"]
    assert choice["finish_reason"] == "guard" and choice["text"].strip() == ""
    assert "token_ids" not in choice or choice["token_ids"] is None  # not asked for: not sent
    assert guarded["usage"]["guard_stops"] == 1
    off = post(url, "/v1/completions", {**body, "vllm_xargs": {"guard": "off"}}).json()
    assert off["choices"][0]["finish_reason"] == "length" and off["usage"]["completion_tokens"] == 32
    # A per-request threshold above the guard's certainty lets it run.
    loose = post(url, "/v1/completions", {**body, "vllm_xargs": {"guard": 0.995}}).json()
    assert loose["choices"][0]["finish_reason"] == "length"
    # vLLM's own features come through: n, logprobs, token ids on request.
    both = post(url, "/v1/completions", {**body, "n": 2, "logprobs": 2, "return_token_ids": True,
                                         "vllm_xargs": {"guard": "off"}, "temperature": 1.0, "seed": 3}).json()
    assert len(both["choices"]) == 2
    assert all(c["token_ids"] and c["logprobs"]["token_logprobs"] for c in both["choices"])


def test_stream_holds_back_what_the_guard_drops(url):
    body = {"model": model_id(url), "prompt": "int main() {\n", "max_tokens": 32, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    texts, finish, usage = [], None, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=HTTP_TIMEOUT_S) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    texts.append(choice["text"])
                    finish = choice.get("finish_reason") or finish
    assert finish == "guard" and "".join(texts).strip() == ""
    assert usage["guard_stops"] == 1


def test_chat_defaults_to_no_guard_and_bad_settings_get_a_400(url):
    chat = post(url, "/v1/chat/completions", {"model": model_id(url), "max_tokens": 8, "temperature": 0,
                                              "messages": [{"role": "user", "content": "add two numbers"}]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"] != "guard"
    bad = post(url, "/v1/completions", {"model": model_id(url), "prompt": "x", "max_tokens": 4,
                                        "vllm_xargs": {"guard": "maybe"}})
    assert bad.status_code == 400 and "guard" in bad.text
    # vLLM's server turns a JSON false into 0 before the guard sees it: the 400 says what to send.
    boolean = post(url, "/v1/completions", {"model": model_id(url), "prompt": "x", "max_tokens": 4,
                                            "vllm_xargs": {"guard": False}})
    assert boolean.status_code == 400 and "send the string 'on' or 'off'" in boolean.text, boolean.text


def test_shipped_llm_configs_are_valid():
    from ray.serve.schema import ServeDeploySchema

    for path in ("deployments/config.vllm.yaml", "deployments/config.vllm.gpu.yaml"):
        raw = yaml.safe_load((REPO_ROOT / path).read_text())
        ServeDeploySchema.model_validate(raw)
        (application,) = raw["applications"]
        assert application["import_path"] == "deployments.llm_app:build_app"
        assert raw["http_options"]["host"] == "127.0.0.1"
        LLMAppConfig.from_args(application["args"])
    cpu = LLMAppConfig.from_args(yaml.safe_load((REPO_ROOT / "deployments/config.vllm.yaml").read_text())
                                 ["applications"][0]["args"])
    llm_config = build_llm_config(cpu)
    assert llm_config.engine_kwargs["logits_processors"] == ["guard.vllm_processor:GenGuardLogitsProcessor"]
    with pytest.raises(ValueError, match="unknown application args"):
        LLMAppConfig.from_args({"max_num_seq": 4})
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        LLMAppConfig(max_num_seqs=8, max_ongoing_requests=4)


def test_ray_serve_llm_skips_its_model_download_task_only_for_a_model_folder(tmp_path):
    import asyncio

    from ray.serve.llm import LLMConfig

    for source, is_skipped in ((str(tmp_path), True), ("Qwen/Qwen2.5-Coder-0.5B-Instruct", False),
                               (str(tmp_path / "missing"), False)):
        llm_config = LLMConfig(model_loading_config={"model_id": "m", "model_source": source},
                               accelerator_config={"kind": "cpu"})
        callback = LocalModelCallback(llm_config=llm_config)
        asyncio.run(callback.on_before_node_init())
        assert callback.ctx.run_init_node is not is_skipped, source
    cpu = LLMAppConfig(model=TINY_MODEL_NAME, guard=None, dtype="float32")
    assert build_llm_config(cpu).callback_config.callback_class is LocalModelCallback


def test_the_server_reads_guard_off_as_the_processor_does():
    from deployments.llm_app import is_guard_off
    from guard.vllm_contract import parse_guard_arg

    for value in ("off", False):
        assert parse_guard_arg(value) is False and is_guard_off(value)
    for value in ("on", True, None, 0.7, "0.7", "observe"):
        assert parse_guard_arg(value) is not False and not is_guard_off(value)
    for value in ("of", 0, 1, 1.5):  # rejected by the processor (vLLM answers 400): not "off" here
        with pytest.raises(ValueError, match="send the string 'on' or 'off'" if value in (0, 1) else "got"):
            parse_guard_arg(value)
        assert not is_guard_off(value)
