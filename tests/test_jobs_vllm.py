"""The batch job on the vLLM backend (`--backend vllm`): the same job code, schema, error rows and
guard columns as on our engine. Tiny model, a guard sure that every token is excess."""
import pytest

from guard.policy import StopPolicy
from jobs.output import read_output
from jobs.generate import run_job
from tests.helpers import constant_guard
from tests.test_jobs import tiny_config, write_jsonl
from tests.test_llm_app import SURE_STOP_LOGIT

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_a_job_on_the_vllm_backend_writes_guard_stops_and_error_rows(ray_session, tmp_path):
    guard_dir = tmp_path / "guard"
    constant_guard(SURE_STOP_LOGIT, StopPolicy(min_code_lines=0)).save(guard_dir)
    records = [{"id": f"r{i}", "prompt": f"def f{i}(x):\n", "level": i} for i in range(12)]
    records += [{"id": "off", "prompt": "def g(x):\n", "guard": "off"}, {"id": "empty", "prompt": ""}]
    config = tiny_config(tmp_path, write_jsonl(tmp_path / "corpus.jsonl", records), backend="vllm",
                         guard=str(guard_dir), num_cpus_per_actor=1)
    summary = run_job(config)
    rows = {row["id"]: row for row in read_output(config.output).to_pylist()}
    assert sorted(rows) == sorted(r["id"] for r in records) and summary["num_errors"] == 1
    assert "prompt is empty" in rows["empty"]["error"]
    for i in range(12):
        row = rows[f"r{i}"]
        assert row["finish_reason"] == "guard" and row["is_guard_stop"] and row["completion"].strip() == ""
        assert row["level"] == i
    assert rows["off"]["finish_reason"] == "length" and rows["off"]["num_generated_tokens"] == 8
    assert summary["num_guard_stops"] == 12
