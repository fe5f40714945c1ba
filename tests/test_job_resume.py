"""A resume trusts committed output only after checking it: a committed write whose file was
cut short, deleted or replaced is removed and its ids generated again, once."""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.generate import run_job
from jobs.output import read_output, verify_committed_output
from jobs.storage import resolve
from tests.test_jobs import s3_store  # noqa: F401  (a fixture)
from tests.test_jobs import assert_exactly_once, good_prompt, tiny_config, write_jsonl

NUM_ROWS = 50


def newest_output_file(output: Path) -> Path:
    return max(output.glob("*.parquet"), key=lambda path: (path.stat().st_mtime_ns, path.name))


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_rerun_generates_again_the_ids_of_a_committed_file_cut_short_or_deleted(ray_session, tmp_path, damage):
    records = [{"id": i, "prompt": good_prompt(i)} for i in range(NUM_ROWS)]
    config = tiny_config(tmp_path, write_jsonl(tmp_path / "c.jsonl", records), batch_size=8, min_rows_per_file=8)
    run_job(config, log=lambda line: None)
    victim = newest_output_file(Path(config.output))
    lost_ids = pq.read_table(victim).column("id").to_pylist()
    if damage == "truncate":
        data = victim.read_bytes()
        victim.write_bytes(data[:len(data) // 2])
    else:
        victim.unlink()
    # Ray names a write's checkpoint after the write task, and its file(s) with that prefix.
    [write_name] = [path.stem for path in Path(config.output + ".checkpoint").glob("*.parquet")
                    if victim.name.startswith(path.stem)]
    lines: list[str] = []
    summary = run_job(config, log=lines.append)
    assert_exactly_once(config.output, {(str(i), 0) for i in range(NUM_ROWS)})  # and the folder reads
    assert summary["num_rows"] == len(lost_ids) and summary["num_already_done"] == NUM_ROWS - len(lost_ids)
    assert summary["num_damaged_files"] == 1 and summary["num_damaged_rows"] == len(lost_ids)
    reason = "is unreadable" if damage == "truncate" else "output file is missing"
    assert any(f"committed write {write_name}:" in line and reason in line for line in lines), lines


def write_ids(path: Path, ids: list) -> None:
    pq.write_table(pa.table({"id": ids}), path)


def test_verification_finds_a_short_file_an_unreadable_checkpoint_and_ignores_pending_writes(tmp_path):
    output, checkpoint = tmp_path / "out", tmp_path / "out.checkpoint"
    output.mkdir()
    checkpoint.mkdir()
    for name, ids in {"run_w_000000": ["a", "b"], "run_w_000001": ["c", "d"], "run_w_000002": ["e"]}.items():
        write_ids(checkpoint / f"{name}.parquet", ids)
    write_ids(output / "run_w_000000.parquet", ["a", "b"])
    write_ids(output / "run_w_000001.parquet", ["c"])  # a row short of its checkpoint
    write_ids(output / "run_w_000002.parquet", ["e"])
    (checkpoint / "run_w_000002.parquet").write_bytes(b"not parquet")
    write_ids(checkpoint / "run_w_000003.pending.parquet", ["f"])  # Ray's recovery handles it
    write_ids(output / "run_w_000003.parquet", ["f"])
    committed = verify_committed_output(resolve(str(output)), resolve(str(checkpoint)))
    assert committed.num_rows == 2
    reasons = {Path(w.checkpoint_file).stem: w.reason for w in committed.damaged}
    assert reasons == {"run_w_000001": "its output holds 1 rows, its checkpoint 2",
                       "run_w_000002": reasons["run_w_000002"]}
    assert reasons["run_w_000002"].startswith("its checkpoint file is unreadable")
    assert committed.num_damaged_rows == 2  # the unreadable checkpoint's count is unknown
    assert read_output(output).num_rows == 5  # verifying removes nothing


def refuse_ray(*args, **kwargs):
    raise AssertionError("this run should have started neither Ray nor an engine")


def test_a_finished_jobs_rerun_starts_nothing_and_a_changed_input_is_not_skipped(ray_session, tmp_path, monkeypatch):
    import jobs.generate

    records = [{"id": i, "prompt": good_prompt(i)} for i in range(20)]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    config = tiny_config(tmp_path, corpus)
    run_job(config, log=lambda line: None)
    lines: list[str] = []
    with monkeypatch.context() as patch:
        patch.setattr(jobs.generate, "connect_ray", refuse_ray)
        started = time.perf_counter()
        summary = run_job(config, log=lines.append)
        assert time.perf_counter() - started < 10
    assert summary["num_rows"] == 0 and summary["num_already_done"] == 20 and summary["num_worker_starts"] == 0
    assert any("nothing to do" in line for line in lines), lines
    write_jsonl(corpus, records + [{"id": 20, "prompt": good_prompt(20)}])  # the input grew
    assert run_job(config, log=lambda line: None)["num_rows"] == 1
    assert_exactly_once(config.output, {(str(i), 0) for i in range(21)})


def test_an_output_that_cannot_be_written_fails_in_one_line_before_anything_starts(tmp_path, monkeypatch):
    import jobs.generate

    monkeypatch.setattr(jobs.generate, "connect_ray", refuse_ray)
    (tmp_path / "a-file").write_text("not a folder")
    config = tiny_config(tmp_path, write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "prompt": "p"}]),
                         output=str(tmp_path / "a-file" / "out"))
    with pytest.raises(ValueError, match=r"^--output .*a-file/out is not writable: "):
        run_job(config)


def test_the_documented_s3_form_is_checked_by_one_write_before_generation(
        tmp_path, monkeypatch, s3_store):
    import pyarrow.fs as pafs

    import jobs.generate

    monkeypatch.setattr(jobs.generate, "connect_ray", refuse_ray)
    filesystem, _ = pafs.FileSystem.from_uri(s3_store("x") + "&allow_bucket_creation=true")
    filesystem.create_dir("jobs-test")
    # Without allow_delayed_open pyarrow uploads every file in parts, whose completion moto's
    # server answers in a form pyarrow takes for an error: the write check must say so up front.
    multipart = s3_store("runs/out").replace("&region=us-east-1&allow_delayed_open=true", "")
    config = tiny_config(tmp_path, write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "prompt": "p"}]), output=multipart)
    with pytest.raises(ValueError, match=r"^--output s3://\*\*\*@jobs-test/runs/out\?.* is not writable: .*"
                                         r"allow_delayed_open=true"):
        run_job(config)
    left = filesystem.get_file_info(pafs.FileSelector("jobs-test", recursive=True))
    assert not [info.path for info in left if "_write-check" in info.path]  # the probe is cleaned up


def test_storage_siblings_keep_scheme_keys_and_options():
    from jobs.storage import checkpoint_location

    output = resolve("s3://k:s@bucket/runs/out/?region=us-east-1&scheme=http")
    checkpoint = checkpoint_location(output)
    assert checkpoint.uri == "s3://k:s@bucket/runs/out.checkpoint?region=us-east-1&scheme=http"
    assert checkpoint.path == "bucket/runs/out.checkpoint"
    assert checkpoint_location(resolve("out")).uri == "out.checkpoint"


def test_progress_says_what_it_waits_for_before_the_first_rows():
    from jobs.progress import progress_line

    starting = "starting engine (codefast, tiny)"
    assert progress_line({}, 12.4, 80, starting) == f"{starting} for 80 rows | 12s"
    assert progress_line({"num_worker_starts": 1}, 20, 80, starting).startswith("0 rows of ~80 (0%)")


@pytest.mark.ray
def test_the_cli_keeps_worker_and_ray_data_logs_off_the_console_and_a_finished_rerun_exits_at_once(tmp_path):
    import re
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT
    from tests.test_jobs import job_argv, job_env

    records = [{"id": i, "prompt": good_prompt(i)} for i in range(10)]
    argv = [sys.executable, "-m", "jobs.generate",
            *job_argv(write_jsonl(tmp_path / "c.jsonl", records), tmp_path / "out",
                      "--max-new-tokens", "4", "--num-cpus-per-actor", "0.5")]

    def run() -> tuple[str, float]:
        started = time.perf_counter()
        done = subprocess.run(argv, cwd=REPO_ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr, time.perf_counter() - started

    first, _ = run()
    assert "[generate] starting engine (codefast, codefast/tiny-random) for" not in first  # jsonl: count unknown
    assert "[generate] starting engine (codefast, codefast/tiny-random) | 0s" in first
    assert "[generate] worker and engine logs: " in first
    # Neither Ray Data's INFO lines (plans, checkpoint loads) nor lines the workers print.
    assert " INFO " not in first and "Progress bars disabled" not in first
    assert not re.search(r"^\(\S+ pid=\d+", first, re.MULTILINE)
    again, wall_s = run()
    assert "nothing to do" in again and "worker and engine logs" not in again and wall_s < 20


def test_a_store_that_fills_up_mid_job_keeps_the_committed_rows_and_the_rerun_completes(ray_session, tmp_path):
    """A failed upload (here: the output's filesystem full partway through) loses no finished
    row: what was committed stays readable, and the rerun writes the rest, each id once."""
    import subprocess

    output = tmp_path / "out"
    output.mkdir()
    # Room for the write check and a few files, not for the whole output.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(output)], check=True)
    try:
        records = [{"id": i, "prompt": good_prompt(i)} for i in range(NUM_ROWS)]
        config = tiny_config(tmp_path, write_jsonl(tmp_path / "c.jsonl", records), batch_size=5,
                             min_rows_per_file=5, max_new_tokens=64)
        with pytest.raises(Exception):
            run_job(config, log=lambda line: None)
        # What the failed run committed checks out (the failed write's partial file is not
        # committed: Ray's recovery removes it on the rerun).
        committed = verify_committed_output(resolve(str(output)), resolve(config.output + ".checkpoint"))
        assert committed.damaged == () and 0 < committed.num_rows < NUM_ROWS
        subprocess.run(["mount", "-o", "remount,size=64m", str(output)], check=True)
        summary = run_job(config, log=lambda line: None)
        assert summary["num_already_done"] == committed.num_rows
        assert summary["num_already_done"] + summary["num_rows"] == NUM_ROWS
        assert_exactly_once(config.output, {(str(i), 0) for i in range(NUM_ROWS)})  # and it reads
    finally:
        subprocess.run(["umount", "-l", str(output)], check=False)
