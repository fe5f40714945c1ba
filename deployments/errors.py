"""OpenAI-style error bodies for every failure: `{"error": {"message", "type", "code", "param"}}`.

FastAPI answers validation failures with 422 and its own body; OpenAI clients expect 400 and
this shape, so the handlers below replace FastAPI's. Nothing here stops the server: a handler
turns the exception into a response and the replica goes on serving.

`BodyLimitMiddleware` refuses a body over MAX_REQUEST_BODY_BYTES with a 413 before anything
parses it; both apps install it (deployments/app.py, deployments/llm_app.py).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.metrics import serve_metrics
from deployments.protocol import MAX_REQUEST_BODY_BYTES, ErrorDetail, ErrorResponse, RequestError
from engine.errors import EngineDeadError, PromptError, SequenceError

logger = logging.getLogger("ray.serve")

_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error", 500: "server_error", 503: "server_error"}


def error_response(status_code: int, message: str, code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    detail = ErrorDetail(message=message, type=_ERROR_TYPES.get(status_code, "invalid_request_error"),
                         code=code, param=param)
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status_code)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line per offending field (a union reports each branch; keep the first)."""
    lines, params = {}, []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = loc[0] if loc else "body"
        if error.get("type") == "json_invalid":
            return f"request body is not valid JSON: {error.get('msg')}", None
        message = error.get("msg")
        if error.get("type") == "string_unicode":  # JSON allows "\ud800", which is no text
            message = "not valid Unicode text (a lone surrogate such as \\ud800 cannot be tokenized)"
        if field not in lines:
            lines[field] = f"{'.'.join(loc) or 'body'}: {message}"
            params.append(field)
    return "; ".join(lines.values()) or "invalid request", (params[0] if len(params) == 1 else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        serve_metrics().record_request("client_error")  # never reached the endpoint itself
        return error_response(400, message, code="invalid_request", param=param)

    @app.exception_handler(RequestError)
    async def _on_request_error(request: Request, exc: RequestError):
        return error_response(exc.status_code, str(exc), code=exc.code, param=exc.param)

    @app.exception_handler(PromptError)
    async def _on_prompt_error(request: Request, exc: PromptError):
        code = "context_length_exceeded" if "context" in str(exc) else "invalid_prompt"
        return error_response(400, str(exc), code=code, param="prompt")

    @app.exception_handler(EngineDeadError)
    async def _on_engine_dead(request: Request, exc: EngineDeadError):
        # 503: this replica cannot serve; its health check fails too, so Serve replaces it.
        return error_response(503, f"engine unavailable: {exc}", code="engine_unavailable")

    @app.exception_handler(SequenceError)
    async def _on_sequence_error(request: Request, exc: SequenceError):
        # This request's generation failed; the others on the replica go on.
        logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(500, str(exc), code="generation_failed")

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code=None)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", code="internal_error")


class BodyLimitMiddleware:
    """ASGI middleware: a request body over `max_bytes` gets a 413 and is never parsed.

    A declared Content-Length over the limit is refused before one byte is read; a body without
    one (chunked) is read until it passes the limit. A body within it is read whole here and
    handed on as one message: the app would read it whole anyway, to parse the JSON.
    """

    def __init__(self, app, max_bytes: int = MAX_REQUEST_BODY_BYTES,
                 on_refused: Callable[[], None] | None = None):
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, f"{declared} bytes")
            return
        body = await self._read_body(receive)
        if body is None:
            return  # the client is gone: nobody to answer
        if len(body) > self.max_bytes:
            await self._refuse(scope, receive, send, f"more than {self.max_bytes} bytes")
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or its first chunks once they pass the limit; None on a disconnect."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes or not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope, receive, send, size: str) -> None:
        if self.on_refused is not None:
            self.on_refused()
        mib = f" ({self.max_bytes >> 20} MiB)" if self.max_bytes % (1 << 20) == 0 else ""
        message = f"request body too large: {size}; the limit is {self.max_bytes} bytes{mib}"
        await error_response(413, message, code="request_too_large")(scope, receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


def _replay(body: bytes, receive):
    """A `receive` that returns the buffered body once, then what the client sends next (its
    disconnect, which a streaming response listens for)."""
    is_sent = False

    async def replayed():
        nonlocal is_sent
        if is_sent:
            return await receive()
        is_sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
