"""GenGuard on Ray Serve LLM (deployments/llm_app.py): vLLM's OpenAI server with the guard inside,
over HTTP. The tiny model (in vLLM's CPU-compatible variant) with a guard sure that everything is
excess (p_stop 0.99 on every token, no minimum code): every guarded completion stops on its first
code token, before emitting it, so its text is empty, its finish_reason `stop` and its stop_reason
`guard`; a request with the guard off, or above the guard's certainty, runs to its length."""
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from deployments.finish_reasons import guard_stop_fields
from deployments.llm_app import LLMAppConfig, LocalModelCallback, build_app, build_llm_config
from guard.policy import StopPolicy
from models.tiny import TINY_MODEL_NAME
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

    config = LLMAppConfig.from_args(dict(model=TINY_MODEL_NAME, guard=sure_guard, max_num_seqs=4, kv_cache_gib=1,
                                         max_model_len=512, dtype="float32"))
    with ThreadPoolExecutor(1) as pool:  # serve.run has no timeout of its own
        pool.submit(serve.run, build_app(config), name=APP_NAME, route_prefix="/").result(DEPLOY_TIMEOUT_S)
    yield serve_url
    serve.delete(APP_NAME)


def post(url, path, body):
    return httpx.post(f"{url}{path}", json=body, timeout=HTTP_TIMEOUT_S)


def model_id(url) -> str:
    return httpx.get(f"{url}/v1/models", timeout=HTTP_TIMEOUT_S).json()["data"][0]["id"]


def is_guard_stop(choice: dict) -> bool:
    return choice["finish_reason"] == "stop" and choice["stop_reason"] == "guard"


def test_completion_ends_on_a_guard_stop_and_keeps_no_excess(url):
    body = {"model": model_id(url), "prompt": "def f(x):\n", "max_tokens": 32, "temperature": 0}
    guarded = post(url, "/v1/completions", body).json()
    (choice,) = guarded["choices"]
    assert is_guard_stop(choice) and choice["text"].strip() == ""
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
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": 1}
    texts, tokens, finish, usage = [], [], None, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=HTTP_TIMEOUT_S) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    texts.append(choice["text"])
                    tokens += choice["logprobs"]["tokens"]
                    finish = (choice["finish_reason"], choice.get("stop_reason")) if choice.get("finish_reason") else finish
    assert finish == ("stop", "guard") and "".join(texts).strip() == ""
    assert tokens == []  # nothing kept: no logprob of a dropped token or of the marker went out
    assert usage["guard_stops"] == 1


def test_chat_defaults_to_no_guard_and_bad_settings_get_a_400(url):
    chat = post(url, "/v1/chat/completions", {"model": model_id(url), "max_tokens": 8, "temperature": 0,
                                              "messages": [{"role": "user", "content": "add two numbers"}]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"] == "length"
    bad = post(url, "/v1/completions", {"model": model_id(url), "prompt": "x", "max_tokens": 4,
                                        "vllm_xargs": {"guard": "maybe"}})
    assert bad.status_code == 400 and "guard" in bad.text
    # vLLM's server turns a JSON false into 0 before the guard sees it: the 400 says what to send.
    boolean = post(url, "/v1/completions", {"model": model_id(url), "prompt": "x", "max_tokens": 4,
                                            "vllm_xargs": {"guard": False}})
    assert boolean.status_code == 400 and "send the string 'on' or 'off'" in boolean.text, boolean.text


def test_echo_logprobs_and_structured_outputs_with_the_guard(url):
    body = {"model": model_id(url), "prompt": "def f(x):\n", "max_tokens": 8, "temperature": 0}
    # The guard stops before the first token: the echo is the prompt alone, no logprob is left
    # of the marker that ended it.
    echoed = post(url, "/v1/completions", {**body, "echo": True, "logprobs": 1}).json()
    (choice,) = echoed["choices"]
    assert is_guard_stop(choice) and choice["text"] == body["prompt"]
    assert len(choice["logprobs"]["tokens"]) == echoed["usage"]["prompt_tokens"]  # the prompt's only
    plain = post(url, "/v1/completions", {**body, "logprobs": 1}).json()["choices"][0]
    assert is_guard_stop(plain) and plain["logprobs"]["tokens"] == []
    # ignore_eos takes the export's EOS ids (the guard's markers among them) out of the stops:
    # the server names the markers as stop ids, so the guard still ends the request.
    assert is_guard_stop(post(url, "/v1/completions", {**body, "ignore_eos": True}).json()["choices"][0])
    # vLLM masks the guard's columns for a structured request (its grammar decides where it
    # ends): the guard stays off unless asked, and asking for both is a 400.
    structured = {**body, "structured_outputs": {"choice": ["yes", "no"]}}
    answer = post(url, "/v1/completions", structured)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] in ("yes", "no")
    both = post(url, "/v1/completions", {**structured, "vllm_xargs": {"guard": "on"}})
    assert both.status_code == 400 and "vLLM masks the guard's columns" in both.text, both.text


def test_a_guard_stop_parses_in_the_openai_clients_typed_models(url):
    """finish_reason "guard" is no OpenAI value: a strict client (pydantic validation of the
    openai package's own types) must accept the guard-stopped completion, streamed and not."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    body = {"model": model_id(url), "prompt": "def f(x):\n", "max_tokens": 8, "temperature": 0}
    completion = Completion.model_validate(post(url, "/v1/completions", body).json())
    (choice,) = completion.choices
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == "guard"
    assert completion.usage.model_extra["guard_stops"] == 1
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=HTTP_TIMEOUT_S) as response:
        chunks = [Completion.model_validate_json(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    last = [c for chunk in chunks for c in chunk.choices][-1]
    assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == "guard"
    chat = post(url, "/v1/chat/completions", {"model": model_id(url), "max_tokens": 8, "temperature": 0,
                                              "messages": [{"role": "user", "content": "def f(x):"}],
                                              "vllm_xargs": {"guard": "on"}})
    (chat_choice,) = ChatCompletion.model_validate(chat.json()).choices
    assert chat_choice.finish_reason == "stop" and chat_choice.model_extra["stop_reason"] == "guard"


def test_health_metrics_and_models_as_vllms_server_has_them(url):
    """/health and /metrics answer on the app's port; /metrics carries vLLM's engine metrics and
    the guard's counters, which a guard stop raises (vLLM counts it as a "stop")."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    assert httpx.get(f"{url}/health", timeout=HTTP_TIMEOUT_S).json() == {"status": "ok"}
    models = httpx.get(f"{url}/v1/models", timeout=HTTP_TIMEOUT_S).json()["data"]
    assert len(models) == 1 and httpx.get(f"{url}/v1/models/{models[0]['id']}", timeout=HTTP_TIMEOUT_S).status_code == 200
    body = {"model": model_id(url), "prompt": "def f(x):\n", "max_tokens": 8, "temperature": 0}
    assert is_guard_stop(post(url, "/v1/completions", body).json()["choices"][0])

    def totals() -> dict[str, float]:
        response = httpx.get(f"{url}/metrics", timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        sums: dict[str, float] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                key = sample.name + "".join(f"|{v}" for k, v in sorted(sample.labels.items()) if k == "finished_reason")
                sums[key] = sums.get(key, 0) + sample.value
        return sums
    deadline = time.monotonic() + 60  # Ray's agent exports what its processes recorded every few seconds
    while (seen := totals()).get("ray_codefast_guard_stops_total", 0) < 1 and time.monotonic() < deadline:
        time.sleep(2)
    assert seen.get("ray_codefast_guard_stops_total", 0) >= 1, sorted(k for k in seen if "codefast" in k)
    assert seen.get("ray_vllm_request_success_total|stop", 0) >= 1, sorted(k for k in seen if "vllm" in k)[:40]


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
        LLMAppConfig.from_args(dict(max_num_seqs=8, max_ongoing_requests=4))
    with pytest.raises(ValueError, match="guard_finish_reason"):
        LLMAppConfig.from_args(dict(guard_finish_reason="length"))


def test_the_ingress_takes_no_cpu_and_lists_a_model_only_once_it_serves():
    """The ingress's CPU was the one a 2-CPU node lacked (the replica takes both); /health and
    /v1/models read Serve's status of the model's deployment."""
    from ray.serve._private.common import DeploymentStatus, ReplicaState
    from ray.serve.schema import DeploymentStatusOverview

    from deployments.llm_app import why_not_serving

    app = build_app(LLMAppConfig.from_args(dict(model=TINY_MODEL_NAME, guard=None, dtype="float32")))
    assert app._bound_deployment.ray_actor_options["num_cpus"] == 0

    def overview(status, **replicas):
        return DeploymentStatusOverview(status=status, status_trigger=None, message="",
                                        replica_states={ReplicaState(k): v for k, v in replicas.items()})
    assert why_not_serving(overview(DeploymentStatus.HEALTHY, RUNNING=1)) is None
    assert why_not_serving(overview(DeploymentStatus.UPSCALING, RUNNING=1, STARTING=1)) is None
    assert why_not_serving(overview(DeploymentStatus.UPDATING, STARTING=1)).startswith("UPDATING")
    assert why_not_serving(overview(DeploymentStatus.UNHEALTHY, RUNNING=1)).startswith("UNHEALTHY")
    assert why_not_serving(overview(DeploymentStatus.UPSCALING, STARTING=1)) == "no replica running"
    assert why_not_serving(None) == "not deployed"


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
    cpu = LLMAppConfig.from_args(dict(model=TINY_MODEL_NAME, guard=None, dtype="float32"))
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


# ---- the server's rewrite of vLLM's responses, on made-up responses over a real export ----------
@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """GenGuardLLMServer's response rewriting over the tiny model's export, without an engine (or
    an LLMServer, whose start it would be)."""
    from types import SimpleNamespace

    from backends.vllm_output import VllmOutputs
    from deployments.llm_app import GenGuardLLMServer
    from tests.test_vllm_processor import POLICY, tiny_export

    view = VllmOutputs.load(tiny_export(tmp_path_factory, POLICY))
    server = SimpleNamespace(_outputs=view, _guard_stop=guard_stop_fields())
    for name in ("_fix_responses", "_fix_stream"):
        setattr(server, name, getattr(GenGuardLLMServer, name).__get__(server))
    return server


PROMPT = "def f(x):\n"
KEPT, DROPPED = "    return x\n", "print("  # a line-start stop drops the open line


def encode(view, text: str) -> list[int]:
    return view.tokenizer(text, add_special_tokens=False)["input_ids"]


def collect(agen) -> list:
    import asyncio

    async def run():
        return [item async for item in agen]
    return asyncio.run(run())


async def replay(items):
    for item in items:
        yield item


def completion_logprobs(tokens: list[str], offset: int = 0) -> dict:
    offsets = [offset + i for i in range(len(tokens))]  # one character per token in the tiny model
    return {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens),
            "top_logprobs": [{t: -0.5} for t in tokens], "text_offset": offsets}


def test_a_guard_stop_leaves_the_dropped_tokens_logprobs_out_and_echo_keeps_the_prompt(guarded_server):
    from vllm.entrypoints.openai.completion.protocol import (CompletionLogProbs, CompletionRequest,
                                                              CompletionResponse, CompletionResponseChoice)
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    from deployments.llm_app import _EchoedPrompts
    from guard.export import MarkerKind

    view = guarded_server._outputs
    marker = view.export.marker_id(MarkerKind.DROP_OPEN)
    prompt_ids, output_ids = encode(view, PROMPT), encode(view, KEPT + DROPPED)
    tokens = list(PROMPT) + list(KEPT + DROPPED) + [""]
    # As vLLM sends it when it was asked for token ids: no prompt in the text, the prompt's
    # logprobs (echo) first, the marker last.
    choice = CompletionResponseChoice(index=0, text=KEPT + DROPPED, finish_reason="stop", stop_reason=marker,
                                      logprobs=CompletionLogProbs(**completion_logprobs(tokens)),
                                      token_ids=output_ids + [marker], prompt_token_ids=prompt_ids)
    response = CompletionResponse(model="m", choices=[choice], usage=UsageInfo(prompt_tokens=1))
    request = CompletionRequest(model="m", prompt=PROMPT, echo=True, logprobs=1)
    (fixed,) = collect(guarded_server._fix_responses(replay([response]), wants_ids=False,
                                                     echo=_EchoedPrompts(request)))
    (choice,) = fixed.choices
    assert choice.text == PROMPT + KEPT and choice.token_ids is None
    assert (choice.finish_reason, choice.stop_reason) == ("stop", "guard")
    assert choice.logprobs.tokens == list(PROMPT + KEPT) and len(choice.logprobs.top_logprobs) == len(PROMPT + KEPT)
    assert fixed.usage.guard_stops == 1 and fixed.usage.guard_dropped_tokens == len(DROPPED)


def test_the_old_finish_reason_guard_is_one_config_field_away(guarded_server):
    from types import SimpleNamespace

    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionResponseChoice
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    from deployments.llm_app import GenGuardLLMServer
    from guard.export import MarkerKind

    view = guarded_server._outputs
    marker = view.export.marker_id(MarkerKind.DROP_OPEN)
    legacy = SimpleNamespace(_outputs=view, _guard_stop=guard_stop_fields(legacy=True))
    choice = CompletionResponseChoice(index=0, text=KEPT + DROPPED, finish_reason="stop", stop_reason=marker,
                                      token_ids=encode(view, KEPT + DROPPED) + [marker])
    (fixed,) = collect(GenGuardLLMServer._fix_responses.__get__(legacy)(
        replay([CompletionResponse(model="m", choices=[choice], usage=UsageInfo(prompt_tokens=1))]),
        wants_ids=False, echo=None))
    assert (fixed.choices[0].finish_reason, fixed.choices[0].stop_reason) == ("guard", None)
    config = build_llm_config(LLMAppConfig.from_args(dict(model=TINY_MODEL_NAME, guard=None, dtype="float32",
                                                          guard_finish_reason="guard")))
    assert config.experimental_configs["genguard"]["finish_reason"] == "guard"


def sse(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def test_a_stream_holds_back_logprobs_with_their_text_and_echo_comes_first(guarded_server):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from deployments.llm_app import _EchoedPrompts
    from guard.export import MarkerKind

    view = guarded_server._outputs
    marker = view.export.marker_id(MarkerKind.DROP_OPEN)
    pieces = ["    ret", "urn x\npr", "int("]
    chunks, offset = [], len(PROMPT)
    for i, piece in enumerate(pieces):
        tokens = list(piece) if i else list(PROMPT) + list(piece)  # echo: the prompt's logprobs first
        ids = encode(view, piece) + ([marker] if i == len(pieces) - 1 else [])
        chunk = {"choices": [{"index": 0, "text": piece, "token_ids": ids, "finish_reason": None,
                              "logprobs": completion_logprobs(tokens + [""] * (len(ids) - len(piece)),
                                                              0 if i == 0 else offset)}]}
        if i == 0:
            chunk["choices"][0]["prompt_token_ids"] = encode(view, PROMPT)
        if i == len(pieces) - 1:
            chunk["choices"][0].update(finish_reason="stop", stop_reason=marker)
        offset += len(piece)
        chunks.append([sse(chunk)])
    request = CompletionRequest(model="m", prompt=PROMPT, echo=True, logprobs=1, stream=True)
    sent = [json.loads(item[len("data: "):]) for batch in
            collect(guarded_server._fix_stream(replay(chunks), is_chat=False, wants_ids=False,
                                               echo=_EchoedPrompts(request)))
            for item in batch]
    choices = [c for chunk in sent for c in chunk["choices"]]
    assert choices[0]["text"] == PROMPT  # the echo at once, the open line held back
    assert "".join(c["text"] for c in choices) == PROMPT + KEPT
    assert (choices[-1]["finish_reason"], choices[-1]["stop_reason"]) == ("stop", "guard")
    assert [t for c in choices for t in c["logprobs"]["tokens"]] == list(PROMPT + KEPT)
    for c in choices:  # each chunk's logprobs are its own text's
        assert "".join(c["logprobs"]["tokens"]) == c["text"] and "token_ids" not in c


def test_a_chat_stream_passes_the_echo_and_drops_the_excess_logprobs(guarded_server):
    from guard.export import MarkerKind

    view = guarded_server._outputs
    marker = view.export.marker_id(MarkerKind.DROP_OPEN)
    entry = lambda t: {"token": t, "logprob": -0.5, "bytes": None, "top_logprobs": []}  # noqa: E731
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"content": "Sure:"}}]}]  # vLLM's echo, no tokens
    for piece, finish in ((KEPT, None), (DROPPED, "stop")):
        ids = encode(view, piece) + ([marker] if finish else [])
        content = [entry(t) for t in piece] + ([entry("")] if finish else [])
        choice = {"index": 0, "delta": {"content": piece}, "token_ids": ids, "logprobs": {"content": content},
                  "finish_reason": finish}
        if finish:
            choice["stop_reason"] = marker
        chunks.append({"choices": [choice]})
    sent = [json.loads(item[len("data: "):]) for batch in
            collect(guarded_server._fix_stream(replay([[sse(c)] for c in chunks]), is_chat=True,
                                               wants_ids=False, echo=None))
            for item in batch]
    choices = [c for chunk in sent for c in chunk["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in choices) == "Sure:" + KEPT
    assert [e["token"] for c in choices for e in (c.get("logprobs") or {}).get("content") or []] == list(KEPT)
    assert (choices[-1]["finish_reason"], choices[-1]["stop_reason"]) == ("stop", "guard")


def test_structured_outputs_default_to_no_guard_and_refuse_an_explicit_one(tmp_path_factory):
    from vllm import SamplingParams
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from deployments.llm_app import default_guard
    from guard.export import GuardExport
    from guard.vllm_processor import GenGuardLogitsProcessor
    from tests.test_vllm_processor import POLICY, make, tiny_export

    plain = CompletionRequest(model="m", prompt="x")
    assert default_guard("completions", plain) == "on"
    for masking in ({"structured_outputs": {"choice": ["yes", "no"]}},
                    {"response_format": {"type": "json_object"}}, {"allowed_token_ids": [1, 2]}):
        assert default_guard("completions", CompletionRequest(model="m", prompt="x", **masking)) == "off"
    assert default_guard("chat", ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])) == "off"
    # The processor: vLLM masks the guard's columns with the vocabulary for these requests, so an
    # explicit guard (or observer) is refused (vLLM's server answers 400), "off" passes, and no
    # setting leaves the request unguarded.
    grammar = StructuredOutputsParams(choice=["yes", "no"])
    for masking, name in (({"structured_outputs": grammar}, "structured outputs"),
                          ({"allowed_token_ids": [1, 2]}, "allowed_token_ids")):
        for setting in ("on", 0.7, "observe"):
            with pytest.raises(ValueError, match=f"with {name}: vLLM masks the guard's columns"):
                GenGuardLogitsProcessor.validate_params(SamplingParams(extra_args={"guard": setting}, **masking))
        for setting in ({}, {"guard": "off"}):
            GenGuardLogitsProcessor.validate_params(SamplingParams(extra_args=setting, **masking))
    export_dir = tiny_export(tmp_path_factory, POLICY)
    export = GuardExport.load(export_dir)
    processor = make(export_dir, num_slots=3)
    stop_ids = list(export.marker_ids)
    processor.update_state(BatchUpdate(3, removed=[], moved=[], added=[
        (0, SamplingParams(structured_outputs=grammar, stop_token_ids=stop_ids), [1], []),
        (1, SamplingParams(allowed_token_ids=[1, 2], stop_token_ids=stop_ids), [1], []),
        (2, SamplingParams(stop_token_ids=stop_ids), [1], [])]))
    assert processor.is_guarded.tolist()[:3] == [False, False, True]
