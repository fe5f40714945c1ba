"""The replay of benchmarks.full_split (evals.split_replay) and its sandbox cache: every method cut
where its rule says, over one completion, and a rerun that runs no text twice."""
from types import SimpleNamespace

from evals import split_replay
from evals.replay import guard_variants, shipped_variant
from guard.policy import StopPolicy
from models.tiny import build_tiny_tokenizer

PROMPT = "def first(xs):\n    \"\"\"The first item.\"\"\"\n"
COMPLETION = "    table = [\n        xs[0],\n    ]\n    return table[0]\n\n\nprint(first([1]))\n"
POLICY = StopPolicy(min_code_lines=1)


def row_for(tokenizer, p_stop_of_line):
    """A generated row whose p_stop is set per line of COMPLETION (one byte, one token)."""
    ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"]
    p_stops, line = [], 0
    for token_id in ids:
        p_stops.append(p_stop_of_line[line])
        line += "\n" in tokenizer.decode([token_id])
    return {"task_id": "T/1", "token_ids": ids, "finish_reason": "eos", "num_generated_tokens": len(ids) + 1,
            "p_stop": p_stops, "p_done": []}


def test_replay_cuts_each_method_where_its_rule_says():
    tokenizer = build_tiny_tokenizer()
    problem = SimpleNamespace(prompt=PROMPT)
    policies = guard_variants(POLICY)
    assert shipped_variant(policies["guard+gate"]) == "guard+gate"
    # The guard is sure from the list's second line on: it cuts the open list; the gate lets
    # the stop through at the first line start where the kept code parses: after the `]`.
    row = row_for(tokenizer, [0.0, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99])
    parse_ms = []
    methods = split_replay.replay_row(row, problem, "python", tokenizer, policies, parse_ms)
    assert methods["baseline"] == (len(row["token_ids"]) + 1, COMPLETION, COMPLETION)
    assert methods["guard"][1] == "    table = [\n"
    assert methods["guard+gate"][1] == "    table = [\n        xs[0],\n    ]\n"
    assert methods["guard+gate_stubs"] == methods["guard+gate"]  # Python bodies never close: no stub rule
    assert methods["stop_words"][1].rstrip("\n") == COMPLETION[:COMPLETION.index("\nprint")].rstrip("\n")
    # + stop words: whichever stops first
    assert methods["guard+stop_words"] == methods["guard"]
    assert methods["guard+gate+stop_words"][0] == min(methods["guard+gate"][0], methods["stop_words"][0])
    assert parse_ms  # the gate parsed only when a stop was proposed
    assert len(parse_ms) < len(row["token_ids"])


def test_sandbox_results_are_cached_by_problem_and_text(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate(batch, language, num_workers):
        calls.append(dict(batch))
        return [SimpleNamespace(task_id=task, passed="return" in text) for task, text in batch.items()]

    monkeypatch.setattr(split_replay, "evaluate", fake_evaluate)
    wanted = {"A": {"x = 1\n", "return 1\n"}, "B": {"return 2\n"}}
    cache = tmp_path / "python.jsonl"
    passed = split_replay.run_sandbox("python", {k: set(v) for k, v in wanted.items()}, cache, 2)
    assert len(calls) == 2 and sum(len(c) for c in calls) == 3  # one round per distinct text
    assert passed[split_replay.text_key("A", "return 1\n")] and not passed[split_replay.text_key("A", "x = 1\n")]
    again = split_replay.run_sandbox("python", {k: set(v) for k, v in wanted.items()}, cache, 2)
    assert again == passed and len(calls) == 2  # the rerun ran nothing


def test_a_range_inside_saved_chunks_reads_only_its_rows(tmp_path):
    import gzip
    import json

    generations = tmp_path / "generations"
    generations.mkdir()
    for start in (0, 4):
        rows = [{"task_id": f"T/{i}", "token_ids": [1]} for i in range(start, start + 4)]
        rows[1] = {"task_id": rows[1]["task_id"], "error": "prompt too long"}
        path = split_replay.chunk_path(tmp_path, "python", start, start + 4)
        path.write_bytes(gzip.compress(json.dumps({"wall_s": 8.0, "rows": rows}).encode()))
    by_id = {f"T/{i}": None for i in range(2, 6)}  # problems 2-5 of chunks 0-3 and 4-7
    rows, num_unserved, wall_s = split_replay.read_generations(tmp_path, "python", by_id, offset=2, limit=4)
    assert [row["task_id"] for row in rows] == ["T/2", "T/3", "T/4"] and num_unserved == 1  # T/5 failed
    assert wall_s == 8.0  # half of each chunk's time
    assert split_replay.read_generations(tmp_path, "python", {"T/0": None}, offset=0, limit=1)[0][0]["task_id"] == "T/0"
