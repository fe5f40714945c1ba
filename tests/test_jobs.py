"""Ray Data batch generation end to end (jobs/): corpora in, one row per (id, sample) out, resume
after a killed actor or driver, an S3-compatible object store, Serve mode, job submission,
cluster.yaml. All on the tiny model with few new tokens; one Ray session (conftest) for most."""
from __future__ import annotations

import copy
import json
import os
import signal
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
from guard.policy import StopPolicy
from jobs.corpus import prompt_hash_id
from jobs.generate import JobConfig, parse_args, run_job
from jobs.output import read_output
from models.tiny import TINY_MODEL_NAME
from scripts.ray_local import RAY_LOCAL_ENV
from tests.conftest import REPO_ROOT
from tests.helpers import constant_guard, engine_stack_imported_by, free_port
from tests.test_job_inputs import StubServer

NUM_ROWS = 200
TOO_LONG_PROMPT = "x" * 600  # the tiny model's context is 512 tokens (one byte = one token)
BAD_PROMPTS = {"bad-empty": ("", "prompt is empty"), "bad-int": (12, "got int"),
               "bad-null": (None, "got NoneType"), "bad-long": (TOO_LONG_PROMPT, "context"),
               "bad-surrogate": ("\ud800", "surrogate")}


def good_prompt(i: int) -> str:
    return f"def func_{i}(x):\n    return x + {i}\n" + "#" * (i % 7)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_config(tmp_path: Path, input_path, **overrides) -> JobConfig:
    settings = dict(input=str(input_path), output=str(tmp_path / "out"), model=TINY_MODEL_NAME,
                    guard=None, max_new_tokens=8, dtype="float32", batch_size=16, max_num_seqs=8,
                    min_rows_per_file=64, progress_interval_s=2.0,
                    # Half a CPU per actor: other test files' Serve replicas may hold CPUs of the
                    # shared session Ray, and a pool that cannot start would wait forever.
                    num_cpus_per_actor=0.5)
    return JobConfig.from_args({**settings, **overrides})


def assert_exactly_once(output, expected_keys: set, id_column: str = "id") -> pa.Table:
    table = read_output(output)
    keys = list(zip(table.column(id_column).to_pylist(), table.column("sample_index").to_pylist()))
    assert len(keys) == len(set(keys)), "an (id, sample) was written twice"
    assert set(keys) == expected_keys
    return table


def rows_by_key(table: pa.Table, id_column: str = "id") -> dict:
    return {(row[id_column], row["sample_index"]): row for row in table.to_pylist()}


def test_a_jobs_driver_and_its_bookkeeping_import_neither_torch_nor_transformers():
    """What a job's driver, ledger, id registries, Ray Data tasks and HTTP workers import. Each of
    them is its own process; torch and transformers cost each one seconds of CPU and hundreds of
    MiB (engine/errors.py), which doubled test_jobs.py's time here. Only the engine actors need them."""
    assert engine_stack_imported_by(
        "import backends, engine, jobs.corpus, jobs.generate, jobs.guard_samples, jobs.http_worker, jobs.ledger,"
        " jobs.output, jobs.rows\nfrom engine import EngineDeadError, PromptError, Result, SamplingParams, StepEvent"
    ) == []
    with pytest.raises(AttributeError, match="no attribute 'Engin'"):
        __import__("engine").Engin


# ---- jobs on the session Ray -------------------------------------------------------------------
def test_jsonl_job_keeps_columns_applies_row_settings_and_makes_bad_rows_error_rows(ray_session, tmp_path):
    records = [{"id": f"r{i}", "prompt": good_prompt(i), "difficulty": i % 3, "tags": ["t", str(i)]}
               for i in range(NUM_ROWS - len(BAD_PROMPTS))]
    records += [{"id": key, "prompt": prompt} for key, (prompt, _) in BAD_PROMPTS.items()]
    records += [{"id": "short", "prompt": good_prompt(1), "max_tokens": 2},
                {"id": "bad-setting", "prompt": good_prompt(2), "temperature": -1},
                {"id": "r0", "prompt": "a repeated id: skipped"}, {"id": None, "prompt": "no id: skipped"}]
    config = tiny_config(tmp_path, write_jsonl(tmp_path / "corpus.jsonl", records))
    summary = run_job(config)
    expected_ids = {r["id"] for r in records if r["id"] is not None}
    rows = rows_by_key(assert_exactly_once(config.output, {(i, 0) for i in expected_ids}))
    assert summary["num_rows"] == len(expected_ids) and summary["num_duplicate_ids"] == 1
    assert summary["num_missing_ids"] == 1 and summary["example_duplicate_ids"] == ["r0"]
    assert summary["num_errors"] == len(BAD_PROMPTS) + 1
    for key, (_, message) in BAD_PROMPTS.items():
        assert message in rows[(key, 0)]["error"] and rows[(key, 0)]["completion"] is None
    assert "bad per-row setting: temperature must be" in rows[("bad-setting", 0)]["error"]
    assert rows[("short", 0)]["num_generated_tokens"] <= 2 and rows[("short", 0)]["error"] is None
    assert rows[("r5", 0)]["difficulty"] == 2 and rows[("r5", 0)]["tags"] == ["t", "5"]
    assert rows[("r0", 0)]["prompt"] == good_prompt(0)  # the repeat did not replace the row
    good = [rows[(f"r{i}", 0)] for i in range(NUM_ROWS - len(BAD_PROMPTS))]
    assert all(r["error"] is None and 1 <= r["num_generated_tokens"] <= 8 for r in good)
    assert summary["num_generated_tokens"] == sum(r["num_generated_tokens"] or 0 for r in rows.values())
    # The actors generate exactly what the engine generates when called directly (greedy).
    engine = Engine.from_pretrained(TINY_MODEL_NAME, guard=None,
                                    config=EngineConfig(max_num_seqs=8, dtype="float32"))
    direct = engine.generate([good_prompt(i) for i in range(10)], SamplingParams(max_new_tokens=8))
    assert [rows[(f"r{i}", 0)]["completion"] for i in range(10)] == [r.text for r in direct]


def test_parquet_without_ids_k_samples_a_guard_and_per_row_guard_settings(ray_session, tmp_path):
    guard_dir = tmp_path / "guard"
    # Votes "stop" on every token: each sequence ends after 3 tokens (unless EOS comes first).
    constant_guard(10.0, StopPolicy(kind="token", num_consecutive=3, max_blank_lines=0)).save(guard_dir)
    num_prompts, num_samples = 60, 2
    prompts = [good_prompt(i) for i in range(num_prompts - 1)] + [None]
    pq.write_table(pa.table({"prompt": prompts, "n": pa.array(range(num_prompts), pa.int16()),
                             "guard": ["off" if i % 10 == 0 else None for i in range(num_prompts)]}),
                   tmp_path / "c.parquet")
    config = tiny_config(tmp_path, tmp_path / "c.parquet", guard=str(guard_dir), num_samples=num_samples,
                         temperature=0.8, batches_per_actor=3, batch_size=8)
    summary = run_job(config)
    ids = [prompt_hash_id(p) for p in prompts]
    table = assert_exactly_once(config.output, {(i, s) for i in ids for s in range(num_samples)})
    assert table.schema.field("n").type == pa.int16()  # the input's own type
    rows = rows_by_key(table)
    assert "got NoneType" in rows[(ids[-1], 1)]["error"]
    seeds = [rows[(ids[1], s)]["sample_seed"] for s in range(num_samples)]
    assert len(set(seeds)) == num_samples and None not in seeds
    unguarded = [rows[(ids[i], s)] for i in range(0, num_prompts - 1, 10) for s in range(num_samples)]
    assert not any(r["is_guard_stop"] for r in unguarded)  # the row's `guard: off` won
    stopped = [r for r in rows.values() if r["is_guard_stop"]]
    assert len(stopped) >= 2 * (num_prompts - 7) - 10 and summary["num_guard_stops"] == len(stopped)
    assert all(r["finish_reason"] == "guard" and r["num_generated_tokens"] == 3 for r in stopped)


def test_serve_url_job_sends_each_row_and_its_settings_to_the_deployment(ray_session, tmp_path):
    with StubServer() as stub_server:
        records = [{"id": i, "prompt": f"prompt {i}" + (" excess" if i % 3 == 0 else "")} for i in range(30)]
        records += [{"id": "empty", "prompt": ""}, {"id": "number", "prompt": 7},
                    {"id": "surrogate", "prompt": "\ud800"}, {"id": "row-seed", "prompt": "p", "seed": 3}]
        config = tiny_config(tmp_path, write_jsonl(tmp_path / "c.jsonl", records), model="default",
                             guard="default", serve_url=stub_server.url, http_concurrency=4, stop=("\n\n",),
                             temperature=0.2, top_p=0.9, seed=100)
        summary = run_job(config)
        rows = rows_by_key(assert_exactly_once(config.output, {(str(r["id"]), 0) for r in records}))
        assert rows[("3", 0)]["completion"] == "PROMPT 3" and rows[("3", 0)]["is_guard_stop"]
        assert rows[("3", 0)]["num_generated_tokens"] == 8 + 2  # returned tokens + the cut excess line
        assert "HTTP 400: bad prompt" in rows[("empty", 0)]["error"] and "got int" in rows[("number", 0)]["error"]
        assert rows[("surrogate", 0)]["error"] == "HTTP 400: prompt is not valid Unicode text"
        assert summary["num_guard_stops"] == 10 and summary["num_errors"] == 3 and summary["mode"] == "serve"
        sent = [b for b in stub_server.bodies if b["prompt"] == "prompt 1"]
        assert sent == [{"model": None, "prompt": "prompt 1", "max_tokens": 8, "temperature": 0.2, "top_p": 0.9,
                         "seed": 100, "stop": ["\n\n"], "guard": "on"}]
        assert [b["seed"] for b in stub_server.bodies if b["prompt"] == "p"] == [3]


@pytest.fixture
def s3_store(monkeypatch):
    """A real S3-compatible server (moto's) on 127.0.0.1; the URIs carry its endpoint and keys,
    so the pyarrow filesystem Ray pickles to every worker reaches it."""
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # pyarrow takes the keys from the URI's user info (moto accepts any), the rest from its query.
    # allow_delayed_open: small files go up in one PutObject; moto 5.2.1 answers a multipart
    # upload's completion with a root element pyarrow 26 takes for an error (real S3 does not).
    options = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1&allow_delayed_open=true"
    yield lambda key: f"s3://test:test@jobs-test/{key}?{options}"
    server.stop()


def test_an_s3_corpus_and_output_through_a_real_object_store_server(ray_session, tmp_path, s3_store):
    import pyarrow.fs as pafs

    filesystem, _ = pafs.FileSystem.from_uri(s3_store("x") + "&allow_bucket_creation=true")
    filesystem.create_dir("jobs-test")
    prompts = [good_prompt(i) for i in range(30)]
    with filesystem.open_output_stream("jobs-test/corpus/part-0.jsonl") as f:  # no id column
        f.write("".join(json.dumps({"prompt": p}) + "\n" for p in prompts).encode())
    config = tiny_config(tmp_path, s3_store("corpus/"), output=s3_store("runs/out"), min_rows_per_file=10)
    summary = run_job(config)
    table = assert_exactly_once(s3_store("runs/out"), {(prompt_hash_id(p), 0) for p in prompts})
    assert summary["num_rows"] == 30 and all(e is None for e in table.column("error").to_pylist())
    assert filesystem.get_file_info("jobs-test/runs/out.checkpoint").type == pafs.FileType.Directory
    assert not Path("jobs-test").exists() and not list(tmp_path.glob("**/*.parquet"))  # nothing local
    assert summary["checkpoint"] == s3_store("runs/out.checkpoint").replace("test:test@", "***@")
    lines = []
    again = run_job(config, log=lines.append)  # a finished run's marker: nothing to do, no Ray
    assert again["num_rows"] == 0 and again["num_already_done"] == 30 and any("nothing to do" in x for x in lines)
    filesystem.delete_file("jobs-test/runs/out.checkpoint/_complete.json")
    again = run_job(config)  # the checkpoint filter derives the prompt-hash ids to skip them
    assert again["num_rows"] == 0 and again["num_already_done"] == 30


def test_checkpoint_filter_skips_done_ids_derives_missing_ids_and_passes_null_ids(ray_session):
    import numpy as np

    from jobs.output import CorpusCheckpointFilter, make_checkpoint_config
    from jobs.storage import resolve

    config = make_checkpoint_config(resolve("/tmp/unused.checkpoint"), "id", "prompt")
    done = CorpusCheckpointFilter(config, ray_session.put(np.sort(np.array(["a", prompt_hash_id("q")], dtype=object))))
    kept = done.filter_rows_for_block(pa.table({"id": ["a", None, "b"], "prompt": ["x", "y", "z"]}))
    assert kept.column("id").to_pylist() == [None, "b"]  # the null id is prepare_rows' to drop
    derived = done.filter_rows_for_block(pa.table({"prompt": ["q", "r"]}))
    assert derived.column("id").to_pylist() == [prompt_hash_id("r")]
    numeric = CorpusCheckpointFilter(config, ray_session.put(np.array([1, 3])))
    assert numeric.filter_rows_for_block(pa.table({"id": [1, 2, 3, 4]})).column("id").to_pylist() == [2, 4]
    with pytest.raises(ValueError, match="not of the type the checkpoint holds"):
        numeric.filter_rows_for_block(pa.table({"id": ["1"]}))


def actor_pids(class_marker: str) -> list[int]:
    """Pids of the actor processes whose title names this class, oldest first."""
    import psutil

    processes = [p for p in psutil.process_iter(["pid", "cmdline", "create_time"])
                 if class_marker in " ".join(p.info["cmdline"] or [])]
    return [p.info["pid"] for p in sorted(processes, key=lambda p: p.info["create_time"])]


def batches_in_flight(ray) -> int:
    from jobs.ledger import LEDGER_NAME_PREFIX

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(LEDGER_NAME_PREFIX)]
    if not names:
        return 0
    return ray.get(ray.get_actor(names[0]).snapshot.remote())["num_batches_in_flight"]


def test_a_sigkilled_actor_is_restarted_in_an_autoscaling_pool_and_every_id_is_written_once(ray_session, tmp_path):
    import datasets

    # A datasets folder (Ray's HuggingFaceDatasource) with two splits: --split picks one.
    num_rows = 80
    splits = {"train": datasets.Dataset.from_dict({"id": list(range(num_rows)),
                                                   "prompt": [good_prompt(i) for i in range(num_rows)]}),
              "test": datasets.Dataset.from_dict({"id": [-1], "prompt": ["not this split"]})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "ds"))
    config = tiny_config(tmp_path, tmp_path / "ds", split="train", max_new_tokens=128, batch_size=4,
                         max_num_seqs=4, min_rows_per_file=8, min_actors=1, max_actors=2)
    before = set(actor_pids("MapBatches(BackendWorker)"))
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run_job(config, log=lambda line: None)))
    job.start()
    deadline = time.monotonic() + 180
    killed = []
    while not killed and job.is_alive():
        assert time.monotonic() < deadline, "no output file within 180 s"
        # Midway (a file is committed) and while a batch is generating, not just queued: the
        # run's ledger (a named actor) knows. Both actors, if the pool has grown to two.
        if list(Path(config.output).glob("*.parquet")) and batches_in_flight(ray_session) > 0:
            killed = [pid for pid in actor_pids("MapBatches(BackendWorker)") if pid not in before]
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    job.join(timeout=300)
    assert killed, "the job finished before an actor could be killed"
    summary = result["summary"]
    # The batches in flight on the killed actors ran again on their restarted selves: both counted.
    assert 1 <= summary["num_actor_restarts"] <= len(killed) and summary["num_batch_retries"] >= 1
    assert summary["num_rows"] == num_rows  # a retried batch is not counted twice
    # Whether the pool grows to its second actor before the rows are done depends on this
    # machine's load (Ray's autoscaler decides); it must never pass its maximum.
    assert 1 <= summary["num_worker_starts"] - summary["num_actor_restarts"] <= 2
    assert_exactly_once(config.output, {(i, 0) for i in range(num_rows)})  # int ids stay ints


# ---- jobs as separate processes ----------------------------------------------------------------
def job_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | RAY_LOCAL_ENV
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def job_argv(input_path: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--input", str(input_path), "--output", str(output_dir), "--model", TINY_MODEL_NAME,
            "--guard", "none", "--dtype", "float32", "--progress-interval", "2", *extra]


@pytest.mark.ray
def test_a_killed_driver_rerun_gives_exactly_one_row_per_id(ray_session, tmp_path):
    num_rows = 100
    records = [{"id": i, "prompt": good_prompt(i)} for i in range(num_rows)]
    argv = job_argv(write_jsonl(tmp_path / "c.jsonl", records), tmp_path / "out",
                    "--max-new-tokens", "32", "--batch-size", "4", "--max-num-seqs", "4",
                    "--min-rows-per-file", "8", "--num-cpus-per-actor", "0.5")
    # A driver process joined to the session Ray, as on a cluster: the kill takes the driver
    # alone, and Ray then ends that job's tasks and actors.
    env = job_env() | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    job = subprocess.Popen([sys.executable, "-m", "jobs.generate", *argv], cwd=REPO_ROOT,
                           env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not list((tmp_path / "out").glob("*.parquet")) and job.poll() is None:
            assert time.monotonic() < deadline, "no output file within 180 s"
            time.sleep(0.1)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)  # a crash: in-flight rows and writes are lost
        job.wait(timeout=30)
    num_done = read_output(tmp_path / "out").num_rows
    assert 0 < num_done < num_rows, "the job was not killed midway"
    config, _ = parse_args(argv)  # the very same command, rerun (here in this process)
    summary = run_job(config)
    assert summary["num_rows"] == num_rows - summary["num_already_done"]
    assert_exactly_once(tmp_path / "out", {(str(i), 0) for i in range(num_rows)})


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
    table = assert_exactly_once(tmp_path / "out", {(str(i), 0) for i in range(40)})
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
    # The CUDA stack comes from PyPI, as vLLM's wheel was built against it (CUDA 13): the pins
    # of requirements-vllm-gpu.txt, no other torch index (a CUDA 12 torch cannot load vLLM's kernels).
    assert "pip install -q -r requirements-vllm-gpu.txt" in setup and "download.pytorch.org" not in setup
    gpu_requirements = (REPO_ROOT / "requirements-vllm-gpu.txt").read_text().split()
    assert "-r" in gpu_requirements and "vllm==0.29.0" in gpu_requirements
    assert "torch==2.13.0" in (REPO_ROOT / "requirements.txt").read_text().split()
    assert "torch.version.cuda.startswith('13.')" in " ".join(prepared["worker_setup_commands"])
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_wrokers"] = 1  # the validator does catch typos
    with pytest.raises(Exception, match="min_wrokers"):
        validate_config(prepare_config(broken))


def test_guard_samples_job_writes_the_samples_guard_build_reads(ray_session, tmp_path):
    from evals.mbxp import load_problems, split_problems
    from guard_training.sampling import read_jsonl
    from jobs.guard_samples import job_dir, sample_with_ray
    from models.tiny import build_tiny_tokenizer

    settings = dict(model=TINY_MODEL_NAME, max_new_tokens=8, dtype="float32", batch_size=8,
                    max_num_seqs=4, num_cpus_per_actor=0.5, progress_interval_s=2.0)
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
    # One resumable job for both temperatures (per-row settings); a rerun with the samples in
    # place starts none.
    assert read_output(job_dir(tmp_path) / "output").num_rows == 12
    lines = []
    sample_with_ray(tmp_path, languages, 3, temperatures, settings, log=lines.append)
    assert lines == ["[guard_samples] every language already has its samples file"]
