"""HTTP bodies of the OpenAI-compatible API (Pydantic), and the request -> SamplingParams mapping.

Requests are strict: unknown fields and wrong JSON types are rejected (400) rather than coerced
or ignored, so a client typo (`max_token`) fails loudly instead of silently using a default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from engine.params import MAX_SEED, MIN_SEED, SamplingParams
from guard.syntax import language_name_error

# Code generation wants room for a whole function; OpenAI's own default (16) would cut every
# completion before the guard could ever matter. Capped by the model's context at request time.
DEFAULT_MAX_TOKENS = 256
MAX_PROMPTS_PER_REQUEST = 64
MAX_STOP_STRINGS = 16
# Refused (413) before it is parsed. Room for several prompts of a whole 32k-token context each,
# JSON-escaped; a bigger body only costs the replica time that its other requests wait for.
MAX_REQUEST_BODY_BYTES = 1 << 20
# The per-request `guard` extension: one of these words, or a stop threshold (below).
GuardWord = Literal["on", "off"]
GUARD_WORDS = get_args(GuardWord)

NonEmptyStr = Annotated[str, Field(min_length=1)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Interval:
    """A range of finite numbers, closed unless said otherwise; `x in interval` is False for NaN
    and inf, which fail or pass a plain comparison for the wrong reason."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if not _is_number(value) or not math.isfinite(value):
            return False
        above = self.low < value if self.low_open else self.low <= value
        return above and (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def field_type(self):
        """A float field in this interval whose error states the rule (pydantic's own range error
        for NaN names a bound NaN does not break); the Field bounds are for the OpenAPI schema."""
        def check(value: Any) -> Any:
            if _is_number(value) and value not in self:  # a wrong type: the type check names it
                raise PydanticCustomError("finite_number_range", "must be a finite number in {rule}, got {value}",
                                          {"rule": str(self), "value": value})
            return value

        bounds = {"gt" if self.low_open else "ge": self.low, "lt" if self.high_open else "le": self.high}
        return Annotated[float, Field(allow_inf_nan=False, **bounds), BeforeValidator(check)]


TEMPERATURE_RANGE = Interval(0, 2)
TOP_P_RANGE = Interval(0, 1, low_open=True)
GUARD_THRESHOLD_RANGE = Interval(0, 1, low_open=True, high_open=True)
Temperature = TEMPERATURE_RANGE.field_type()
TopP = TOP_P_RANGE.field_type()
GuardThreshold = GUARD_THRESHOLD_RANGE.field_type()


class RequestError(ValueError):
    """A well-formed request the server cannot honour; becomes a 4xx OpenAI error body."""

    def __init__(self, message: str, status_code: int = 400, code: str | None = "invalid_value",
                 param: str | None = None):
        super().__init__(message)
        self.status_code, self.code, self.param = status_code, code, param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # List lengths are checked in validators below: a union reports each branch's error, and the
    # string branch's "Input should be a valid string" would hide the limit.
    prompt: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)]
    model: str | None = None  # None: the served model
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    seed: Annotated[int, Field(ge=MIN_SEED, le=MAX_SEED)] | None = None  # int64, what every RNG takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None  # accepted for OpenAI compatibility, not used
    # Extension: "on" (default) / "off" / a stop threshold in (0, 1) for this request only.
    guard: GuardWord | GuardThreshold | None = None
    # Extension: the code's language, for the guard's syntax gate (None: told from the prompt).
    language: str | None = None

    @field_validator("guard", mode="before")
    @classmethod
    def _guard_word_or_threshold(cls, guard: Any) -> Any:
        # Checked as a whole: the union would report only its first branch ("'on' or 'off'").
        if guard is None or (isinstance(guard, str) and guard in GUARD_WORDS):
            return guard
        if guard in GUARD_THRESHOLD_RANGE:
            return guard
        words = ", ".join(repr(word) for word in GUARD_WORDS)
        raise PydanticCustomError("guard", "must be {words} or a stop threshold in {rule}, got {guard}",
                                  {"words": words, "rule": str(GUARD_THRESHOLD_RANGE), "guard": repr(guard)})

    @field_validator("language")
    @classmethod
    def _language_name(cls, language: str | None) -> str | None:
        if (error := language_name_error(language)) is not None:  # SamplingParams' own rule
            raise ValueError(error)
        return language

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("prompt")
    @classmethod
    def _at_most_max_prompts(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) > MAX_PROMPTS_PER_REQUEST:
            raise ValueError(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompt)}")
        return prompt

    @field_validator("stop")
    @classmethod
    def _at_most_max_stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings per request, got {len(stop)}")
        return stop

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def sampling_params(self, max_model_len: int) -> SamplingParams:
        if self.max_tokens is not None and self.max_tokens > max_model_len:
            raise RequestError(f"max_tokens ({self.max_tokens}) exceeds the model's context length"
                               f" ({max_model_len} tokens)", param="max_tokens")
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        is_threshold = isinstance(self.guard, float)
        try:
            return SamplingParams(
                max_new_tokens=self.max_tokens or min(DEFAULT_MAX_TOKENS, max_model_len),
                temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stop,
                use_guard=self.guard != "off",
                guard_threshold=self.guard if is_threshold else None, language=self.language)
        except ValueError as exc:  # the engine's own checks, should the ranges above drift
            raise RequestError(str(exc)) from exc


# ---- responses ---------------------------------------------------------------------------------
FinishReasonName = Literal["stop", "length"]  # OpenAI's; a guard stop is "stop" (finish_reasons.py)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int  # tokens of the returned text
    total_tokens: int
    # Decoded but cut from the text because the guard judged that line excess. Tokens the guard
    # *saved* are not reported: that needs the unguarded completion, which was never generated.
    guard_dropped_tokens: int = 0


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: FinishReasonName | None = None
    stop_reason: str | None = None  # "guard" after a guard stop, as vLLM names a stop's cause


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "codefast"
    max_model_len: int
    has_guard: bool
    backend: str = "codefast"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
