"""A whole split's saved generations, every method replayed over them, and pass@1 of each.

The generations (`benchmarks.full_split`) are chunks of gzipped JSON: per served prompt its token
ids and the guard's p_stop / p_done at every position, so the replay never needs the model. Every
method (`METHODS`) stops over the same completions exactly as the engines apply it
(`evals.replay`); pass@1 runs in the sandbox once per distinct text of a problem, cached and
resumable; stops are classed against the labeler's cut of the same completion.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

from evals.pass_at_k import evaluate
from evals.replay import GUARD_VARIANTS, guard_variants, replay_completion, shipped_variant
from evals.stop_errors import classify_stop

# GenGuard without the syntax gate, with the strict gate, and with the gate that lets closed stubs
# through (guard/syntax.py `allows_stub`); each also with the stop words.
METHODS = ("baseline", "stop_words", *(m for v in GUARD_VARIANTS for m in (v, f"{v}+stop_words")))


def chunk_path(out: Path, language: str, start: int, end: int) -> Path:
    """The saved generations of one language's problems start .. end - 1."""
    return out / "generations" / f"{language}.{start:04d}-{end:04d}.json.gz"


def replay_row(row: dict, problem, language: str, tokenizer, policies: dict, parse_ms: list) -> dict:
    """method -> (tokens generated, text the method keeps, text to execute)."""
    from guard.syntax import is_complete

    ids = row["token_ids"]

    def check(num_kept: int, allows_stub: bool) -> bool:  # the gate's parse, timed
        began = time.perf_counter()
        answer = is_complete(language, problem.prompt, tokenizer.decode(ids[:num_kept]), allows_stub)
        parse_ms.append((time.perf_counter() - began) * 1e3)
        return answer

    return replay_completion(language, [tokenizer.decode(ids[:i + 1]) for i in range(len(ids))],
                             [tokenizer.decode([t]) for t in ids],  # as the processor's token table reads them
                             row["p_stop"], row["p_done"], row["num_generated_tokens"], policies,
                             is_complete_at=check)


def text_key(task_id: str, text: str) -> str:
    return hashlib.sha1(f"{task_id}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()


def run_sandbox(language: str, wanted: dict[str, set[str]], cache_path: Path, num_workers: int) -> dict:
    """passed, per (task id, text) key; runs only the texts the cache lacks, one round per
    distinct text of a problem (evaluate takes one completion per problem)."""
    passed = {}
    if cache_path.exists():
        for line in cache_path.read_text().splitlines():
            record = json.loads(line)
            passed[record["key"]] = record["passed"]
    pending = {task: [t for t in texts if text_key(task, t) not in passed] for task, texts in wanted.items()}
    while any(pending.values()):
        batch = {task: texts.pop() for task, texts in pending.items() if texts}
        results = evaluate(batch, language, num_workers=num_workers)
        with cache_path.open("a") as f:
            for result in results:
                key = text_key(result.task_id, batch[result.task_id])
                passed[key] = result.passed
                f.write(json.dumps({"key": key, "passed": result.passed}) + "\n")
    return passed


def read_generations(out: Path, language: str, by_id: dict, offset: int, limit: int) -> tuple[list, int, float]:
    """(served rows, number not served, generation wall seconds) of the problems in `by_id`
    (problems offset .. offset + limit - 1) from the saved chunks, which may be cut differently:
    a chunk that overlaps the range gives its rows in it and its share of the wall time."""
    rows, num_unserved, wall_s = [], 0, 0.0
    for path in sorted((out / "generations").glob(f"{language}.*.json.gz")):
        start, end = (int(x) for x in path.name.split(".")[1].split("-"))
        if start < offset + limit and offset < end:
            chunk = json.loads(gzip.decompress(path.read_bytes()))
            in_range = [row for row in chunk["rows"] if row["task_id"] in by_id]
            num_unserved += sum("error" in row for row in in_range)
            rows += [row for row in in_range if "error" not in row]
            wall_s += chunk["wall_s"] * len(in_range) / max(1, len(chunk["rows"]))
    return rows, num_unserved, wall_s


def replay(args, out: Path, problems: dict) -> dict:
    from transformers import AutoTokenizer

    from guard.export import GuardExport, export_folder_for
    from guard.syntax import is_complete

    folder = export_folder_for(args.model, args.guard)
    tokenizer, export = AutoTokenizer.from_pretrained(folder), GuardExport.load(folder)
    policies = guard_variants(export.policy)
    summary, early_stops, parse_ms = {}, [], []
    (out / "sandbox").mkdir(parents=True, exist_ok=True)
    for language in args.languages:
        by_id = {p.task_id: p for p in problems[language]}
        rows, num_unserved, wall_s = read_generations(out, language, by_id, args.offset, args.limit)
        if num_unserved:
            summary.setdefault("num_unserved", {})[language] = num_unserved
        if len(rows) < len(problems[language]):
            print(f"[replay] {language}: {len(rows)} of {len(problems[language])} generated and served;"
                  " replaying those")
        if not rows:
            continue
        replayed = {row["task_id"]: replay_row(row, by_id[row["task_id"]], language, tokenizer, policies, parse_ms)
                    for row in rows}
        wanted = {task: {m[2] for m in methods.values()} for task, methods in replayed.items()}
        passed = run_sandbox(language, wanted, out / "sandbox" / f"{language}.jsonl", args.num_workers)
        for method in METHODS:
            outcomes = Counter()
            for row in rows:
                task = row["task_id"]
                num_tokens, kept, executed = replayed[task][method]
                outcomes["tokens"] += num_tokens
                outcomes["passed"] += passed[text_key(task, executed)]
                if method == "baseline":
                    continue
                full = replayed[task]["baseline"][1]
                # Classed by the text the user gets: a stop word's stop puts back the closing
                # brace it removed (finish_completion), so `kept` alone would look cut short.
                outcome = classify_stop(language, by_id[task], full, executed,
                                        ends_at_eos=row["finish_reason"] == "eos")
                outcomes[outcome] += 1
                if outcome == "early":
                    # "parses": no syntax error or open block; a closed stub parses
                    parses = is_complete(language, by_id[task].prompt, executed, allows_stub=True)
                    outcomes["early_unparseable"] += not parses
                    if method in GUARD_VARIANTS:
                        early_stops.append({"method": method, "language": language, "task_id": task,
                                            "kept_parses": parses,
                                            "last_kept_line": kept.rstrip("\n").rsplit("\n", 1)[-1].strip(),
                                            "cut_line": full[len(kept):].lstrip("\n").split("\n", 1)[0].strip()})
            summary.setdefault(method, {})[language] = {
                "num_problems": len(rows), "num_tokens": outcomes.pop("tokens"),
                "pass_at_1": outcomes.pop("passed") / len(rows), **outcomes}
        summary.setdefault("generation_wall_s", {})[language] = wall_s
    parse_ms.sort()
    cost = {"num_parses": len(parse_ms),
            "parse_ms_median": parse_ms[len(parse_ms) // 2] if parse_ms else 0.0,
            "parse_ms_p95": parse_ms[int(0.95 * (len(parse_ms) - 1))] if parse_ms else 0.0}
    return {"summary": summary, "early_stops": early_stops, "gate_cost": cost,
            "shipped": shipped_variant(export.policy)}

