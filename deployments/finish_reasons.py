"""How a completion's end goes out over HTTP, in both Serve apps (app.py, llm_app.py).

OpenAI's finish reasons are "stop", "length" and "content_filter"; strictly typed clients reject
any other. vLLM reports a stop other than EOS as finish_reason "stop" with `stop_reason` naming
what stopped it, and a guard stop goes out the same way: "stop" with stop_reason "guard".
Engine results and Ray Data rows keep their own finish_reason "guard"; only HTTP bodies follow
this. The Ray Serve LLM app can still send the old finish_reason "guard" (LLMAppConfig).
"""
from __future__ import annotations

GUARD_STOP_REASON = "guard"
LEGACY_GUARD_FINISH_REASON = GUARD_STOP_REASON  # finish_reason "guard", the value before stop_reason

# Engine results' finish reasons -> (finish_reason, stop_reason) of an HTTP choice.
HTTP_FINISH = {"eos": ("stop", None), "stop": ("stop", None), "length": ("length", None),
               "guard": ("stop", GUARD_STOP_REASON)}


def guard_stop_fields(legacy: bool = False) -> tuple[str, str | None]:
    """finish_reason and stop_reason of a guard-stopped HTTP choice (`legacy`: finish_reason "guard")."""
    return (LEGACY_GUARD_FINISH_REASON, None) if legacy else HTTP_FINISH["guard"]


def is_guard_stop(choice: dict) -> bool:
    """Did the guard end this HTTP choice (a JSON dict), in either convention?"""
    return (choice.get("finish_reason") == LEGACY_GUARD_FINISH_REASON
            or (choice.get("finish_reason") == "stop" and choice.get("stop_reason") == GUARD_STOP_REASON))
