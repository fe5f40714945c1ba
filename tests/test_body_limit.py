"""The request body limit (deployments/errors.py BodyLimitMiddleware) without a Serve instance:
on a bare app (the endpoint never runs for a refused body), and in the Ray Serve LLM app's
ingress class. tests/test_serve.py checks our deployed app over HTTP."""
import asyncio

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from deployments.errors import BodyLimitMiddleware, install_error_handlers
from deployments.protocol import MAX_REQUEST_BODY_BYTES

LIMIT = 100  # bytes, for the bare app


def small_app() -> tuple[FastAPI, list]:
    app, seen = FastAPI(), []
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=LIMIT)

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        seen.append(body)
        return body

    return app, seen


def chunks(body: bytes, size: int = 16):  # a generator: the client sends it without a Content-Length
    for start in range(0, len(body), size):
        yield body[start:start + size]


def test_a_body_over_the_limit_never_reaches_the_endpoint():
    app, seen = small_app()
    http = TestClient(app, headers={"content-type": "application/json"})
    at_limit = b'{"a": "%s"}' % (b"x" * (LIMIT - 9))
    assert len(at_limit) == LIMIT and http.post("/echo", content=at_limit).status_code == 200
    for content in (at_limit + b" ", chunks(at_limit + b" "), chunks(b"{" * 10 * LIMIT)):
        response = http.post("/echo", content=content)
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and f"the limit is {LIMIT} bytes" in error["message"]
    assert len(seen) == 1
    assert http.post("/echo", json={"b": 1}).json() == {"b": 1}  # and it goes on serving


@pytest.mark.vllm  # imports vLLM's OpenAI server (Ray Serve LLM's ingress); starts no engine
def test_the_ray_serve_llm_apps_ingress_refuses_a_body_over_the_limit():
    from deployments.llm_app import LLMAppConfig, build_app
    from models.tiny import TINY_MODEL_NAME

    # The ingress class build_app deploys, set up as Serve's replica does. Outside a replica a
    # request that passes the limit cannot be served (the endpoint looks up its replica), so
    # only that it passes is checked.
    import ray

    had_ray = ray.is_initialized()
    app = build_app(LLMAppConfig.from_args(dict(model=TINY_MODEL_NAME, guard=None, dtype="float32")))
    ingress_cls = app._bound_deployment.func_or_class
    replica = ingress_cls.__new__(ingress_cls)
    try:
        asyncio.run(replica.__init__(llm_deployments={}, model_cards={}))
        http = TestClient(replica.app, headers={"content-type": "application/json"})
        body = b'{"model": "m", "prompt": "%s"}' % (b"x" * MAX_REQUEST_BODY_BYTES)
        for content in (body, chunks(body, 64 * 1024)):
            response = http.post("/v1/completions", content=content)
            assert response.status_code == 413
            assert f"the limit is {MAX_REQUEST_BODY_BYTES} bytes" in response.json()["error"]["message"]
        assert http.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code != 413
    finally:  # the ingress's set-up starts a default Ray in this process; the run's own comes later
        if not had_ray and ray.is_initialized():
            ray.shutdown()
