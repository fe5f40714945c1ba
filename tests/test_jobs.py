"""Ray Data batch generation (jobs/): corpora in, one row per id out, resume, Serve mode, job
submission, cluster.yaml. All on the tiny model with few new tokens."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from engine import Engine, EngineConfig, SamplingParams
from engine.tiny import TINY_MODEL_NAME
from guard.policy import StopPolicy
from jobs.corpus import load_corpus, prompt_hash_id
from jobs.engine_worker import EngineSpec, EngineWorker
from jobs.generate import JobConfig, _stream_to_shards, parse_args, run_job
from jobs.http_worker import HttpWorker, ServeSpec
from jobs.progress import Progress
from jobs.shards import OUTPUT_SCHEMA, ShardWriter, read_done_ids, read_output, remove_stale_tmp_files
from scripts.ray_local import RAY_LOCAL_ENV
from tests.conftest import REPO_ROOT
from tests.helpers import constant_guard

NUM_ROWS = 200
TOO_LONG_PROMPT = "x" * 600  # the tiny model's context is 512 tokens (one byte = one token)
BAD_PROMPTS = {"bad-empty": ("", "prompt is empty"), "bad-int": (12, "got int"),
               "bad-null": (None, "got NoneType"), "bad-long": (TOO_LONG_PROMPT, "context")}


def good_prompt(i: int) -> str:
    return f"def func_{i}(x):\n    return x + {i}\n" + "#" * (i % 7)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_config(tmp_path: Path, input_path: Path, **overrides) -> JobConfig:
    settings = dict(input=str(input_path), output=str(tmp_path / "out"), model=TINY_MODEL_NAME,
                    guard=None, max_new_tokens=8, dtype="float32", batch_size=16, max_num_seqs=8,
                    shard_size=64, progress_interval_s=1.0,
                    # Half a CPU per actor: other test files' Serve replicas may hold CPUs of the
                    # shared session Ray, and a pool that cannot start would wait forever.
                    num_cpus_per_actor=0.5)
    return JobConfig(**{**settings, **overrides})


def assert_one_row_per_id(output_dir: Path, expected_ids: set[str]) -> pa.Table:
    table = read_output(output_dir)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id was written twice"
    assert set(ids) == expected_ids
    return table


def rows_by_id(table: pa.Table) -> dict[str, dict]:
    return {row["id"]: row for row in table.to_pylist()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- no Ray ------------------------------------------------------------------------------------
def test_corpus_keeps_first_of_duplicate_ids_and_skips_rows_without_id(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"id": 1, "prompt": "a"}, {"id": 2, "prompt": 5}, {"id": 1, "prompt": "again"},
        {"id": None, "prompt": "no id"}, {"id": "x", "prompt": "b"}])
    corpus = load_corpus(path)
    assert [(r.id, r.prompt) for r in corpus.rows] == [("1", "a"), ("2", 5), ("x", "b")]
    assert corpus.duplicate_ids == ["1"] and corpus.num_missing_ids == 1
    assert corpus.num_input_rows == 5 and not corpus.is_id_derived


def test_corpus_without_id_column_uses_stable_prompt_hashes(tmp_path):
    import datasets

    prompts = ["def a():\n", "def b():\n", "def a():\n"]
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": prompts})}).save_to_disk(
        str(tmp_path / "ds"))
    two_splits = {name: datasets.Dataset.from_dict({"text": prompts}) for name in ("a", "b")}
    datasets.DatasetDict(two_splits).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match="--split"):
        load_corpus(tmp_path / "two", prompt_column="text")
    assert len(load_corpus(tmp_path / "two", prompt_column="text", split="b").rows) == 2
    corpus = load_corpus(tmp_path / "ds", prompt_column="text")
    assert corpus.is_id_derived and corpus.num_duplicates == 1
    assert [r.id for r in corpus.rows] == [prompt_hash_id("def a():\n"), prompt_hash_id("def b():\n")]
    reordered = load_corpus(write_jsonl(tmp_path / "r.jsonl", [{"text": p} for p in prompts[::-1]]),
                            prompt_column="text")
    assert {r.id for r in reordered.rows} == {r.id for r in corpus.rows}
    assert prompt_hash_id(12) != prompt_hash_id("12")


def test_shards_are_numbered_after_existing_ones_and_temp_files_are_ignored(tmp_path):
    row = {name: None for name in OUTPUT_SCHEMA.names} | {"id": "a", "is_guard_stop": False}
    ShardWriter(tmp_path).write(pa.Table.from_pylist([row], schema=OUTPUT_SCHEMA))
    (tmp_path / ".tmp-part-00007.parquet").write_bytes(b"torn")  # left by a killed run
    writer = ShardWriter(tmp_path)
    path = writer.write(pa.Table.from_pylist([row | {"id": "b"}], schema=OUTPUT_SCHEMA))
    assert path.name == "part-00001.parquet"
    assert read_done_ids(tmp_path) == {"a", "b"}
    assert remove_stale_tmp_files(tmp_path) == 1 and not list(tmp_path.glob(".tmp-*"))


def test_an_interrupted_stream_writes_the_rows_it_already_has(tmp_path):
    def block(ids):
        return pa.Table.from_pylist([{"id": i, "is_guard_stop": False} for i in ids], schema=OUTPUT_SCHEMA)

    class InterruptedDataset:
        def iter_batches(self, **kwargs):
            yield block(["a", "b"])
            yield block(["b", "c"])  # "b" again (a retried task): must not be written twice
            raise KeyboardInterrupt

    config = JobConfig(input="unused", output=str(tmp_path), shard_size=100)
    with pytest.raises(KeyboardInterrupt):
        _stream_to_shards(InterruptedDataset(), config, ShardWriter(tmp_path), set(), Progress(3))
    assert sorted(read_output(tmp_path).column("id").to_pylist()) == ["a", "b", "c"]


# ---- a stub of the Serve deployment's HTTP API -------------------------------------------------
class StubServer:
    """OpenAI-style /v1/completions: text = prompt upper-cased (cut to max_tokens); "guard" finish
    when the guard is on and the prompt asks for it; 400 for empty/long prompts; "flaky" prompts
    get a 503 first; "down" prompts always get a 503."""

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
                return JSONResponse({"error": {"message": "bad prompt", "type": "invalid_request_error"}},
                                    status_code=400)
            if prompt.startswith("down") or (prompt.startswith("flaky") and prompt not in self.flaky_seen):
                self.flaky_seen.add(prompt)
                return JSONResponse({"error": {"message": "busy"}}, status_code=503)
            is_guard = body.get("guard") == "on" and "excess" in prompt
            text = prompt.upper()[:body["max_tokens"]]
            return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "stub",
                    "choices": [{"text": text, "index": 0,
                                 "finish_reason": "guard" if is_guard else "length"}],
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(text),
                              "total_tokens": len(prompt) + len(text),
                              "guard_dropped_tokens": 2 if is_guard else 0}}

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "stub server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def stub_server():
    server = StubServer()
    yield server
    server.stop()


def test_http_worker_retries_server_errors_and_fails_when_they_persist(stub_server):
    worker = HttpWorker(ServeSpec(stub_server.url, max_tokens=4, max_retries=1))
    batch = pa.Table.from_pylist([{"id": "1", "prompt": "flaky one", "prompt_type": "str"}])
    row = worker(batch).to_pylist()[0]
    assert row["completion"] == "FLAK" and row["error"] is None  # the 503 was retried
    with pytest.raises(RuntimeError, match="503"):
        worker(pa.Table.from_pylist([{"id": "2", "prompt": "down", "prompt_type": "str"}]))


# ---- jobs on the session Ray -------------------------------------------------------------------
def test_jsonl_corpus_gives_one_row_per_id_and_bad_prompts_become_error_rows(ray_session, tmp_path):
    records = [{"id": f"r{i}", "prompt": good_prompt(i)} for i in range(NUM_ROWS - len(BAD_PROMPTS))]
    records += [{"id": key, "prompt": prompt} for key, (prompt, _) in BAD_PROMPTS.items()]
    records.append({"id": "r0", "prompt": "a duplicate id: ignored"})
    config = tiny_config(tmp_path, write_jsonl(tmp_path / "corpus.jsonl", records))
    summary = run_job(config)
    table = assert_one_row_per_id(Path(config.output), {r["id"] for r in records})
    assert table.num_rows == NUM_ROWS and summary["num_rows"] == NUM_ROWS
    assert summary["num_duplicate_ids"] == 1 and summary["num_errors"] == len(BAD_PROMPTS)
    rows = rows_by_id(table)
    for key, (_, message) in BAD_PROMPTS.items():
        assert message in rows[key]["error"] and rows[key]["completion"] is None
    good = [rows[f"r{i}"] for i in range(NUM_ROWS - len(BAD_PROMPTS))]
    assert all(r["error"] is None and 1 <= r["num_generated_tokens"] <= 8 for r in good)
    assert rows["r0"]["prompt"] == good_prompt(0)  # the first of the duplicate ids was kept
    assert summary["num_generated_tokens"] == sum(r["num_generated_tokens"] for r in good)
    # The actors generate exactly what the engine generates when called directly (greedy).
    engine = Engine.from_pretrained(TINY_MODEL_NAME, guard=None,
                                    config=EngineConfig(max_num_seqs=8, dtype="float32"))
    direct = engine.generate([good_prompt(i) for i in range(10)], SamplingParams(max_new_tokens=8))
    assert [rows[f"r{i}"]["completion"] for i in range(10)] == [r.text for r in direct]


def test_parquet_corpus_with_a_guard_then_a_rerun_has_nothing_left(ray_session, tmp_path):
    guard_dir = tmp_path / "guard"
    # Votes "stop" on every token: each sequence ends after 3 tokens (unless EOS comes first).
    constant_guard(10.0, StopPolicy(kind="token", num_consecutive=3, max_blank_lines=0)).save(guard_dir)
    prompts = [good_prompt(i) for i in range(NUM_ROWS - 1)] + [None]
    pq.write_table(pa.table({"id": list(range(NUM_ROWS)), "prompt": prompts}), tmp_path / "c.parquet")
    config = tiny_config(tmp_path, tmp_path / "c.parquet", guard=str(guard_dir), num_actors=2)
    summary = run_job(config)
    rows = rows_by_id(assert_one_row_per_id(Path(config.output), {str(i) for i in range(NUM_ROWS)}))
    assert "got NoneType" in rows[str(NUM_ROWS - 1)]["error"]
    stopped = [r for r in rows.values() if r["is_guard_stop"]]
    assert len(stopped) >= NUM_ROWS - 10 and summary["num_guard_stops"] == len(stopped)
    assert all(r["finish_reason"] == "guard" and r["num_generated_tokens"] == 3 for r in stopped)
    again = run_job(config)
    assert again["num_rows"] == 0 and again["num_already_done"] == NUM_ROWS
    assert read_output(config.output).num_rows == NUM_ROWS


def test_serve_url_mode_sends_each_row_to_the_deployment(ray_session, tmp_path, stub_server):
    records = [{"id": i, "prompt": f"prompt {i}" + (" excess" if i % 3 == 0 else "")} for i in range(30)]
    records += [{"id": "empty", "prompt": ""}, {"id": "number", "prompt": 7}]
    config = tiny_config(tmp_path, write_jsonl(tmp_path / "c.jsonl", records), model="default",
                         guard="default", serve_url=stub_server.url, http_concurrency=4, stop=("\n\n",))
    summary = run_job(config)
    rows = rows_by_id(assert_one_row_per_id(Path(config.output), {str(r["id"]) for r in records}))
    assert rows["3"]["completion"] == "PROMPT 3" and rows["3"]["is_guard_stop"]
    assert rows["3"]["num_generated_tokens"] == 8 + 2  # returned tokens + the cut excess line
    assert rows["4"]["finish_reason"] == "length" and not rows["4"]["is_guard_stop"]
    assert "HTTP 400: bad prompt" in rows["empty"]["error"] and "got int" in rows["number"]["error"]
    assert summary["num_guard_stops"] == 10 and summary["num_errors"] == 2
    sent = [b for b in stub_server.bodies if b["prompt"] == "prompt 1"]
    assert sent == [{"model": None, "prompt": "prompt 1", "max_tokens": 8, "temperature": 0.0,
                     "stop": ["\n\n"], "guard": "on"}]


# ---- jobs as separate processes ----------------------------------------------------------------
def job_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | RAY_LOCAL_ENV
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def job_argv(input_path: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--input", str(input_path), "--output", str(output_dir), "--model", TINY_MODEL_NAME,
            "--guard", "none", "--dtype", "float32", "--progress-interval", "2", *extra]


@pytest.mark.ray
def test_a_killed_job_rerun_gives_exactly_one_row_per_id(ray_session, tmp_path):
    records = [{"id": i, "prompt": good_prompt(i)} for i in range(NUM_ROWS)]
    argv = job_argv(write_jsonl(tmp_path / "c.jsonl", records), tmp_path / "out",
                    "--max-new-tokens", "48", "--batch-size", "4", "--max-num-seqs", "4",
                    "--shard-size", "20", "--ray-num-cpus", "2")
    # Its own session, so the kill also takes down the local Ray it started (and only that).
    job = subprocess.Popen([sys.executable, "-m", "jobs.generate", *argv], cwd=REPO_ROOT,
                           env=job_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not read_done_ids(tmp_path / "out") and job.poll() is None:
            assert time.monotonic() < deadline, "no shard within 120 s"
            time.sleep(0.1)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)  # a crash: no chance to flush anything
        job.wait(timeout=30)
    num_done = len(read_done_ids(tmp_path / "out"))
    assert 0 < num_done < NUM_ROWS, "the job was not killed midway"
    config, _ = parse_args(argv)  # the very same command, rerun (here on the session Ray)
    summary = run_job(config)
    assert summary["num_already_done"] == num_done and summary["num_rows"] == NUM_ROWS - num_done
    assert_one_row_per_id(tmp_path / "out", {str(i) for i in range(NUM_ROWS)})


class LocalHead:
    """`ray start --head --block` with the dashboard (Jobs API), on free ports and its own temp
    folder; stopped by signalling that process alone — `ray stop` would kill every Ray here."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: socket paths are capped
        self.dashboard_url = f"http://127.0.0.1:{free_port()}"
        ray_cli = Path(sys.executable).with_name("ray")
        command = [str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", "--block",
                   "--port", str(free_port()), "--num-cpus", "4", "--node-ip-address", "127.0.0.1",
                   "--disable-usage-stats", "--include-dashboard", "true",
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", self.dashboard_url.rsplit(":", 1)[1],
                   "--ray-client-server-port", str(free_port()),
                   "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", self.temp_dir]
        self.log = open(Path(self.temp_dir) / "head.log", "w")
        # No drain on SIGTERM: nothing here needs a graceful hand-over, and it costs 30 s.
        env = job_env() | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.process = subprocess.Popen(command, env=env, start_new_session=True,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 90) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, Path(self.log.name).read_text()[-2000:]
            try:
                if httpx.get(self.dashboard_url + "/api/version", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("the Ray head's dashboard did not come up")

    def stop(self) -> None:
        import shutil

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # `ray start --block` then stops its children
            try:
                self.process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.mark.ray
def test_a_job_submitted_through_the_ray_jobs_api_writes_its_output(tmp_path):
    records = [{"id": i, "prompt": good_prompt(i)} for i in range(40)]
    argv = job_argv(write_jsonl(tmp_path / "c.jsonl", records), tmp_path / "out", "--max-new-tokens", "8")
    head = LocalHead()
    try:
        head.wait_ready()
        ray_cli = Path(sys.executable).with_name("ray")
        submit = subprocess.run(
            [str(ray_cli) if ray_cli.exists() else "ray", "job", "submit", "--address", head.dashboard_url,
             "--working-dir", ".", "--", sys.executable, "-m", "jobs.generate", *argv],
            cwd=REPO_ROOT, env=job_env(), capture_output=True, text=True, timeout=240)
    finally:
        head.stop()
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout + submit.stderr and "SUMMARY" in submit.stdout
    table = assert_one_row_per_id(tmp_path / "out", {str(i) for i in range(40)})
    assert all(e is None for e in table.column("error").to_pylist())


# ---- cluster.yaml ------------------------------------------------------------------------------
def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before launching
    validate_config(prepared)
    gpu_nodes = [t for t in prepared["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_nodes and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_nodes)
    setup = " && ".join(prepared["setup_commands"])
    assert "torch==2.13.0" in setup and "download.pytorch.org/whl/cu" in setup
    assert setup.index("torch==2.13.0") < setup.index("requirements.txt")  # CUDA torch first
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_wrokers"] = 1  # the validator does catch typos
    with pytest.raises(Exception, match="min_wrokers"):
        validate_config(prepare_config(broken))


def test_guard_samples_job_writes_the_samples_guard_build_reads(ray_session, tmp_path):
    from engine.tiny import build_tiny_tokenizer
    from evals.mbxp import load_problems, split_problems
    from guard.sampling import read_jsonl
    from jobs.guard_samples import job_dir, sample_with_ray

    settings = dict(model=TINY_MODEL_NAME, max_new_tokens=8, dtype="float32", batch_size=8,
                    max_num_seqs=4, num_cpus_per_actor=0.5, progress_interval_s=1.0)
    languages, temperatures = ["python", "cpp"], [0.0, 0.7]
    paths = sample_with_ray(tmp_path, languages, 3, temperatures, settings, log=lambda line: None)
    tokenizer = build_tiny_tokenizer()
    for language in languages:
        rows = read_jsonl(paths[language])
        expected_ids = {p.task_id for p in split_problems(load_problems(language), "train")[:3]}
        assert sorted(r["temperature"] for r in rows) == [0.0] * 3 + [0.7] * 3
        assert {r["task_id"] for r in rows} == expected_ids
        for row in rows:
            assert row["language"] == language and row["entry_point"]
            assert 1 <= len(row["completion_ids"]) <= 8
            assert tokenizer.decode(row["completion_ids"], skip_special_tokens=True) == row["completion"]
    # Each temperature was one resumable job; a rerun with the samples in place starts none.
    assert all(read_output(job_dir(tmp_path, t)).num_rows == 6 for t in temperatures)
    lines = []
    sample_with_ray(tmp_path, languages, 3, temperatures, settings, log=lines.append)
    assert lines == ["[guard_samples] every language already has its samples file"]


def test_engine_worker_runs_concurrent_batch_calls_in_the_same_decode_steps():
    """Ray Data gives an actor two batches at once; the second must fill the slots the first
    leaves free instead of waiting for the first batch's longest sequence."""
    spec = EngineSpec(model=TINY_MODEL_NAME, guard=None,
                      config=EngineConfig(max_num_seqs=4, dtype="float32"))
    worker = EngineWorker(spec, SamplingParams(max_new_tokens=200, ignore_eos=True))

    def batch(prefix: str, prompts: list) -> pa.Table:
        return pa.table({"id": [f"{prefix}{i}" for i in range(len(prompts))],
                         "prompt": [p if isinstance(p, str) else None for p in prompts],
                         "prompt_type": [type(p).__name__ for p in prompts]})

    outputs: dict[str, pa.Table] = {}
    threads = [threading.Thread(target=lambda k=k, b=b: outputs.__setitem__(k, worker(b)))
               for k, b in (("a", batch("a", [good_prompt(1), good_prompt(2)])),
                            ("b", batch("b", [good_prompt(3), "", good_prompt(4)])))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    worker.engine.shutdown()
    rows = {**rows_by_id(outputs["a"]), **rows_by_id(outputs["b"])}
    assert sorted(rows) == ["a0", "a1", "b0", "b1", "b2"]
    assert rows["b1"]["error"] == "prompt is empty" and rows["b1"]["completion"] is None
    assert all(rows[i]["num_generated_tokens"] == 200 for i in ("a0", "a1", "b0", "b2"))
    # Both batches' four sequences decoded together.
    assert worker.engine.stats()["max_decode_batch_size"] == 4
