"""Batch jobs without Ray: reading corpora, per-row settings and samples, the two workers called
directly. Fast; the Ray end-to-end runs are in test_jobs.py."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from backends.spec import BackendSpec
from engine.params import SamplingParams
from jobs.corpus import JsonlLayout, open_corpus, prompt_hash_id, with_row_ids
from jobs.engine_worker import BackendWorker
from jobs.generate import JobConfig, actor_pool, main, parse_args
from jobs.http_worker import HttpWorker, ServeSpec
from jobs.rows import (
    GENERATED_SCHEMA,
    INPUT_ERROR_COLUMN,
    PROMPT_UTF8_COLUMN,
    RowSettings,
    plan_requests,
    row_params,
    stable_seed,
)
from jobs.storage import resolve
from models.tiny import TINY_MODEL_NAME

LONE_SURROGATE = "\ud800"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    # json.dumps escapes a lone surrogate as \ud800, exactly as a producer of such a file would.
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rows_by_id(table: pa.Table, id_column: str = "id") -> dict:
    return {(row[id_column], row["sample_index"]): row for row in table.to_pylist()}


# ---- reading corpora ---------------------------------------------------------------------------
def test_jsonl_rows_arrow_cannot_hold_become_error_rows_and_columns_keep_their_types(tmp_path):
    records = [{"id": 1, "prompt": "a", "score": 1, "tags": ["x"], "meta": {"k": 1}, "temperature": 0},
               {"id": "two", "prompt": 12, "score": 2, "tags": [], "meta": None},
               {"id": 3.5, "prompt": LONE_SURROGATE, "score": "high", "temperature": "hot"},
               {"prompt": "no id", "score": None, "temperature": 0.5}]
    layout = JsonlLayout.infer(records[:2], "prompt", "id")  # types from the first lines only
    table = layout.to_table(records)
    assert table.schema.field("score").type == pa.int64() and table.schema.field("temperature").type == pa.float64()
    assert table.schema.field("tags").type == pa.list_(pa.string())
    assert table.column("id").to_pylist() == ["1", "two", "3.5", None]  # JSON ids are text
    assert table.column("prompt").to_pylist() == ["a", None, None, "no id"]
    assert table.column("temperature").to_pylist() == [0.0, None, None, 0.5]
    assert table.column(INPUT_ERROR_COLUMN).to_pylist() == [
        None, "prompt must be a string, got int", "column 'score': string \"high\" is not int64", None]
    # The lone surrogate travels as bytes; the backend refuses it (tested with the worker below).
    assert table.column(PROMPT_UTF8_COLUMN).to_pylist()[2].decode("utf-8", "surrogatepass") == LONE_SURROGATE


def test_open_corpus_refuses_bad_inputs_with_one_clear_line_before_any_work(tmp_path):
    import datasets

    good = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "prompt": "x"}])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_corpus(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown URI scheme 'foo'.*s3://"):
        open_corpus("foo://bucket/c.jsonl")
    with pytest.raises(ValueError, match="has no column 'text'.*id, prompt"):
        open_corpus(str(good), prompt_column="text")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        open_corpus(str(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match="'completion' would be overwritten"):
        open_corpus(str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "completion": "y"}])))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="cannot read .*bad.parquet"):
        open_corpus(str(tmp_path / "bad.parquet"))
    splits = {name: datasets.Dataset.from_dict({"text": ["def a():\n", "def b():\n"]}) for name in ("train", "test")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="^split 'tset' not found in .*ds; its splits are: train, test$"):
        open_corpus(str(tmp_path / "ds"), prompt_column="text", split="tset")
    with pytest.raises(ValueError, match="has splits train, test; pick one with --split"):
        open_corpus(str(tmp_path / "ds"), prompt_column="text")
    with pytest.raises(ValueError, match="--split applies to a datasets folder"):
        open_corpus(str(good), split="train")
    corpus = open_corpus(str(tmp_path / "ds"), prompt_column="text", split="test")
    assert corpus.kind == "hf" and corpus.is_id_derived and corpus.num_rows == 2
    # The CLI prints that line alone (exit 2) instead of a traceback.
    assert main(["--input", str(tmp_path / "ds"), "--output", str(tmp_path / "out"),
                 "--prompt-column", "text", "--split", "tset", "--model", TINY_MODEL_NAME]) == 2


def test_prompt_hash_ids_are_stable_across_row_order_and_sources(tmp_path):
    prompts = ["def a():\n", "def b():\n"]
    block = with_row_ids(pa.table({"prompt": prompts}), "id", "prompt")
    assert block.column("id").to_pylist() == [prompt_hash_id(p) for p in prompts]
    layout = JsonlLayout.infer([{"prompt": p} for p in prompts], "prompt", "id")
    assert layout.is_id_derived
    reversed_ids = layout.to_table([{"prompt": p} for p in prompts[::-1]]).column("id").to_pylist()
    assert reversed_ids == block.column("id").to_pylist()[::-1]
    assert prompt_hash_id(12) != prompt_hash_id("12")


def test_uris_resolve_to_pyarrow_filesystems():
    local = resolve("out/dir")
    assert local.is_local and local.path.endswith("/out/dir")
    s3 = resolve("s3://bucket/out?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1")
    assert s3.path == "bucket/out" and type(s3.filesystem).__name__ == "S3FileSystem"
    assert resolve("file:///tmp/x").is_local


# ---- per-row settings and samples --------------------------------------------------------------
def test_per_row_settings_override_the_job_and_bad_values_become_error_rows():
    settings = RowSettings(SamplingParams(max_new_tokens=8, temperature=0.7, seed=None, stop=("\n\n",)),
                           num_samples=3, is_guard_available=False)
    batch = pa.table({"id": ["a", "b", "c", "d", "e"], "prompt": ["p"] * 5,
                      "max_tokens": [None, 3, None, 0, None], "seed": [None, 11, None, None, None],
                      "stop": [None, ["X", "Y"], None, None, None],
                      "top_p": [None, 0.5, None, None, 2.0],
                      "guard": [None, "off", "on", None, None]})
    requests = plan_requests(batch, settings)
    assert [(r.row_index, r.sample_index) for r in requests] == [(i, s) for i in range(5) for s in range(3)]
    by_row = {i: [r for r in requests if r.row_index == i] for i in range(5)}
    a_seeds = [r.params.seed for r in by_row[0]]
    assert len(set(a_seeds)) == 3 and a_seeds[0] == stable_seed("a")  # distinct, reproducible
    b = by_row[1][0].params
    assert (b.max_new_tokens, b.top_p, b.stop, b.use_guard) == (3, 0.5, ("X", "Y"), False)
    assert [r.params.seed for r in by_row[1]] == [11, 12, 13]
    assert all("guard 'on' asked, but this job runs without a guard" in r.error for r in by_row[2])
    assert all("max_tokens must be an integer" in r.error for r in by_row[3])
    assert all("top_p must be in (0, 1]" in r.error for r in by_row[4])
    assert by_row[0][0].params.stop == ("\n\n",) and by_row[0][0].params.max_new_tokens == 8
    # A language column sets the syntax gate's language: names and aliases, any case; a language
    # the gate cannot parse is kept (it goes ungated, never guessed); blank or null leaves it to
    # the prompt's guess; a non-string is an error.
    languages = pa.table({"id": ["a", "b", "c", "d", "e"], "prompt": ["p"] * 5,
                          "language": ["Python", "C++", "rust", " ", None]})
    planned = plan_requests(languages, RowSettings(SamplingParams()))
    assert [r.params.language for r in planned] == ["python", "cpp", "rust", None, None]
    with pytest.raises(ValueError, match="language must be a string"):
        row_params({"language": 3}, RowSettings(SamplingParams()))
    # One sample, no seed anywhere: unseeded, as before per-row settings existed.
    single = plan_requests(batch.slice(0, 1), RowSettings(SamplingParams(temperature=0.7)))
    assert single[0].params.seed is None


def test_job_config_is_validated_at_the_edge(tmp_path):
    base = dict(input="in.jsonl", output=str(tmp_path / "out"), model=TINY_MODEL_NAME, guard=None)
    for bad, match in [(dict(max_actors=1, min_actors=2), "max_actors"), (dict(num_samples=0), "num_samples"),
                       (dict(seed=2**64), "seed"), (dict(backend="tgi"), "backend"),
                       (dict(top_p=0.0), "top_p"), (dict(batches_per_actor=0), "batches_per_actor"),
                       (dict(serve_url="ftp://x"), "serve url")]:
        with pytest.raises(ValueError, match=match):
            JobConfig.from_args({**base, **bad})
    config, _ = parse_args(["--input", "x.jsonl", "--output", "o", "--num-actors", "3", "--backend", "vllm"])
    assert (config.min_actors, config.max_actors, config.engine.backend) == (3, 3, "vllm")
    config, _ = parse_args(["--input", "x.jsonl", "--output", "o", "--min-actors", "1", "--max-actors", "4",
                            "--batches-per-actor", "3"])
    pool = actor_pool(config)  # what Ray gets: 1..4 actors, 3 calls running each, up to 6 in flight
    assert (pool.min_size, pool.max_size, pool.max_concurrent_calls_per_actor) == (1, 4, 3)
    assert pool.max_tasks_in_flight_per_actor is None and pool.enable_true_multi_threading


# ---- the engine-actor worker, called directly --------------------------------------------------
def tiny_worker(settings: RowSettings, **spec) -> BackendWorker:
    spec = {"model": TINY_MODEL_NAME, "guard": None, "dtype": "float32", "device": "cpu", "max_num_seqs": 4, **spec}
    return BackendWorker(BackendSpec(**spec), settings)


def test_worker_keeps_input_columns_and_turns_refused_or_failing_rows_into_error_rows():
    settings = RowSettings(SamplingParams(max_new_tokens=6), num_samples=2)
    worker = tiny_worker(settings)
    real_submit = worker.backend.submit

    def submit(prompt, params, request_id=None):  # a row that makes the engine raise
        future = real_submit(prompt, params, request_id)
        if prompt == "def boom():\n":
            future = type(future)()
            future.set_exception(RuntimeError("step failed for this sequence"))
        return future

    worker.backend.submit = submit
    batch = pa.table({"id": pa.array([7, 8, 9, 10], pa.int64()), "prompt": ["def f():\n", None, "", "def boom():\n"],
                      "tests": [["assert f()"], [], None, ["x"]], "source": ["mbpp", "he", "x", "y"],
                      PROMPT_UTF8_COLUMN: pa.array([None, LONE_SURROGATE.encode("utf-8", "surrogatepass"),
                                                    None, None], pa.binary())})
    try:
        table = worker(batch)
    finally:
        worker.backend.shutdown()
    assert table.column_names == ["id", "prompt", "tests", "source", *GENERATED_SCHEMA.names]
    assert table.schema.field("id").type == pa.int64() and table.schema.field("tests").type == pa.list_(pa.string())
    rows = rows_by_id(table)
    assert len(rows) == 8  # (id, sample) unique
    assert all(rows[(7, s)]["error"] is None and rows[(7, s)]["num_generated_tokens"] >= 1 for s in (0, 1))
    assert rows[(7, 0)]["tests"] == ["assert f()"] and rows[(7, 1)]["source"] == "mbpp"
    # The tokenizer cannot take a lone surrogate: the backend refuses it (PromptError), one row.
    assert "surrogate" in rows[(8, 0)]["error"] and rows[(8, 1)]["completion"] is None
    assert rows[(9, 0)]["error"] == "prompt is empty"
    assert rows[(10, 0)]["error"] == "engine error: RuntimeError: step failed for this sequence"


def test_worker_runs_concurrent_batch_calls_in_the_same_decode_steps():
    """Ray Data gives an actor two batches at once; the second must fill the slots the first
    leaves free instead of waiting for the first batch's longest sequence."""
    worker = tiny_worker(RowSettings(SamplingParams(max_new_tokens=200, ignore_eos=True)))
    outputs: dict[str, pa.Table] = {}

    def run(key: str, prompts: list) -> None:
        outputs[key] = worker(pa.table({"id": [f"{key}{i}" for i in range(len(prompts))], "prompt": prompts}))

    threads = [threading.Thread(target=run, args=("a", ["def f1():\n", "def f2():\n"])),
               threading.Thread(target=run, args=("b", ["def f3():\n", "", "def f4():\n"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    stats = worker.backend.stats()
    worker.backend.shutdown()
    rows = {**rows_by_id(outputs["a"]), **rows_by_id(outputs["b"])}
    assert rows[("b1", 0)]["error"] == "prompt is empty"
    assert all(rows[(i, 0)]["num_generated_tokens"] == 200 for i in ("a0", "a1", "b0", "b2"))
    assert stats["max_decode_batch_size"] == 4  # both batches' four sequences decoded together


# ---- the Serve worker against a stub of the deployment's HTTP API ------------------------------
class StubServer:
    """OpenAI-style /v1/completions: text = prompt upper-cased (cut to max_tokens); "guard" finish
    when the guard is on and the prompt asks for it; 400 for empty/long prompts and for text the
    tokenizer cannot take (a lone surrogate), as the deployment answers; "flaky" prompts get a
    503 first; "down" prompts always get a 503."""

    def __init__(self):
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        self.bodies: list[dict] = []
        self.flaky_seen: set[str] = set()
        app = FastAPI()

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": "stub"}]}

        @app.post("/v1/completions")
        def completions(body: dict):
            self.bodies.append(body)
            prompt = body["prompt"]
            if not isinstance(prompt, str) or not prompt or len(prompt) > 100:
                return JSONResponse({"error": {"message": "bad prompt"}}, status_code=400)
            if any(0xD800 <= ord(c) <= 0xDFFF for c in prompt):
                return JSONResponse({"error": {"message": "prompt is not valid Unicode text"}}, status_code=400)
            if prompt.startswith("down") or (prompt.startswith("flaky") and prompt not in self.flaky_seen):
                self.flaky_seen.add(prompt)
                return JSONResponse({"error": {"message": "busy"}}, status_code=503)
            is_guard = body.get("guard") == "on" and "excess" in prompt
            text = prompt.upper()[:body["max_tokens"]]
            return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "stub",
                    "choices": [{"text": text, "index": 0, "finish_reason": "guard" if is_guard else "length"}],
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(text),
                              "total_tokens": len(prompt) + len(text),
                              "guard_dropped_tokens": 2 if is_guard else 0}}

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "stub server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> StubServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def stub_server():
    with StubServer() as server:
        yield server


def test_http_worker_sends_every_setting_retries_server_errors_and_keeps_prompt_errors(stub_server):
    settings = RowSettings(SamplingParams(max_new_tokens=4, temperature=0.5, top_p=0.9, seed=5), num_samples=2)
    worker = HttpWorker(ServeSpec(stub_server.url, max_retries=1), settings)
    batch = pa.table({"id": ["1", "2", "3"], "prompt": ["flaky one", None, "plain"],
                      "seed": [None, None, 40], "stop": [None, None, ["\n"]], "guard": [None, None, "off"],
                      "language": ["python", None, None],
                      PROMPT_UTF8_COLUMN: pa.array([None, LONE_SURROGATE.encode("utf-8", "surrogatepass"), None])})
    rows = rows_by_id(worker(batch))
    assert rows[("1", 0)]["completion"] == "FLAK" and rows[("1", 0)]["error"] is None  # the 503 was retried
    # The lone surrogate reached the server (ASCII-escaped JSON) and its 400 became an error row.
    assert rows[("2", 1)]["error"] == "HTTP 400: prompt is not valid Unicode text"
    plain = sorted((b for b in stub_server.bodies if b["prompt"] == "plain"), key=lambda b: b["seed"])
    assert plain == [{"model": None, "prompt": "plain", "max_tokens": 4, "temperature": 0.5, "top_p": 0.9,
                      "seed": seed, "stop": ["\n"], "guard": "off"} for seed in (40, 41)]
    assert {b["seed"] for b in stub_server.bodies if b["prompt"] == "flaky one"} == {5, 6}
    assert {b["language"] for b in stub_server.bodies if b["prompt"] == "flaky one"} == {"python"}
    with pytest.raises(RuntimeError, match="503"):
        worker(pa.table({"id": ["4"], "prompt": ["down"]}))
