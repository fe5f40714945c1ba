"""What callers of the guard's vLLM processor name without loading it: the processor's import
path for `logits_processors`, the keys a request carries in `SamplingParams.extra_args` (the
OpenAI server's `vllm_xargs`) and how a value there is read.

Its own module, with no torch or vLLM import, because the processes that only build engine
arguments or requests must not load an engine's stack: Ray Data LLM's preprocess and postprocess
tasks, Ray Serve LLM's app builder, a job's driver (importing vLLM costs a fresh process over ten
seconds of CPU here). guard/vllm_processor.py reads the same names inside the engine.
"""
from __future__ import annotations

PROCESSOR_PATH = "guard.vllm_processor:GenGuardLogitsProcessor"  # vLLM imports it in the engine

GUARD_ARG = "guard"  # the per-request key in SamplingParams.extra_args
LANGUAGE_ARG = "language"  # the per-request code language, for the syntax gate
OBSERVE = "observe"  # votes counted and traced, the request never stopped (exactness baseline)


def parse_guard_arg(value) -> float | bool | str:
    """The per-request setting: True (on, the export's threshold), False (off), a threshold, or
    "observe" (votes are counted and traced, the request is never stopped: the baseline of the
    exactness check)."""
    if value is None or value == "on" or value is True:
        return True
    if value == "off" or value is False:
        return False
    if value == OBSERVE:
        return OBSERVE
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass  # not a number: the error below names it
    if isinstance(value, (int, float)) and 0 < float(value) < 1:
        return float(value)
    # vLLM's OpenAI server validates vllm_xargs values as str | int | float, so a JSON true or
    # false arrives here as the int 1 or 0: say so, instead of a bare "got 0" the client never sent.
    hint = (" (a JSON true / false reaches the guard as 1 / 0: send the string 'on' or 'off')"
            if type(value) is int and value in (0, 1) else "")
    raise ValueError(f"extra_args['{GUARD_ARG}'] must be 'on', 'off', 'observe' or a stop threshold"
                     f" in (0, 1), got {value!r}{hint}")


def guard_columns_masked_by(structured_outputs, allowed_token_ids) -> str | None:
    """What in a request masks the vocabulary, the guard's columns with it, before vLLM's logits
    processors run (its grammar bitmask, its allowed-token mask), so the guard cannot read them;
    None: nothing. From the request's structured outputs (SamplingParams.structured_outputs, or
    the OpenAI request's `extract_structured_outputs()`) and its allowed_token_ids."""
    if structured_outputs is not None:
        return "structured outputs"
    if allowed_token_ids:
        return "allowed_token_ids"
    return None
