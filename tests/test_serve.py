"""The Ray Serve deployment over HTTP: OpenAI client, batching, errors, disconnects, the guard,
and fault injection (an engine step that raises, then one that hangs).

One deployment for the whole module (each costs seconds on this machine): the tiny model with a
hand-set GenGuard whose stop probability (0.73) is below its own threshold (0.9), so the guard is
loaded but only stops a request that lowers the threshold (`guard: 0.5`). The fault-injection
test adds a second app on the same Serve instance (tests/serve_faults.py), since it kills replicas.
"""
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from deployments.app import build_app
from deployments.config import ServeConfig, check_capacity
from deployments.protocol import CompletionRequest, RequestError
from deployments.protocol import MAX_PROMPTS_PER_REQUEST, MAX_REQUEST_BODY_BYTES, MAX_STOP_STRINGS
from engine import SamplingParams
from engine.health import DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES
from engine.params import MAX_SEED
from guard.policy import StopPolicy
from guard.syntax import MAX_LANGUAGE_NAME_CHARS
from models.tiny import TINY_MODEL_NAME
from tests.helpers import constant_guard, tiny_engine
from tests.serve_faults import FLAKY, HANG, RAISE, build_fault_app

pytestmark = pytest.mark.ray

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "codefast-test"
HTTP_TIMEOUT_S = 60
DEPLOY_TIMEOUT_S = 300
PROMPT = "def f():"


# ---- config and request mapping (no Ray) ---------------------------------------------------------
def test_config_rejects_fewer_ongoing_requests_than_batch_slots():
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        check_capacity(4, 8)
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        build_app({"max_num_seqs": 8, "max_ongoing_requests": 4})
    with pytest.raises(ValueError, match="unknown application args"):
        build_app({"max_num_seq": 8})
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        ServeConfig.from_args(dict(max_num_seqs=4, max_ongoing_requests=8, target_ongoing_requests=16))
    with pytest.raises(ValueError, match="dtype"):
        ServeConfig.from_args(dict(dtype="int8"))
    assert ServeConfig.from_args(dict(guard="none")).engine.guard is None
    assert ServeConfig.from_args(dict(max_num_seqs=4)).max_ongoing_requests == 8


@pytest.mark.parametrize("path", ["deployments/config.yaml", "deployments/config.gpu.yaml"])
def test_shipped_serve_configs_are_valid(path):
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO_ROOT / path).read_text())
    ServeDeploySchema.model_validate(raw)
    (application,) = raw["applications"]
    assert application["import_path"] == "deployments.app:build_app"
    config = ServeConfig.from_args(application["args"])
    assert config.max_ongoing_requests >= config.engine.max_num_seqs
    assert (config.min_replicas, config.max_replicas) == (1, 2)
    assert raw["http_options"]["host"] == "127.0.0.1"
    build_app(application["args"])


def test_request_fields_map_to_sampling_params():
    params = CompletionRequest(prompt="x", stop="\n\n", guard="off", temperature=0).sampling_params(512)
    assert params == SamplingParams(max_new_tokens=256, temperature=0.0, stop=("\n\n",), use_guard=False)
    params = CompletionRequest(prompt=["x"], guard=0.3, max_tokens=512).sampling_params(512)
    assert params.use_guard and params.guard_threshold == 0.3 and params.max_new_tokens == 512
    assert CompletionRequest(prompt="x").sampling_params(100).max_new_tokens == 100
    with pytest.raises(RequestError, match="context length"):
        CompletionRequest(prompt="x", max_tokens=513).sampling_params(512)


GUARD_RULE = "must be 'on', 'off' or a stop threshold in (0, 1)"


@pytest.mark.parametrize("field, value, rule", [
    ("temperature", float("nan"), "must be a finite number in [0, 2], got nan"),
    ("temperature", float("inf"), "must be a finite number in [0, 2], got inf"),
    ("temperature", 2.5, "must be a finite number in [0, 2], got 2.5"),
    ("top_p", float("nan"), "must be a finite number in (0, 1], got nan"),
    ("top_p", 0, "must be a finite number in (0, 1], got 0"),
    ("guard", 2, f"{GUARD_RULE}, got 2"),
    ("guard", float("nan"), f"{GUARD_RULE}, got nan"),
    ("guard", "maybe", f"{GUARD_RULE}, got 'maybe'"),
])
def test_range_errors_state_the_rule_the_value_breaks(field, value, rule):
    """NaN fails every comparison and `guard` is a union: pydantic's own messages named a bound
    NaN does not break ("<= 2") or only the union's first branch ("'on' or 'off'")."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        CompletionRequest(prompt="x", **{field: value})
    (error,) = caught.value.errors()
    assert error["loc"] == (field,) and error["msg"] == rule


# ---- the deployed app ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(serve_port, serve_url, tmp_path_factory):
    from ray import serve

    from deployments.serve_cli import start_server

    # p_stop = softmax([0.5, -0.5])[0] = 0.73: below the policy threshold, above a request's 0.5.
    guard_dir = tmp_path_factory.mktemp("guard")
    policy = StopPolicy(kind="token", stop_threshold=0.9, num_consecutive=2, max_blank_lines=0)
    constant_guard(0.5, policy).save(guard_dir)
    config = ServeConfig.from_args(dict(model=TINY_MODEL_NAME, guard=str(guard_dir), max_num_seqs=4, dtype="float32",
                                        max_ongoing_requests=8, min_replicas=1, max_replicas=2,
                                        target_ongoing_requests=8, num_cpus=1))
    with ThreadPoolExecutor(1) as pool:  # serve.run has no timeout of its own
        url = pool.submit(start_server, config, "127.0.0.1", serve_port, APP_NAME).result(DEPLOY_TIMEOUT_S)
    assert url == serve_url
    yield url
    serve.delete(APP_NAME)


def stats(url: str) -> dict:
    response = httpx.get(f"{url}/v1/stats", timeout=HTTP_TIMEOUT_S)
    response.raise_for_status()
    return response.json()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=HTTP_TIMEOUT_S, max_retries=0)


def test_app_with_autoscaling_config_is_running(server):
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    assert serve.status().applications[APP_NAME].status == ApplicationStatus.RUNNING
    assert httpx.get(f"{server}/health", timeout=HTTP_TIMEOUT_S).json() == {"status": "ok"}
    (card,) = client(server).models.list().data
    assert card.id == TINY_MODEL_NAME and card.max_model_len == 512 and card.has_guard


def test_openai_client_completion_and_stream_match_the_engine(server):
    expected = tiny_engine().generate([PROMPT], SamplingParams(max_new_tokens=16))[0]
    api = client(server)
    completion = api.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=16,
                                        temperature=0, extra_body={"guard": "off"})
    (choice,) = completion.choices
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert completion.usage.prompt_tokens == len(PROMPT)  # one byte, one token
    assert completion.usage.completion_tokens == 16
    assert completion.usage.total_tokens == len(PROMPT) + 16
    assert completion.usage.guard_dropped_tokens == 0

    chunks = list(api.completions.create(model=TINY_MODEL_NAME, prompt=[PROMPT, "x = 1\n"],
                                         max_tokens=16, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text_of_first = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == 0)
    assert text_of_first == expected.text
    finishes = {c.choices[0].index: c.choices[0].finish_reason
                for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32


def test_concurrent_requests_share_decode_steps(server):
    before = stats(server)
    prompts = ["a", "bb", "ccc", "dddd"]

    def complete(prompt: str):
        return client(server).completions.create(model=TINY_MODEL_NAME, prompt=prompt, max_tokens=48,
                                                 temperature=0, extra_body={"guard": "off"})

    with ThreadPoolExecutor(len(prompts)) as pool:
        completions = list(pool.map(complete, prompts))
    after = stats(server)
    assert all(c.choices[0].finish_reason == "length" for c in completions)
    num_generated = after["num_generated_tokens"] - before["num_generated_tokens"]
    num_decode_steps = after["num_decode_steps"] - before["num_decode_steps"]
    assert num_generated == 4 * 48
    # One at a time, every token after the first (from prefill) costs a decode step of its own.
    assert num_decode_steps < num_generated - len(prompts)
    assert after["max_decode_batch_size"] > 1


def body_of(num_bytes: int) -> bytes:
    """A valid completion request of exactly num_bytes (its prompt is far past the context)."""
    head, tail = b'{"prompt": "', b'"}'
    return head + b"x" * (num_bytes - len(head) - len(tail)) + tail


BAD_REQUESTS = [
    ("malformed json", b'{"prompt": ', 400),
    ("body not an object", b'["def f():"]', 400),
    ("missing prompt", {"max_tokens": 4}, 400),
    ("empty prompt", {"prompt": ""}, 400),
    ("empty prompt list", {"prompt": []}, 400),
    ("token ids prompt", {"prompt": [1, 2, 3]}, 400),
    ("max_tokens wrong type", {"prompt": "x", "max_tokens": "8"}, 400),
    ("negative max_tokens", {"prompt": "x", "max_tokens": -1}, 400),
    ("zero max_tokens", {"prompt": "x", "max_tokens": 0}, 400),
    ("huge max_tokens", {"prompt": "x", "max_tokens": 10**9}, 400),
    ("prompt longer than context", {"prompt": "x" * 600}, 400),
    ("unknown field", {"prompt": "x", "max_tokenz": 4}, 400),
    ("n > 1", {"prompt": "x", "n": 2}, 400),
    ("bad guard word", {"prompt": "x", "guard": "maybe"}, 400),
    ("guard threshold out of range", {"prompt": "x", "guard": 1.5}, 400),
    ("language name too long", {"prompt": "x", "language": "x" * (MAX_LANGUAGE_NAME_CHARS + 1)}, 400),
    ("negative temperature", {"prompt": "x", "temperature": -1}, 400),
    ("empty stop string", {"prompt": "x", "stop": [""]}, 400),
    ("unknown model", {"prompt": "x", "model": "gpt-4"}, 404),
    # Values the engine could not use once queued: refused here, so no step ever fails on them.
    ("seed above int64", {"prompt": "x", "max_tokens": 3, "seed": MAX_SEED + 1}, 400),
    ("seed 2**64", b'{"prompt": "x", "max_tokens": 3, "seed": 18446744073709551616}', 400),
    ("prompt with a lone surrogate", b'{"prompt": "x = \\ud800", "max_tokens": 3}', 400),
    ("too many stop strings", {"prompt": "x", "stop": ["a"] * (MAX_STOP_STRINGS + 1)}, 400),
    ("too many prompts", {"prompt": ["x"] * (MAX_PROMPTS_PER_REQUEST + 1)}, 400),
    ("temperature NaN", b'{"prompt": "x", "temperature": NaN}', 400),
    ("top_p Infinity", b'{"prompt": "x", "top_p": Infinity}', 400),
    ("guard 2", {"prompt": "x", "guard": 2}, 400),
    ("guard threshold NaN", b'{"prompt": "x", "guard": NaN}', 400),
    ("body over the size limit", body_of(MAX_REQUEST_BODY_BYTES + 1), 413),
]
# The error must state the limit it enforces, not only that something is wrong.
STATED_LIMITS = {"seed above int64": str(MAX_SEED), "seed 2**64": str(MAX_SEED),
                 "prompt with a lone surrogate": "surrogate",
                 "too many stop strings": f"at most {MAX_STOP_STRINGS}",
                 "too many prompts": f"at most {MAX_PROMPTS_PER_REQUEST}",
                 "temperature NaN": "temperature: must be a finite number in [0, 2]",
                 "top_p Infinity": "top_p: must be a finite number in (0, 1]",
                 "guard 2": f"guard: {GUARD_RULE}", "guard threshold NaN": f"guard: {GUARD_RULE}",
                 "body over the size limit": f"the limit is {MAX_REQUEST_BODY_BYTES} bytes"}


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(server):
    with httpx.Client(base_url=server, timeout=HTTP_TIMEOUT_S) as http:
        for name, body, status in BAD_REQUESTS:
            if isinstance(body, bytes):
                response = http.post("/v1/completions", content=body,
                                     headers={"content-type": "application/json"})
            else:
                response = http.post("/v1/completions", json=body)
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert error["message"] and error["type"] and "code" in error, name
            assert STATED_LIMITS.get(name, "") in error["message"], (name, error["message"])
        assert http.get("/v1/completions").status_code == 405
        good = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4
    assert stats(server)["num_running"] == 0


def test_bodies_over_the_size_limit_get_413_before_parsing_and_the_server_keeps_serving(server):
    def chunked(body: bytes):  # a generator: httpx sends it without a Content-Length
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    json_header = {"content-type": "application/json"}
    with httpx.Client(base_url=server, timeout=HTTP_TIMEOUT_S) as http:
        at_limit = http.post("/v1/completions", content=body_of(MAX_REQUEST_BODY_BYTES), headers=json_header)
        assert at_limit.status_code == 400  # parsed: its prompt is longer than the context
        assert at_limit.json()["error"]["code"] == "context_length_exceeded"
        for name, content in [("declared", body_of(MAX_REQUEST_BODY_BYTES + 1)),
                              ("chunked", chunked(body_of(20 * MAX_REQUEST_BODY_BYTES))),
                              ("chunked, not even JSON", chunked(b"[" * (MAX_REQUEST_BODY_BYTES + 1)))]:
            response = http.post("/v1/completions", content=content, headers=json_header)
            assert response.status_code == 413, (name, response.text)
            error = response.json()["error"]
            assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error", name
            assert f"the limit is {MAX_REQUEST_BODY_BYTES} bytes" in error["message"], name
        good = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4


def test_client_disconnect_mid_stream_frees_the_slot(server):
    before = stats(server)
    max_tokens = 480  # ~3 s of decoding here; the tiny model emits no EOS for this prompt
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True, "guard": "off"}
    with httpx.Client(base_url=server, timeout=HTTP_TIMEOUT_S) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert '"text_completion"' in first
    deadline = time.monotonic() + 30
    while (now := stats(server))["num_running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now["num_running"] == 0 and now["num_waiting"] == 0
    assert now["num_cancelled_requests"] == before["num_cancelled_requests"] + 1
    assert now["num_generated_tokens"] - before["num_generated_tokens"] < max_tokens  # aborted early


def test_guard_stop_comes_through_http(server):
    api = client(server)
    before = stats(server)
    # Token policy, every token votes stop at threshold 0.5: the second token stops the request.
    stopped = api.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=32,
                                     temperature=0, extra_body={"guard": 0.5})
    # OpenAI's finish reason, the guard named in stop_reason: the openai package's types accept it.
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].stop_reason == "guard"
    openai.types.Completion.model_validate(stopped.model_dump())
    usage = stopped.usage
    assert usage.completion_tokens + usage.guard_dropped_tokens == 2
    assert stats(server)["num_guard_stops"] == before["num_guard_stops"] + 1
    # The guard's own threshold (0.9) is above its p_stop, and "off" skips it: both run to length.
    for guard in ("on", "off"):
        completion = api.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=32,
                                            temperature=0, extra_body={"guard": guard})
        assert completion.choices[0].finish_reason == "length", guard
    chunks = list(api.completions.create(model=TINY_MODEL_NAME, prompt=PROMPT, max_tokens=32,
                                         temperature=0, stream=True, extra_body={"guard": 0.5}))
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].stop_reason == "guard"
    openai.types.Completion.model_validate(chunks[-1].model_dump())


def test_bad_sampling_values_during_decoding_fail_nobody(server):
    """Sent while another request decodes, a seed past int64 is refused at the edge and a tiny
    temperature decodes greedily: before, either made the shared step raise, failing both."""
    body = {"prompt": PROMPT, "max_tokens": 240, "temperature": 0, "stream": True, "guard": "off"}
    with httpx.Client(base_url=server, timeout=HTTP_TIMEOUT_S) as http:
        with http.stream("POST", "/v1/completions", json=body) as decoding:
            lines = decoding.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # it is decoding now
            bad_seed = http.post("/v1/completions", json={"prompt": "x = 1\n", "max_tokens": 3,
                                                          "seed": 2**64})
            tiny = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8,
                                                      "temperature": 1e-300})
            greedy = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
            rest = [line for line in lines if line]
    assert bad_seed.status_code == 400 and bad_seed.json()["error"]["param"] == "seed"
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)


# ---- fault injection: an engine step that raises, then one that hangs -----------------------------
FAULT_APP_NAME = "codefast-faults"
FAULT_WEDGE_TIMEOUT_S = 1.0  # a step this long counts as wedged (the default is minutes)
FAULT_HEALTH_CHECK_PERIOD_S = 0.5
REPLACE_TIMEOUT_S = 120  # Serve notices (3 failed checks), stops the replica, starts and loads a new one


@pytest.fixture(scope="module")
def fault_server(server, tmp_path_factory):
    from ray import serve

    control = tmp_path_factory.mktemp("faults") / "fault"
    control.write_text("")
    config = ServeConfig.from_args(dict(model=TINY_MODEL_NAME, guard="none", max_num_seqs=2, dtype="float32",
                                        max_ongoing_requests=4, num_cpus=0))
    app = build_fault_app(config, control, FAULT_WEDGE_TIMEOUT_S, FAULT_HEALTH_CHECK_PERIOD_S)
    with ThreadPoolExecutor(1) as pool:  # serve.run has no timeout of its own
        pool.submit(serve.run, app, name=FAULT_APP_NAME, route_prefix="/faults").result(DEPLOY_TIMEOUT_S)
    yield f"{server}/faults", control
    control.write_text("")
    serve.delete(FAULT_APP_NAME)


def wait_for(probe: Callable[[], object], timeout_s: float, what: str):
    """Poll until `probe` returns something truthy (errors count as not yet); bounded."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            if value := probe():
                return value
        except httpx.HTTPError as exc:  # a replica going away answers with errors for a moment
            last = exc
        time.sleep(0.2)
    pytest.fail(f"{what} did not happen within {timeout_s}s (last error: {last!r})")


def test_engine_faults_turn_health_503_and_serve_replaces_the_replica(fault_server):
    url, control = fault_server
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as http:
        def replica() -> str:
            return http.get("/v1/stats").json()["replica"]

        def serves() -> bool:
            return http.post("/v1/completions", json=body).status_code == 200

        first = replica()
        assert http.get("/health").json() == {"status": "ok"} and serves()

        # 1. Every step raises: each request fails alone (500), then the engine is dead.
        control.write_text(RAISE)
        for _ in range(DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES):
            failed = http.post("/v1/completions", json=body)
            assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
        health = http.get("/health")
        assert health.status_code == 503 and "failed in a row" in health.json()["error"]["message"]
        assert http.post("/v1/completions", json=body).status_code == 503  # refused, not queued
        assert http.get("/v1/models").status_code == 200  # the rest of the replica still answers
        control.write_text("")  # so that the replacement is healthy
        second = wait_for(lambda: (tag := replica()) != first and tag, REPLACE_TIMEOUT_S,
                          "replacing the replica whose steps kept failing")
        assert wait_for(serves, REPLACE_TIMEOUT_S, "a completion on the new replica")

        # 2. A step hangs: health turns 503 once it outlasts the wedge timeout, while the event
        # loop keeps answering; Serve replaces the replica.
        control.write_text(HANG)
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=REPLACE_TIMEOUT_S)
            wedged = wait_for(lambda: (r := http.get("/health")).status_code == 503 and r, 30,
                              "/health reporting the wedged step")
            assert "wedge timeout" in wedged.json()["error"]["message"]
            start = time.monotonic()
            assert http.get("/v1/models", timeout=5).status_code == 200
            assert http.get("/v1/stats", timeout=5).json()["step_running_s"] > FAULT_WEDGE_TIMEOUT_S
            assert time.monotonic() - start < 5
            wait_for(lambda: (tag := replica()) not in (first, second) and tag, REPLACE_TIMEOUT_S,
                     "replacing the replica with the wedged step")
            control.write_text("")
            try:
                assert stuck.result(timeout=REPLACE_TIMEOUT_S).status_code != 200  # its replica is gone
            except httpx.HTTPError:
                pass  # or the connection dropped with it
        assert wait_for(serves, REPLACE_TIMEOUT_S, "a completion on the third replica")
        assert http.get("/health").json() == {"status": "ok"}


def test_steps_failing_every_other_time_get_the_replica_replaced(fault_server):
    """Never two failed steps in a row, so the consecutive-failure rule never fires: before the
    failure-rate rule, every other request got a 500 and /health stayed ok for good."""
    url, control = fault_server
    body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}  # one step each: its prefill
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as http:
        def replica() -> str:
            return http.get("/v1/stats").json()["replica"]

        first = replica()
        control.write_text(FLAKY)
        statuses, health = [], http.get("/health")
        for _ in range(40):  # the default rule needs a dozen steps or so
            statuses.append(http.post("/v1/completions", json=body).status_code)
            if (health := http.get("/health")).status_code != 200:
                break
        assert 200 in statuses and 500 in statuses
        assert health.status_code == 503, statuses
        assert "engine steps failed (the limit is" in health.json()["error"]["message"]
        control.write_text("")  # so that the replacement is healthy
        wait_for(lambda: (tag := replica()) != first and tag, REPLACE_TIMEOUT_S,
                 "replacing the replica whose steps failed every other time")
        assert wait_for(lambda: http.post("/v1/completions", json=body).status_code == 200,
                        REPLACE_TIMEOUT_S, "a completion on the new replica")
