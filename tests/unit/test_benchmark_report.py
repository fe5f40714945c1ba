"""benchmarks.report: every benchmark's report names its date, machine, commit and command."""
import json
import os
import re

import pytest

from benchmarks import report, stop_errors
from evals.mbxp import load_problems


@pytest.fixture
def reports_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "REPORTS", tmp_path / "reports")
    return tmp_path / "reports"


def test_the_header_names_date_machine_commit_and_command(reports_dir):
    command = ["python", "-m", "benchmarks.demo", "--x", "a b"]
    path = report.write_report("demo", "| a | b |\n|---|---|\n", command=command)
    assert path == reports_dir / "demo" / "report.md"
    text = path.read_text()
    assert text.startswith("# benchmarks.demo\n")
    assert re.search(r"^- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC$", text, re.M)
    machine = re.search(r"^- machine: (.*)$", text, re.M).group(1)
    assert f"{os.cpu_count()} cores" in machine and "GPU: " in machine and report.cpu_model() in machine
    assert re.search(r"^- commit: [0-9a-f]{40}(\+dirty)?$", text, re.M)
    assert "- command: `python -m benchmarks.demo --x 'a b'`" in text
    assert text.endswith("\n| a | b |\n|---|---|\n")


def test_a_benchmark_run_as_a_module_is_named_as_typed():
    argv = [str(report.REPO_ROOT / "benchmarks" / "stop_errors.py"), "--cells", "x"]
    assert report.command_line(argv) == "python -m benchmarks.stop_errors --cells x"
    assert report.command_line(["pytest", "-q"]) == "pytest -q"


def test_stop_errors_writes_its_table_under_the_header(reports_dir, tmp_path, monkeypatch):
    first, second = load_problems("python")[:2]
    cells = tmp_path / "cells"
    cells.mkdir()
    rows = [{"task_id": first.task_id, "completion": "    return 1\n", "finish_reason": "eos"},
            {"task_id": second.task_id, "completion": "    return (\n", "finish_reason": "length"}]
    guarded = [{"task_id": first.task_id, "completion": "    return 2\n"},  # not a prefix: diverged
               {"task_id": second.task_id, "completion": ""}]  # no closed function: unparseable
    (cells / "python.baseline.json").write_text(json.dumps({"problems": rows}))
    (cells / "python.guard.json").write_text(json.dumps({"problems": guarded}))
    module_file = report.REPO_ROOT / "benchmarks" / "stop_errors.py"
    monkeypatch.setattr("sys.argv", [str(module_file), "--cells", str(cells)])
    stop_errors.main(["--cells", str(cells)])
    text = (reports_dir / "stop_errors" / "report.md").read_text()
    assert f"- command: `python -m benchmarks.stop_errors --cells {cells}`" in text
    assert "| language | early | exact | late | diverged | unparseable |" in text
    assert "| python | 0 | 0 | 0 | 1 | 1 |" in text
