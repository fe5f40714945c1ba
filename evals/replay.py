"""Replay of every way of stopping over one greedy completion, exactly as the engines apply it.

Greedy decoding is deterministic and a stop only ends a sequence, so a guarded run's output is a
prefix of the unguarded one: given the guard's p_stop / p_done at every token of the unguarded
completion, `guard.policy.find_stop` says where each policy would have stopped, and the stop
words where they would have, without regenerating.
"""
from __future__ import annotations

from dataclasses import replace

from evals.stop_words import STOP_WORDS, finish_completion
from guard.policy import StopPolicy, find_stop

# The guard's policy three ways: no syntax gate, the strict gate, the gate that lets a closed stub
# through (benchmarks.full_split, models_table and syntax_gate replay all three).
GUARD_VARIANTS = ("guard", "guard+gate", "guard+gate_stubs")


def guard_variants(policy) -> dict:
    """GUARD_VARIANTS' policies, from a guard's own policy."""
    base = replace(policy, syntax_gate=False, syntax_gate_allows_stub=False)
    return {"guard": base, "guard+gate": replace(base, syntax_gate=True),
            "guard+gate_stubs": replace(base, syntax_gate=True, syntax_gate_allows_stub=True)}


def shipped_variant(policy) -> str:
    """Which of GUARD_VARIANTS the guard's shipped policy is."""
    if not policy.syntax_gate:
        return "guard"
    return "guard+gate_stubs" if policy.syntax_gate_allows_stub else "guard+gate"


def replay_policy(texts: list[str], p_stops: list[float], policy: StopPolicy,
                  p_dones: list[float] | None = None, is_complete=None) -> tuple[int, int] | None:
    """(tokens generated, tokens kept) when `policy` stops the sequence, None when it never does.

    `texts[i]` is the decoded text of tokens [0, i] (prefix decoding keeps multi-byte characters
    whole), so token i's own text is what it adds to texts[i - 1].
    """
    token_texts = [text[len(texts[i - 1]) if i else 0:] for i, text in enumerate(texts)]
    stop = find_stop(p_stops, token_texts, policy, p_dones, is_complete=is_complete)
    return None if stop is None else (stop[0] + 1, stop[1])


def replay_stop_words(text: str, char_ends: list[int], stop: tuple[str, ...]) -> tuple[int, str] | None:
    """(tokens generated, truncated text) when a stop word fires, else None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not hits:
        return None
    first = min(hits)
    end = first + next(len(s) for s in stop if text.find(s) == first)
    num_tokens = next(i + 1 for i, e in enumerate(char_ends) if e >= end)
    return num_tokens, text[:first]


def replay_stop_words_method(language: str, texts: list[str], num_baseline_tokens: int) -> tuple[int, str, str]:
    """(tokens generated, text kept, text to execute) of the stop-word heuristic over one
    completion (`texts[i]`: the decoded text of tokens [0, i]); its stop puts back the brace it cut."""
    full = texts[-1] if texts else ""
    hit = replay_stop_words(full, [len(text) for text in texts], STOP_WORDS[language])
    if hit is None:
        return num_baseline_tokens, full, full
    return hit[0], hit[1], finish_completion(language, hit[1], True)


def replay_completion(language: str, texts: list[str], token_texts: list[str], p_stops: list[float],
                      p_dones: list[float] | None, num_baseline_tokens: int, policies: dict[str, StopPolicy],
                      is_complete_at=None) -> dict[str, tuple[int, str, str]]:
    """method -> (tokens generated, text the method keeps, text to execute) for one completion,
    each method stopping as the engines apply it: the baseline, the stop words, every policy and
    every policy + stop words. `texts[i]` is the decoded text of tokens [0, i]; `is_complete_at`
    (num kept tokens, the policy's syntax_gate_allows_stub -> bool) is the syntax gate's check
    for the policies that turn it on."""
    full = texts[-1] if texts else ""
    methods = {"baseline": (num_baseline_tokens, full, full),
               "stop_words": replay_stop_words_method(language, texts, num_baseline_tokens)}
    for name, policy in policies.items():
        check = None
        if policy.syntax_gate:
            check = lambda n, allows_stub=policy.syntax_gate_allows_stub: is_complete_at(n, allows_stub)  # noqa: E731
        stop = find_stop(p_stops, token_texts, policy, p_dones or None, is_complete=check)
        if stop is None:
            methods[name] = methods["baseline"]
        else:
            kept = texts[stop[1] - 1] if stop[1] else ""
            methods[name] = (stop[0] + 1, kept, kept)
        # + stop words: whichever fires first; on the same token the engines check the guard first
        guard, words = methods[name], methods["stop_words"]
        methods[f"{name}+stop_words"] = guard if guard[0] <= words[0] else words
    return methods


def replay_methods(samples: list[dict], language: str, policies: dict[str, StopPolicy]) -> dict:
    """method -> one (tokens generated, text to execute) per sample (`evals.scored_samples`)."""
    labels = {**{name: f"guard {name}" for name in policies},
              **{f"{name}+stop_words": f"guard+stop_words {name}" for name in policies}}
    methods = {}
    for s in samples:
        token_texts = [text[len(s["texts"][i - 1]) if i else 0:] for i, text in enumerate(s["texts"])]
        replayed = replay_completion(language, s["texts"], token_texts, s["p_stop"], s.get("p_done"),
                                     len(s["ids"]), policies)
        for method, (num_generated, _, executed) in replayed.items():
            methods.setdefault(labels.get(method, method), []).append((num_generated, executed))
    return methods
