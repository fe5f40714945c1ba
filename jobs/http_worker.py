"""The Ray Data callable class that sends a batch of rows to a running Serve deployment.

Each output row (a row's sample) is one OpenAI-style `POST {serve_url}/v1/completions` carrying
every setting the engine-actor mode uses: `max_tokens, temperature, top_p, seed, stop` and the
extension field `guard` ("on"/"off"), per row when the row overrides them. A thread pool keeps up
to `concurrency` requests in flight per actor so the deployment's own continuous batching stays
fed. A 400/413/422 answer means the request itself is bad (an empty prompt, one too long, text
the tokenizer cannot take, a bad per-row value) and becomes an error row. Anything else that is
not a success fails the job: connection errors and 5xx after retries, other 4xx (wrong model
name, auth) at once; turning an outage or a misconfiguration into "done" error rows would make a
resumed run skip those prompts.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pyarrow as pa

from deployments.finish_reasons import is_guard_stop
from engine.params import SamplingParams
from jobs.engine_worker import report_batch_start, report_start
from jobs.rows import (
    RowSettings,
    SampleRequest,
    batch_counts,
    build_output,
    error_fields,
    plan_requests,
)

RETRY_STATUS_CODES = {429, 500, 502, 503, 504}
PROMPT_ERROR_STATUS_CODES = {400, 413, 422}  # the request (this row) is at fault


@dataclass(frozen=True)
class ServeSpec:
    url: str  # e.g. http://127.0.0.1:8000 (the /v1/completions path is added)
    model: str | None = None  # None: whatever model the deployment serves
    concurrency: int = 8  # requests in flight per actor
    timeout_s: float = 600.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"serve url must start with http:// or https://, got {self.url!r}")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError("concurrency >= 1, max_retries >= 0 and timeout_s > 0 are required")

    @property
    def completions_url(self) -> str:
        return self.url.rstrip("/") + "/v1/completions"


def request_body(model: str | None, prompt: str, params: SamplingParams) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": params.max_new_tokens,
            "temperature": float(params.temperature), "top_p": float(params.top_p),
            "seed": params.seed, "stop": list(params.stop) or None,
            "guard": "on" if params.use_guard else "off"}
    if params.language is not None:  # only when set: a server without the syntax gate never sees it
        body["language"] = params.language
    return body


class HttpWorker:
    def __init__(self, spec: ServeSpec, settings: RowSettings, ledger=None):
        self.spec = spec
        self.settings = settings
        self.ledger = ledger
        self.client = httpx.Client(timeout=spec.timeout_s)  # thread-safe, pools connections
        self.pool = ThreadPoolExecutor(max_workers=spec.concurrency)
        report_start(ledger)

    def _post(self, body: dict) -> tuple[httpx.Response, float]:
        spec = self.spec
        # Encoded here with ASCII escapes: text the tokenizer cannot take (a lone surrogate)
        # still reaches the server, whose 400 then names the problem; httpx's own encoder
        # would raise on it in this process instead.
        content = json.dumps(body).encode("ascii")
        headers = {"content-type": "application/json"}
        for attempt in range(spec.max_retries + 1):
            start = time.perf_counter()
            try:
                response = self.client.post(spec.completions_url, content=content, headers=headers)
                if response.status_code not in RETRY_STATUS_CODES:
                    return response, time.perf_counter() - start
                failure = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.TransportError as e:
                failure = f"{type(e).__name__}: {e}"
            if attempt < spec.max_retries:
                time.sleep(0.5 * 2 ** attempt)
        raise RuntimeError(f"{spec.completions_url} failed after {spec.max_retries + 1} tries: {failure}")

    def _outcome(self, request: SampleRequest) -> dict:
        if request.error is not None:
            return error_fields(request.error)
        response, latency_s = self._post(request_body(self.spec.model, request.prompt, request.params))
        if response.is_error:
            message = f"HTTP {response.status_code}: {_error_message(response)}"
            if response.status_code in PROMPT_ERROR_STATUS_CODES:
                return error_fields(message)
            raise RuntimeError(f"{self.spec.completions_url} refused the request ({message[:1000]})")
        payload = response.json()
        choice, usage = payload["choices"][0], payload.get("usage") or {}
        is_guard = is_guard_stop(choice)  # HTTP: "stop" with stop_reason "guard"; rows: "guard"
        return {"completion": choice["text"], "completion_ids": None,
                "finish_reason": "guard" if is_guard else choice.get("finish_reason"),
                "num_prompt_tokens": usage.get("prompt_tokens"),
                # Tokens decoded, as in actor mode: the returned ones plus the excess line the
                # guard cut (the deployment reports those separately).
                "num_generated_tokens": _num_decoded_tokens(usage),
                "is_guard_stop": is_guard,
                "latency_s": latency_s, "error": None}

    def __call__(self, batch: pa.Table) -> pa.Table:
        key = report_batch_start(self.ledger, batch, self.settings.id_column)
        requests = plan_requests(batch, self.settings)
        table = build_output(batch, requests, list(self.pool.map(self._outcome, requests)))
        if self.ledger is not None:
            self.ledger.batch_finished.remote(key, batch_counts(table))
        return table


def _error_message(response: httpx.Response) -> str:
    """The OpenAI error body's message when there is one, else the raw text."""
    try:
        payload = response.json()
    except ValueError:
        return response.text
    error = payload.get("error") if isinstance(payload, dict) else None
    return str(error.get("message", error)) if isinstance(error, dict) else str(payload)


def _num_decoded_tokens(usage: dict) -> int | None:
    completion_tokens = usage.get("completion_tokens")
    if completion_tokens is None:
        return None
    return completion_tokens + (usage.get("guard_dropped_tokens") or 0)


def check_server(url: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any Ray start-up, when nothing answers at the Serve URL."""
    models_url = url.rstrip("/") + "/v1/models"
    try:
        httpx.get(models_url, timeout=timeout_s).raise_for_status()
    except httpx.HTTPError as e:
        raise RuntimeError(f"no Serve deployment answers at {models_url}: {e}") from None
