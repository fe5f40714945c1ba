"""GenGuard on Ray Serve LLM: vLLM's whole OpenAI server, autoscaled by Serve, with the guard inside.

    serve run deployments/config.vllm.yaml              # CPU; config.vllm.gpu.yaml on GPU nodes

Ray Serve LLM (`ray.serve.llm`: `LLMConfig` + `build_openai_app`) serves `/v1/completions`,
`/v1/chat/completions`, `/v1/models`, `/v1/tokenize`... with everything vLLM's server takes (n,
logprobs, stop_token_ids, token-id prompts, vllm_xargs) and vLLM's engine metrics. This module
adds GenGuard to it, in two pieces:

- the engine: each replica serves the GenGuard export of the model (guard/export.py; built once
  per node, on first use) with `guard.vllm_processor.GenGuardLogitsProcessor` in
  `engine_kwargs["logits_processors"]`;
- `GenGuardLLMServer`, the LLMServer (`server_cls`) of those replicas. vLLM reports a guard stop
  as a stop on a marker token; the server turns it into `finish_reason: "stop"` with
  `stop_reason: "guard"` (deployments/finish_reasons.py) and the excess line removed from the
  text, holds back a line the guard may still drop while streaming, counts guard stops in the
  Serve metrics, and applies the per-request default.

In front of them, `GenGuardIngress` (Ray Serve LLM's OpenAI ingress, taking no CPU) adds what
vLLM's own server answers: `GET /health` (200 once every model's replicas serve, else 503) and
`GET /metrics` (every node's Ray metrics: vLLM's engine metrics `ray_vllm_*`, the guard's
`ray_codefast_*`, Serve's), and lists a model in `/v1/models` only once it can serve.

Per request, `"vllm_xargs": {"guard": "on" | "off" | 0.7}` (not JSON `true` / `false`: vLLM's
server turns them into 1 / 0, which get a 400 saying so). Completions default to on. Chat
completions default to off: the guard was trained on raw code continuations (a function's body
and what follows it), while a chat answer is prose with code in markdown fences, where its
"excess" would be the explanation the user asked for; a chat client that wants it sends
`"vllm_xargs": {"guard": "on"}`. A request with structured outputs (`response_format`,
`structured_outputs`) or `allowed_token_ids` defaults to off as well: vLLM masks the vocabulary
for it before the logits processors run, the guard's columns too, so the guard could never stop
it (the processor refuses the two together with a 400).

A guarded request with `ignore_eos` still ends on the guard (its stop tokens are added to the
request's `stop_token_ids`). What the guard drops leaves the whole choice: its text, its token
ids and its logprobs (streamed logprobs are held back with the text they belong to). `echo`
keeps the prompt in front of the text.

Models vLLM cannot run stay on deployments/app.py (our engine, the same API).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import HTTPException
from fastapi.responses import JSONResponse, Response
from ray import serve

# CallbackBase: the base of LLMConfig.callback_config's class (a public field); Ray exports no
# other path to it in 2.60.0 (pinned in requirements.txt and pyproject.toml).
from ray.llm._internal.common.callbacks.base import CallbackBase
# DEFAULT_ENDPOINTS and to_model_metadata: what build_openai_app gives its ingress, which
# build_ingress_app extends (internal in ray 2.60.0 as well).
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

from backends.vllm_output import (StreamedCompletion, VllmOutputs, drop_logprobs, logprob_entries,
                                  pack_logprobs, parse_sse, to_sse)
from deployments.config import LLMAppConfig
from deployments.errors import BodyLimitMiddleware
from deployments.finish_reasons import GUARD_STOP_REASON, guard_stop_fields
from guard.vllm_contract import GUARD_ARG, guard_columns_masked_by, parse_guard_arg

logger = logging.getLogger("ray.serve")

GENGUARD_CONFIG_KEY = "genguard"  # in LLMConfig.experimental_configs: what to export in the replica
DEFAULT_GUARD = {"completions": "on", "chat": "off"}


def build_llm_config(config: LLMAppConfig) -> LLMConfig:
    """The Ray Serve LLM config of one guarded model (the export is prepared here and in replicas)."""
    from backends.vllm_args import RAY_WORKER_ENV, served_folder, vllm_engine_args

    spec = config.engine
    folder, model_name = served_folder(spec)
    args = vllm_engine_args(spec, picks_executor=False)  # Ray Serve LLM forces its own executor
    is_cpu = spec.device == "cpu"
    max_ongoing = config.max_ongoing_requests or 2 * spec.max_num_seqs
    kwargs = {}
    if is_cpu:  # without it Ray Serve LLM asks for a GPU and never schedules
        kwargs["accelerator_config"] = {"kind": "cpu"}
        kwargs["placement_group_config"] = {"bundles": [{"CPU": config.num_cpus}]}
    return LLMConfig(
        model_loading_config={"model_id": config.model_id or model_name, "model_source": str(folder)},
        engine_kwargs=args.kwargs,
        runtime_env={"env_vars": RAY_WORKER_ENV | args.env},
        deployment_config={
            "max_ongoing_requests": max_ongoing,
            "autoscaling_config": {"min_replicas": config.min_replicas, "initial_replicas": config.min_replicas,
                                   "max_replicas": config.max_replicas,
                                   "target_ongoing_requests": config.target_ongoing_requests or spec.max_num_seqs},
        },
        server_cls=GenGuardLLMServer,
        callback_config={"callback_class": LocalModelCallback},
        experimental_configs={GENGUARD_CONFIG_KEY: {"model": spec.model, "guard": spec.guard,
                                                    "finish_reason": config.guard_finish_reason}},
        **kwargs,
    )


def build_app(args: dict | LLMAppConfig | None = None):
    """`import_path: deployments.llm_app:build_app` (`args:` = LLMAppConfig.from_args's keys)."""
    config = args if isinstance(args, LLMAppConfig) else LLMAppConfig.from_args(dict(args or {}))
    return build_ingress_app(build_llm_config(config))


class BodyLimitedIngress(OpenAiIngress):
    """Ray Serve LLM's OpenAI ingress with our request body limit (deployments/errors.py)."""

    def _set_asgi_app(self, app) -> None:
        # Where Serve hands the replica its FastAPI app, before the app starts: Ray Serve LLM's
        # builder takes no middleware of ours (private in ray 2.60.0, which is pinned).
        app.add_middleware(BodyLimitMiddleware)
        super()._set_asgi_app(app)


INGRESS_ENDPOINTS = {**DEFAULT_ENDPOINTS, "health": lambda app: app.get("/health"),
                     "metrics": lambda app: app.get("/metrics")}
# The ingress only relays requests to the LLM replicas, as Serve's proxy does, which takes no CPU
# either: a CPU of its own would leave a 2-CPU node one short of the replica's two.
INGRESS_ACTOR_OPTIONS = {"num_cpus": 0}


def build_ingress_app(llm_config: LLMConfig):
    """What build_openai_app builds for one model, with GenGuardIngress in front."""
    server = build_llm_deployment(llm_config)
    options = {**OpenAiIngress.get_deployment_options([llm_config]), "ray_actor_options": INGRESS_ACTOR_OPTIONS}
    ingress_cls = make_fastapi_ingress(GenGuardIngress, endpoint_map=INGRESS_ENDPOINTS)
    return serve.deployment(ingress_cls, **options).bind(
        llm_deployments={llm_config.model_id: server},
        model_cards={llm_config.model_id: to_model_metadata(llm_config.model_id, llm_config)})


# Serve's states of a deployment whose running replicas all passed their last health check
# (LLMServer.check_health asks the engine); UPSCALING / DOWNSCALING: those while one starts or stops.
SERVING_STATUSES = ("HEALTHY", "UPSCALING", "DOWNSCALING")


def why_not_serving(deployment) -> str | None:
    """None if a deployment (Serve's DeploymentStatusOverview) serves, else why not."""
    if deployment is None:
        return "not deployed"
    running = deployment.replica_states.get("RUNNING", 0)  # str enums: the names compare equal
    if deployment.status not in SERVING_STATUSES:
        status = getattr(deployment.status, "value", deployment.status)
        return f"{status}: {deployment.message or f'{running} replicas running'}"
    return None if running else "no replica running"


class GenGuardIngress(BodyLimitedIngress):
    """Plus `/health` and `/metrics`, as vLLM's server has them; a model is listed once it serves."""

    def __init__(self, llm_deployments: dict, model_cards: dict, **kwargs):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._servers = dict(llm_deployments)

    async def _not_serving(self) -> dict[str, str]:
        """Model id -> why it cannot serve, for each model that cannot."""
        status = await asyncio.to_thread(serve.status)  # the controller's view, over Ray
        reasons = {}
        for model_id, handle in self._servers.items():
            application = status.applications.get(handle.app_name)
            reason = why_not_serving(application and application.deployments.get(handle.deployment_name))
            if reason is not None:
                reasons[model_id] = reason
        return reasons

    async def health(self) -> Response:
        not_serving = await self._not_serving()
        if not_serving:
            return JSONResponse({"status": "unavailable", "models": not_serving}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        from deployments.metrics import cluster_metrics_text

        return Response(await asyncio.to_thread(cluster_metrics_text), media_type=CONTENT_TYPE_LATEST)

    async def models(self):
        listed = await super().models()
        not_serving = await self._not_serving()
        listed.data = [card for card in listed.data if card.id not in not_serving]
        return listed

    async def model_data(self, model: str):
        card = await super().model_data(model)
        if card.id in await self._not_serving():
            raise HTTPException(404, f"model {card.id!r} is still starting")
        return card


# ---- the server ----------------------------------------------------------------------------------
class LocalModelCallback(CallbackBase):
    """Skips Ray Serve LLM's node initialization where the model is a folder on this node.

    Before each engine starts, Ray Serve LLM runs one task per node of the replica's placement
    group to fetch the model from a hub or cloud mirror. Our model is always a local folder (the
    GenGuard export, built on this node in GenGuardLLMServer, or a prepared model), for which that
    task returns the path it was given and does nothing else; but it runs in a fresh Ray worker
    that first imports torch and transformers, which took 19 s of a 91 s replica start here
    (tests/test_llm_app.py, 2026-12-01). A hub id or cloud URI keeps the download."""

    async def on_before_node_init(self) -> None:
        if Path(self.llm_config.model_loading_config.model_source).is_dir():
            self.ctx.run_init_node = False


class GenGuardLLMServer(LLMServer):
    """Ray Serve LLM's server with vLLM's outputs read as backends/vllm_output.py reads them: a
    response is patched as objects, a stream (vLLM's serialized chunks) as JSON."""

    async def __init__(self, llm_config: LLMConfig, **kwargs):
        settings = (llm_config.experimental_configs or {}).get(GENGUARD_CONFIG_KEY) or {}
        self._outputs = None
        self._guard_stop = guard_stop_fields(legacy=settings.get("finish_reason") == GUARD_STOP_REASON)
        if settings.get("guard") is not None:
            from guard.export import export_folder_for

            # Built once per node (locked); a no-op where the driver already built it.
            folder = await asyncio.to_thread(export_folder_for, settings["model"], settings["guard"])
            llm_config.model_loading_config.model_source = str(folder)
            self._outputs = await asyncio.to_thread(VllmOutputs.load, folder)
        await super().__init__(llm_config, **kwargs)

    async def completions(self, request, raw_request_info=None):
        return await self._guarded("completions", request, raw_request_info)

    async def chat(self, request, raw_request_info=None):
        return await self._guarded("chat", request, raw_request_info)

    async def _guarded(self, method: str, request, raw_request_info):
        run = getattr(super(), method)
        if self._outputs is None:
            return await run(request, raw_request_info)
        xargs = dict(request.vllm_xargs or {})
        xargs.setdefault(GUARD_ARG, default_guard(method, request))
        request.vllm_xargs = xargs
        if is_guard_off(xargs[GUARD_ARG]):
            return await run(request, raw_request_info)
        if getattr(request, "ignore_eos", False):
            # The markers are EOS ids of the export, which ignore_eos takes out of the stops: named
            # as stop ids, they still end a guarded request (as backends/vllm.py does).
            stop_ids = list(request.stop_token_ids or [])
            request.stop_token_ids = stop_ids + [i for i in self._outputs.export.marker_ids if i not in stop_ids]
        wants_ids = bool(request.return_token_ids)
        # vLLM leaves the echoed prompt out of a completion's text when it returns token ids (the
        # client has them); asked for here only to cut at a token, so the prompt goes back in.
        echo = _EchoedPrompts(request) if method == "completions" and request.echo and not wants_ids else None
        request.return_token_ids = True  # the kept text is cut at a token, not a character
        outputs = await run(request, raw_request_info)
        if getattr(request, "stream", False):
            return self._fix_stream(outputs, is_chat=method == "chat", wants_ids=wants_ids, echo=echo)
        return self._fix_responses(outputs, wants_ids=wants_ids, echo=echo)

    async def _fix_responses(self, outputs, wants_ids: bool, echo: "_EchoedPrompts | None"):
        async for response in outputs:
            num_stops = num_dropped = 0
            for choice in getattr(response, "choices", None) or []:
                is_chat = hasattr(choice, "message")
                text = choice.message.content if is_chat else choice.text
                if echo is not None:
                    text = echo.text(choice.index, choice.prompt_token_ids, self._outputs) + (text or "")
                kept = self._outputs.finished(choice.token_ids or [], text, choice.finish_reason, choice.stop_reason)
                if kept.is_guard_stop:
                    drop_logprobs(getattr(choice, "logprobs", None), kept.num_cut)
                    choice.finish_reason, choice.stop_reason = self._guard_stop
                    num_stops += 1
                    num_dropped += kept.num_dropped
                    _record_guard_stop(kept.num_dropped)
                    if wants_ids:
                        choice.token_ids = kept.token_ids
                if is_chat:
                    choice.message.content = kept.text
                else:
                    choice.text = kept.text
                if not wants_ids:  # asked for by this server, not by the client: not sent
                    choice.token_ids = None
                    if hasattr(choice, "prompt_token_ids"):
                        choice.prompt_token_ids = None
            if not wants_ids and hasattr(response, "prompt_token_ids"):
                response.prompt_token_ids = None
            usage = getattr(response, "usage", None)
            if usage is not None:  # vLLM's usage takes extra fields, as our own app reports them
                usage.guard_stops, usage.guard_dropped_tokens = num_stops, num_dropped
            yield response

    async def _fix_stream(self, outputs, is_chat: bool, wants_ids: bool, echo: "_EchoedPrompts | None"):
        states: dict[int, _StreamChoice] = {}
        async for batch in outputs:
            items = batch if isinstance(batch, list) else [batch]
            fixed = []
            for item in items:
                chunk = parse_sse(item)
                if chunk is None:  # [DONE], an error, anything not a chunk: as is
                    fixed.append(item)
                    continue
                choices = []
                for choice in chunk.get("choices") or []:
                    index = choice.get("index", 0)
                    if index not in states:
                        echo_text = (echo.text(index, choice.get("prompt_token_ids"), self._outputs)
                                     if echo is not None else "")
                        states[index] = _StreamChoice(StreamedCompletion.start(self._outputs, guarded=True),
                                                      echo_text)
                    if states[index].update(choice, is_chat, wants_ids, self._guard_stop):
                        choices.append(choice)
                if chunk.get("usage"):
                    kept = [state.kept for state in states.values() if state.kept is not None]
                    chunk["usage"]["guard_stops"] = sum(k.is_guard_stop for k in kept)
                    chunk["usage"]["guard_dropped_tokens"] = sum(k.num_dropped for k in kept)
                if choices or chunk.get("usage") or not chunk.get("choices"):
                    chunk["choices"] = choices
                    fixed.append(to_sse(chunk))
            if fixed:
                yield fixed


def default_guard(method: str, request) -> str:
    """The guard setting of a request that sets none: DEFAULT_GUARD by endpoint, and off where
    vLLM masks the vocabulary before the guard reads its columns (structured outputs,
    allowed_token_ids: guard/vllm_processor.py)."""
    extract = getattr(request, "extract_structured_outputs", None)  # vLLM's own reading of the request
    structured_outputs = extract() if extract is not None else None
    if guard_columns_masked_by(structured_outputs, getattr(request, "allowed_token_ids", None)):
        return "off"
    return DEFAULT_GUARD[method]


class _EchoedPrompts:
    """A completion request's prompts, for `echo`: choice i echoes prompt i // n."""

    def __init__(self, request):
        prompt = request.prompt
        self.texts = [prompt] if isinstance(prompt, str) else (
            list(prompt) if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt) else None)
        self.n = request.n or 1

    def text(self, index: int, prompt_token_ids, outputs: VllmOutputs) -> str:
        if self.texts is not None and index // self.n < len(self.texts):
            return self.texts[index // self.n]
        return outputs.decode(list(prompt_token_ids or []))  # a token-id prompt: its text


def is_guard_off(value) -> bool:
    """Does a request's `vllm_xargs["guard"]` turn the guard off, as the processor reads it? A
    value the processor rejects is not "off": the request then goes on to vLLM, whose check of
    the processor's arguments answers 400."""
    try:
        return parse_guard_arg(value) is False
    except ValueError:
        return False


class _StreamChoice:
    """One streamed choice's chunks, rewritten to carry only what its StreamedCompletion sends."""

    def __init__(self, stream: StreamedCompletion, echo_text: str = ""):
        self.stream = stream
        self.echo_text = echo_text  # sent in front of the first chunk's text
        self.kept = None  # the finished completion

    def update(self, choice: dict, is_chat: bool, wants_ids: bool, guard_stop: tuple[str, str | None]) -> bool:
        """Rewrite `choice` in place to carry only safe text (`guard_stop`: its finish_reason and
        stop_reason after a guard stop); False: nothing to send yet."""
        stream = self.stream
        new_ids = choice.get("token_ids") or []
        delta = choice.get("delta") or {} if is_chat else None
        if is_chat and not new_ids and not stream.token_ids and delta.get("content"):
            return True  # chat's echo of the last message, before any token: not the guard's
        # The entries before the new tokens' are an echoed prompt's (first chunk): sent at once.
        entries = logprob_entries(choice.get("logprobs"), is_chat)
        num_prompt_entries = max(len(entries) - len(new_ids), 0) if entries is not None else 0
        new_text = (delta.get("content") or "") if is_chat else (choice.get("text") or "")
        stream.add(new_ids, stream.text + new_text, None if entries is None else entries[num_prompt_entries:])
        finish = choice.get("finish_reason")
        if finish is not None:
            self.kept = stream.outputs.finished(stream.token_ids, stream.text, finish, choice.get("stop_reason"))
            if self.kept.is_guard_stop:
                choice["finish_reason"], choice["stop_reason"] = guard_stop
                _record_guard_stop(self.kept.num_dropped)
            sent = stream.final_delta(self.kept)
        else:
            sent = stream.safe_delta()
        if sent.logprobs is not None:  # the entries of the ids sent now, whichever chunk brought them
            choice["logprobs"] = pack_logprobs((entries or [])[:num_prompt_entries] + sent.logprobs, is_chat)
        text = sent.text
        if self.echo_text:
            text, self.echo_text = self.echo_text + text, ""
        if is_chat:
            delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text
        if wants_ids:
            choice["token_ids"] = sent.token_ids
        else:
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
        return bool(text) or bool(num_prompt_entries) or finish is not None or bool(is_chat and delta.get("role"))


def _record_guard_stop(num_dropped_tokens: int) -> None:
    try:
        from deployments.metrics import serve_metrics

        metrics = serve_metrics()
        metrics.guard_stops.inc(1)
        if num_dropped_tokens > 0:
            metrics.guard_dropped_tokens.inc(num_dropped_tokens)
    except Exception:  # metrics are best effort; the response is not
        logger.debug("could not record a guard stop", exc_info=True)
