"""The CodeFast Serve application: one deployment, FastAPI ingress + one engine per replica.

The replica holds a backend (backends/: our engine, or vLLM with GenGuard in a logits processor,
chosen by `backend:` in the config) and talks only to the backend protocol.

Why one deployment and not ingress -> engine: the engine already batches every request of its
replica (AsyncEngine), so a separate router layer would add a handle hop per token of a stream
and a second place where a client disconnect must be propagated, for nothing in return. Serve's
proxy spreads requests over replicas; autoscaling adds replicas (= engines) under load.

    serve run deployments/config.yaml            # or: python -m deployments.serve_cli
"""
# No `from __future__ import annotations`: Serve pickles the class by value, and FastAPI must see
# real annotation objects (a string "CompletionRequest" would no longer resolve in the replica).
import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve import Application

from deployments.config import ServeConfig, check_capacity
from deployments.errors import BodyLimitMiddleware, install_error_handlers
from deployments.finish_reasons import HTTP_FINISH
from deployments.metrics import serve_metrics
from deployments.protocol import (CompletionChoice, CompletionRequest, CompletionResponse, ModelCard,
                                  ModelList, RequestError, Usage)
from backends import build_backend
from engine import EngineDeadError, PromptError, Result, SamplingParams, SequenceError, StepEvent

logger = logging.getLogger("ray.serve")


api = FastAPI(title="CodeFast", description="OpenAI-compatible code completions with GenGuard")
install_error_handlers(api)
# Before serve.ingress below: it freezes a copy of the app, middleware included.
api.add_middleware(BodyLimitMiddleware, on_refused=lambda: serve_metrics().record_request("client_error"))


def usage_of(results: list[Result]) -> Usage:
    num_prompt = sum(r.num_prompt_tokens for r in results)
    num_completion = sum(len(r.token_ids) for r in results)
    return Usage(prompt_tokens=num_prompt, completion_tokens=num_completion,
                 total_tokens=num_prompt + num_completion,
                 guard_dropped_tokens=sum(r.num_dropped_tokens for r in results
                                          if r.finish_reason == "guard"))


def finish_fields(finish_reason: str) -> dict:
    """(finish_reason, stop_reason) of an engine result: a guard stop is "stop" with stop_reason "guard"."""
    finish, stop = HTTP_FINISH.get(finish_reason, (None, None))
    return {"finish_reason": finish, "stop_reason": stop}


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


# Serve pickles the class when it is decorated: everything it uses must be defined above it.
def _check_live_capacity(config: ServeConfig) -> None:
    """A `serve run` config may override max_ongoing_requests after build_app ran; re-check the
    value this replica really got (a private field, hence the defensive lookup)."""
    try:
        deployment_config = getattr(serve.get_replica_context(), "_deployment_config", None)
    except Exception:
        return
    limit = getattr(deployment_config, "max_ongoing_requests", None)
    if isinstance(limit, int):
        check_capacity(limit, config.engine.max_num_seqs)


@serve.deployment(name="CodeFastServer")
@serve.ingress(api)
class CodeFastServer:
    def __init__(self, config: ServeConfig):
        self.config = config
        _check_live_capacity(config)
        self.backend = build_backend(config.engine)
        info = self.backend.info
        self.served_names = {info.model_name, config.engine.model}
        self.created = int(time.time())
        self.metrics = serve_metrics()
        self.num_requests = 0  # completion requests that passed body validation
        self.num_cancelled_requests = 0  # client went away before its completion was done
        logger.info("CodeFast replica ready: backend=%s model=%s guard=%s slots=%d", info.backend,
                    info.model_name, info.has_guard, config.engine.max_num_seqs)

    def __del__(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.shutdown()

    async def check_health(self) -> None:
        """What Serve calls every `health_check_period_s`: raising marks this replica unhealthy,
        and Serve replaces it (a dead engine loop, a step loop that keeps failing, a wedged step)."""
        await self._check_backend_health()

    async def _check_backend_health(self) -> None:
        # In a worker thread: the event loop must never wait on the engine, whatever the backend.
        await asyncio.to_thread(self.backend.check_health)

    # ---- endpoints -----------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        """200 {"status": "ok"}, or 503 with the reason when the engine cannot serve."""
        await self._check_backend_health()  # EngineDeadError -> 503 (deployments/errors.py)
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        info = self.backend.info
        card = ModelCard(id=info.model_name, created=self.created, max_model_len=info.max_model_len,
                         has_guard=info.has_guard, backend=info.backend)
        return ModelList(data=[card])

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        return {**self.backend.stats(), "num_requests": self.num_requests,
                "num_cancelled_requests": self.num_cancelled_requests,
                "replica": serve.get_replica_context().replica_tag}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        start = time.perf_counter()
        self.num_requests += 1
        try:
            if body.model is not None and body.model not in self.served_names:
                raise RequestError(f"model {body.model!r} is not served here; this server serves"
                                   f" {self.backend.info.model_name!r}", status_code=404,
                                   code="model_not_found", param="model")
            params = body.sampling_params(self.backend.info.max_model_len)
            prompts = body.prompts
            # Reject every bad prompt before any is queued (a stream's headers go out first).
            for prompt in prompts:
                self.backend.encode_prompt(prompt, params)
        except (RequestError, PromptError):
            self.metrics.record_request("client_error")
            raise
        request_id = f"cmpl-{uuid.uuid4().hex}"
        events = self._events(prompts, params, request_id)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._sse(events, request_id, len(prompts), include_usage, start),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results: list[Result | None] = [None] * len(prompts)
        try:
            async for index, event in events:
                if event.is_finished:
                    results[index] = event.result
        except asyncio.CancelledError:  # Serve cancels the handler when the client disconnects
            self._record_cancelled()
            raise
        except Exception:
            self.metrics.record_request("server_error")
            raise
        finally:
            await events.aclose()
        self.metrics.record_results(results)
        self.metrics.record_request("ok", time.perf_counter() - start, is_stream=False)
        choices = [CompletionChoice(text=r.text, index=i, **finish_fields(r.finish_reason))
                   for i, r in enumerate(results)]
        return CompletionResponse(id=request_id, created=int(time.time()), model=self.backend.info.model_name,
                                  choices=choices, usage=usage_of(results))

    # ---- helpers ------------------------------------------------------------------------------
    async def _events(self, prompts: list[str], params: SamplingParams,
                      request_id: str) -> AsyncIterator[tuple[int, StepEvent]]:
        """Merge the engine streams of all prompts of one request, as (prompt index, event).

        Closing this generator (or cancelling its consumer) cancels every prompt's stream, and
        the backend aborts a cancelled request, so the engine frees its slot at once.
        """
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, prompt: str) -> None:
            try:
                async for event in self.backend.stream(prompt, params, f"{request_id}-{index}"):
                    queue.put_nowait((index, event))
            except Exception as exc:  # hand engine errors to the consumer instead of losing them
                queue.put_nowait((index, exc))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        num_finished = 0
        try:
            while num_finished < len(tasks):
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                num_finished += item.is_finished
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _sse(self, events: AsyncIterator[tuple[int, StepEvent]], request_id: str,
                   num_prompts: int, include_usage: bool, start: float) -> AsyncIterator[str]:
        created, model = int(time.time()), self.backend.info.model_name
        results: list[Result | None] = [None] * num_prompts
        try:
            async for index, event in events:
                if event.is_finished:
                    results[index] = event.result
                elif not event.text_delta:
                    continue
                finish = finish_fields(event.result.finish_reason) if event.is_finished else {}
                chunk = CompletionResponse(id=request_id, created=created, model=model, choices=[
                    CompletionChoice(text=event.text_delta, index=index, **finish)])
                yield sse(chunk.model_dump_json())
            if include_usage:
                chunk = CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                           usage=usage_of(results))
                yield sse(chunk.model_dump_json())
            yield sse("[DONE]")
            self.metrics.record_results(results)
            self.metrics.record_request("ok", time.perf_counter() - start, is_stream=True)
        except (asyncio.CancelledError, GeneratorExit):  # client disconnected mid-stream
            self._record_cancelled()
            raise
        except Exception as exc:  # headers are gone: report in-band, as OpenAI does
            logger.exception("stream %s failed", request_id)
            self.metrics.record_request("server_error")
            # Our own errors say what failed; anything else only its type (no internals leak).
            known = isinstance(exc, (SequenceError, EngineDeadError))
            message = str(exc) if known else f"internal error: {type(exc).__name__}"
            code = "generation_failed" if isinstance(exc, SequenceError) else \
                "engine_unavailable" if known else "internal_error"
            yield sse(json.dumps({"error": {"message": message, "type": "server_error", "code": code}}))
        finally:
            await events.aclose()

    def _record_cancelled(self) -> None:
        self.num_cancelled_requests += 1
        self.metrics.record_request("cancelled")


def build_app(args: dict | ServeConfig | None = None) -> Application:
    """Serve application builder (`import_path: deployments.app:build_app`, `args:` = the engine's
    BackendSpec fields and ServeConfig's Serve options, flat). Raises ValueError on a bad config,
    e.g. max_ongoing_requests < max_num_seqs."""
    config = args if isinstance(args, ServeConfig) else ServeConfig.from_args(dict(args or {}))
    return CodeFastServer.options(**config.deployment_options()).bind(config)
