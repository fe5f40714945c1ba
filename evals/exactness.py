"""Exactness of GenGuard inside vLLM: does the guarded run (c) stop where the policy replay
(`guard.policy.find_stop`) says, over the unguarded run (a) (the guard observing: it traces its
probabilities, never stops) and over (c)'s own tokens? And (c)'s text against our engine's (e)."""
from __future__ import annotations

from evals.vllm_trace import trace_key


def replay_expectations(baseline_cell: dict, problems, tokenizer, export, traces) -> list:
    """Per problem: what the policy replay says over (a)'s completion, with vLLM's probabilities:
    (stop index, kept tokens), or None for no stop."""
    from guard.policy import find_stop
    from guard.syntax import gate_check

    expectations = []
    for problem, row in zip(problems, baseline_cell["problems"]):
        p_stops, p_dones, _ = traces[trace_key(tokenizer, problem.prompt)]
        token_ids = row["token_ids"]
        texts = [tokenizer.decode([t]) for t in token_ids]
        n = len(token_ids)
        if len(p_stops) < n:
            raise RuntimeError(f"{problem.task_id}: the trace has {len(p_stops)} positions for {n} tokens")
        check = gate_check(export.policy, problem.language, problem.prompt,
                           lambda k, ids=token_ids: tokenizer.decode(ids[:k], skip_special_tokens=True))
        expectations.append(find_stop(p_stops[:n], texts, export.policy, p_dones[:n] if export.done_row else None,
                                      is_complete=check))
    return expectations


def probabilities_changed(problems, tokenizer, traces, guard_traces, guard_cell: dict) -> list[bool]:
    """Per problem: did the guard probabilities vLLM computed for (c)'s tokens differ from those it
    computed for the same positions in (a)? (Same logits give the same float64 probabilities;
    another batch layout's bf16 sums give others, here as for the greedy text.)"""
    changed = []
    for problem, row in zip(problems, guard_cell["problems"]):
        key = trace_key(tokenizer, problem.prompt)
        (a_stop, a_done, _), (c_stop, c_done, _) = traces[key], guard_traces[key]
        last = row["guard_stop_index"] if row.get("guard_stop_index") is not None else len(row["token_ids"])
        n = min(len(a_stop), len(c_stop), last + 1)
        changed.append(a_stop[:n] != c_stop[:n] or a_done[:n] != c_done[:n])
    return changed


def exactness(expectations: list, guard_cell: dict, baseline_cell: dict, changed: list[bool] | None = None) -> dict:
    """(c) against the replay: a match is the same stop index and the same number of kept tokens
    (or no stop in both). The replay's input is (a)'s run, so two cases are counted apart, as
    vLLM's own nondeterminism between the two runs (other batches, other bf16 roundings): a (c)
    completion that is not a prefix of (a)'s (the greedy text changed), and, with `changed`
    (`probabilities_changed`), one whose guard probabilities changed though its tokens did not.
    Anything else is a mismatch: the processor did not do what the policy says. Also counted: the
    completions whose replay input was (c)'s own, same tokens and (with `changed`) probabilities."""
    matches, mismatches, diverged, probs_changed, same_input = 0, [], 0, 0, 0
    changed = changed or [False] * len(expectations)
    for expected, row, base, is_changed in zip(expectations, guard_cell["problems"], baseline_cell["problems"],
                                               changed):
        is_prefix = base["token_ids"][:len(row["token_ids"])] == row["token_ids"]
        same_input += is_prefix and not is_changed
        got = ((row["guard_stop_index"], len(row["token_ids"])) if row["finish_reason"] == "guard" else None)
        if got == expected:
            matches += 1
        elif not is_prefix:
            diverged += 1
        elif is_changed:
            probs_changed += 1
        else:
            mismatches.append({"task_id": row["task_id"], "expected": expected, "got": got,
                               "finish_reason": row["finish_reason"]})
    return {"num_problems": len(expectations), "num_exact": matches, "num_diverged": diverged,
            "num_probs_changed": probs_changed, "num_same_input": same_input, "mismatches": mismatches}


def self_replay(guard_cell: dict, problems, tokenizer, export, guard_traces, max_new_tokens: int) -> dict:
    """(c) against the replay over its own emitted tokens and its own probabilities (the guarded
    requests' trace): identical input by construction, so every stop must match. A stop decided
    before its token was emitted has no token there; any code token decides alike ("x")."""
    from guard.policy import find_stop
    from guard.syntax import gate_check

    matches, mismatches = 0, []
    for problem, row in zip(problems, guard_cell["problems"]):
        p_stops, p_dones, emitted = guard_traces[trace_key(tokenizer, problem.prompt)]
        texts = [tokenizer.decode([t]) for t in emitted]
        if row["finish_reason"] == "guard":
            stop = row["guard_stop_index"]
            texts = (texts + ["x"])[:stop + 1]  # "x": the code token a pre-decided stop replaced
            got = (stop, len(row["token_ids"]))
        else:
            texts, got = texts[:max_new_tokens], None
        check = gate_check(export.policy, problem.language, problem.prompt,
                           lambda k, ids=emitted: tokenizer.decode(ids[:k], skip_special_tokens=True))
        expected = find_stop(p_stops[:len(texts)], texts, export.policy,
                             p_dones[:len(texts)] if export.done_row is not None else None, is_complete=check)
        if expected == got:
            matches += 1
        else:
            mismatches.append({"task_id": row["task_id"], "expected": expected, "got": got})
    return {"num_problems": len(guard_cell["problems"]), "num_exact": matches, "mismatches": mismatches}


def agreement(vllm_cell: dict, engine_cell: dict) -> dict:
    """(c)'s kept text against (e)'s: equal, or one of
    - `diverged`: neither is a prefix of the other (the engines' greedy text differs before the stop),
    - `vllm_stopped_earlier` / `engine_stopped_earlier`: the same text up to the earlier stop."""
    counts = {"equal": 0, "diverged": 0, "vllm_stopped_earlier": 0, "engine_stopped_earlier": 0}
    examples = []
    for ours, theirs in zip(vllm_cell["problems"], engine_cell["problems"]):
        v, e = ours["text"], theirs["text"]
        if v == e:
            kind = "equal"
        elif e.startswith(v):
            kind = "vllm_stopped_earlier"
        elif v.startswith(e):
            kind = "engine_stopped_earlier"
        else:
            kind = "diverged"
        counts[kind] += 1
        if kind != "equal" and len(examples) < 20:
            examples.append({"task_id": ours["task_id"], "kind": kind, "vllm": v[-160:], "engine": e[-160:]})
    return {"counts": counts, "examples": examples}

