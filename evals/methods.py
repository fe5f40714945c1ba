"""The ways of stopping that the benchmarks compare, as sampling settings: the baseline (EOS / max
tokens), the stop words, GenGuard, and GenGuard + stop words."""
from __future__ import annotations

from engine import SamplingParams
from evals.stop_words import STOP_WORDS


def method_params(method: str, language: str, max_new_tokens: int) -> SamplingParams:
    use_stop_words = "stop_words" in method
    return SamplingParams(max_new_tokens=max_new_tokens, use_guard=method.startswith("guard"),
                          stop=STOP_WORDS[language] if use_stop_words else ())


def ungated_shipped_guard(model_name: str):
    """The model's shipped guard with its syntax gate off (the benchmarks that set the gate's two
    code paths side by side)."""
    from dataclasses import replace

    from guard.probe import GenGuard, shipped_guard_dir

    guard = GenGuard.load(shipped_guard_dir(model_name))
    guard.policy = replace(guard.policy, syntax_gate=False)
    return guard
